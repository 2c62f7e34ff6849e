#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan) and runs each for a short time on a seed
# corpus: template_fuzz (chat-template parser/interpreter) and tokenizer_fuzz (encode/decode/
# incremental decode invariants over real vocabularies). Fails on any crash, sanitizer report,
# invariant violation or timeout; the failing input is saved as build-fuzz/<target>-crash-*.
#
# Usage: scripts/fuzz.sh [seconds per target, default 20]. Skipped (exit 0) without clang++.
# See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-20}"
BUILD=build-fuzz

if ! command -v clang++ >/dev/null 2>&1 || ! command -v clang >/dev/null 2>&1; then
  echo "fuzz: clang/clang++ not found, skipping the fuzz targets"
  exit 0
fi

# -O1 and line tables only (instead of RelWithDebInfo's -O3 -g): the usual fuzzing flags, about
# half the compile time, and asserts stay on (no -DNDEBUG).
if [[ ! -f "$BUILD/build.ninja" ]]; then
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DDYN_FUZZ=ON -DDYN_BUILD_TESTS=OFF \
    -DDYN_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" \
    "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" >/dev/null
fi
start=$(date +%s)
cmake --build "$BUILD" --target template_fuzz tokenizer_fuzz -j"${FUZZ_JOBS:-$(nproc)}"
echo "fuzz: build took $(($(date +%s) - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Seeds. Templates: the golden chat templates and every chat_template in the shared tokenizer
# configs. Tokenizer: ShareGPT first turns, each behind a selector byte that cycles through the
# tokenizers and flag combinations (see tokenizer_fuzz.cpp for the input layout).
mkdir -p "$work/template" "$work/tokenizer"
cp tests/golden/templates/*.jinja "$work/template/" 2>/dev/null || true
SHARED="${DYN_SHARED:-../shared}"
[[ -d "$SHARED" || -n "${DYN_SHARED:-}" ]] || SHARED=/work/shared
# The tokenizers tokenizer_fuzz loads (its built-in default assumes ../shared).
export DYN_FUZZ_TOKENIZERS="${DYN_FUZZ_TOKENIZERS:-bytelevel=$SHARED/tokenizers/gpt2:nfc=$SHARED/tokenizers/qwen3:spm=$SHARED/models/stories260K/hf:spm=$SHARED/tokenizers/mistral-7b-v0.1:bytelevel=models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if command -v python3 >/dev/null 2>&1; then
  python3 - "$SHARED" "$work" <<'EOF'
import glob, json, os, sys
shared, work = sys.argv[1], sys.argv[2]
n = 0
for path in sorted(glob.glob(os.path.join(shared, "tokenizers/*/tokenizer_config.json"))):
    t = json.load(open(path, encoding="utf-8")).get("chat_template")
    items = [t] if isinstance(t, str) else [x.get("template", "") for x in (t or [])]
    for s in items:
        if s:
            open(os.path.join(work, "template", "cfg%d.jinja" % n), "w", encoding="utf-8").write(s)
            n += 1
prompts = []
sharegpt = os.path.join(shared, "traces/sharegpt/ShareGPT_V3_filtered_500.json")
if os.path.exists(sharegpt):
    for row in json.load(open(sharegpt, encoding="utf-8"))[:64]:
        prompts.append(row["conversations"][0]["value"].encode("utf-8")[:1500])
prompts += [b"", b"hello world", "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600 \u2581x".encode(),
            b"<s>a</s><|endoftext|><|im_start|>b", b"\xff\xfe\xc3(\xe2\x82"]
for i, p in enumerate(prompts):
    # Selector byte: tokenizer (bits 0-2), add_special (3), skip_special (4), split (5-7).
    open(os.path.join(work, "tokenizer", "p%03d" % i), "wb").write(bytes([(i * 37) & 0xFF]) + p)
EOF
fi
[[ -n "$(ls "$work/tokenizer")" ]] || printf '\x00hello world' >"$work/tokenizer/seed"

# halt_on_error makes the first UBSan report fatal (the targets build with recoverable UBSan).
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export ASAN_OPTIONS="detect_leaks=1"
status=0
for target in template tokenizer; do
  bin="$BUILD/src/llm/$target/${target}_fuzz"
  log="$work/$target.log"
  extra=()
  [[ $target == tokenizer ]] && extra=(-max_len=2048)
  echo "fuzz: ${target}_fuzz for ${SECONDS_PER_TARGET}s on $(ls "$work/$target" | wc -l) seeds"
  rc=0
  "$bin" -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$BUILD/${target}-" "${extra[@]}" "$work/$target" >"$log" 2>&1 || rc=$?
  grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
  if [[ $rc -ne 0 ]] || grep -qE "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:" "$log"; then
    echo "fuzz: ${target}_fuzz FAILED (rc=$rc); log tail:"
    tail -n 60 "$log"
    ls "$BUILD/${target}-"* 2>/dev/null || true
    status=1
  else
    echo "fuzz: ${target}_fuzz OK"
  fi
done
exit $status
