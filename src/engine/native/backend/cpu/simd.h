// The one include of <immintrin.h> for the CPU backend. GCC 12's AVX-512 headers trip
// -Wuninitialized / -Wmaybe-uninitialized on their own _mm512_undefined_* placeholders
// (GCC bug 105593); the warnings point into the system header, so they are silenced for it alone.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
