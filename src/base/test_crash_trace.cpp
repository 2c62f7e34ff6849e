// Linked into every test binary (dyn_test in the top CMakeLists.txt): a test process that dies of
// a signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) prints its stack before it dies - the raw
// frames (module + offset), then function, file and line from addr2line - so a crash seen once on
// a CI machine says where it happened. The handler allocates nothing (the crash may be inside
// malloc), starts addr2line with a raw clone (no fork handlers, no locks), and an alarm ends the
// process within 20 s whatever happens. Not installed under ASan or TSan, which print their own
// reports from their own handlers.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#include <dlfcn.h>
#include <execinfo.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <cstring>
#include <initializer_list>

extern char** environ;

namespace {

void Write(const char* s) {
  const ssize_t ignored = write(STDERR_FILENO, s, std::strlen(s));
  (void)ignored;
}

// "0x" + hex of v into out (at least 19 bytes).
void Hex(uintptr_t v, char* out) {
  char digits[17];
  int n = 0;
  do {
    digits[n++] = "0123456789abcdef"[v & 15];
    v >>= 4;
  } while (v != 0);
  out[0] = '0', out[1] = 'x';
  for (int i = 0; i < n; ++i) out[2 + i] = digits[n - 1 - i];
  out[2 + n] = '\0';
}

void PrintStackAndDie(int sig) {
  std::signal(sig, SIG_DFL);  // a second fault ends the process plainly
  alarm(20);                  // and so does a hang below (SIGALRM's default action)
  void* frames[64];
  const int n = backtrace(frames, 64);
  Write("\n*** test process got a fatal signal; stack:\n");
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  Write("*** the same frames with file and line (addr2line):\n");
  for (int i = 0; i < n; ++i) {
    Dl_info info{};
    if (dladdr(frames[i], &info) == 0 || info.dli_fname == nullptr) continue;
    // Return addresses point after the call: -1 lands on the calling line.
    char addr[24];
    Hex(reinterpret_cast<uintptr_t>(frames[i]) - reinterpret_cast<uintptr_t>(info.dli_fbase) - (i > 0 ? 1 : 0), addr);
    char* argv[] = {const_cast<char*>("addr2line"), const_cast<char*>("-f"), const_cast<char*>("-C"), const_cast<char*>("-p"),
                    const_cast<char*>("-e"), const_cast<char*>(info.dli_fname), addr, nullptr};
    const long pid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    if (pid == 0) {
      dup2(STDERR_FILENO, STDOUT_FILENO);
      execve("/usr/bin/addr2line", argv, environ);
      _exit(127);
    }
    if (pid > 0) waitpid(static_cast<pid_t>(pid), nullptr, 0);
  }
  std::raise(sig);
}

const bool installed = [] {
  void* warm[1];
  backtrace(warm, 1);  // loads the unwinder now, not inside the handler
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) std::signal(sig, PrintStackAndDie);
  return true;
}();

}  // namespace
#endif
