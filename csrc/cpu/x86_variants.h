// Whether this compiler builds the AVX2 and AVX-512 variants of the CPU kernels: they need GCC's
// `#pragma GCC target` on x86-64. Elsewhere only the baseline build exists (still vectorised: ATen's
// vector type falls back to fixed-size loops the compiler vectorises). No includes: the variant files
// read this before their target pragma.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RESFAST_CPU_X86_VARIANTS 1
#else
#define RESFAST_CPU_X86_VARIANTS 0
#endif
