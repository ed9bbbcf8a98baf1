// For the CUDA kernels' bodies compiled for the host (cuda_kernel_on_host.cpp, bn_cuda_on_host.cpp).
// The GPU fuses a * b + c into one fused multiply-add (nvcc's default --fmad=true), and so must the
// host build, or results differ wherever a sum nearly cancels (weight decay against the gradient).
// x86 compilers use FMA only when told the CPU has it: a host launch is compiled for FMA
// (RESFAST_HOST_FMA) and runs only where the CPU has it (host_has_fma); other CPUs (aarch64) have it
// in their base instruction set.
#pragma once

namespace resfast {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RESFAST_HOST_FMA __attribute__((target("fma")))
inline bool host_has_fma() { return __builtin_cpu_supports("fma"); }
#else
#define RESFAST_HOST_FMA
inline bool host_has_fma() { return true; }
#endif

// Inlines every call of the function into it, so that the code it calls is compiled with its target too.
#if defined(__GNUC__)
#define RESFAST_INLINE_CALLEES __attribute__((flatten))
#else
#define RESFAST_INLINE_CALLEES
#endif

}  // namespace resfast
