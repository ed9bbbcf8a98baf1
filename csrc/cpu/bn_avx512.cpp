// The CPU BN kernels built for AVX-512 (F, BW, DQ and VL), chosen at run time (bn.cpp); the notes of
// optim_avx2.cpp apply.
#include "x86_variants.h"

#if RESFAST_CPU_X86_VARIANTS
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512DQ__ 1
#define __AVX512VL__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "bn_kernels_impl.h"
#endif
