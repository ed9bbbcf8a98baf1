// The CPU BN kernels built for AVX2 + FMA + F16C, chosen at run time (bn.cpp); the notes of
// optim_avx2.cpp apply.
#include "x86_variants.h"

#if RESFAST_CPU_X86_VARIANTS
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "bn_kernels_impl.h"
#endif
