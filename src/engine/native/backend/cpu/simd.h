// The one include of <immintrin.h> for the CPU backend. GCC 12's AVX-512 headers trip
// -Wuninitialized / -Wmaybe-uninitialized on their own _mm512_undefined_* placeholders
// (GCC bug 105593); the warnings point into the system header, so they are silenced for it alone.
//
// DYN_CPU_AVX512 selects the kernels: the hand-written AVX-512 (+VNNI) ones where the build
// target has them (-march=native on Zen 4, Sapphire Rapids, ...), the portable ones in
// cpu_*_generic.cpp otherwise (written so that GCC vectorizes them for AVX2/FMA).
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define DYN_CPU_AVX512 1
#else
#define DYN_CPU_AVX512 0
#endif
