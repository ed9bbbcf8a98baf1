// The CPU optimizer kernels built for AVX2 + FMA + F16C, chosen at run time (optim.cpp).
//
// The target pragma comes before every other include, so the whole file is compiled for this
// instruction set, as ATen compiles its own *.AVX2.cpp kernels. Header functions that the baseline
// files define too are linked from the first object that defines them; setup.py lists those first.
#include "x86_variants.h"

#if RESFAST_CPU_X86_VARIANTS
#pragma GCC target("avx2,fma,f16c")
// The pragma does not define the ISA macros the compiler flags would; sleef.h (included by ATen's
// vector headers) declares its AVX2 functions only under them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "optim_kernels_impl.h"
#endif
