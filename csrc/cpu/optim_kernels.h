// The interface between the CPU optimizer ops (optim.cpp) and their inner loops
// (optim_kernels_impl.h), which are compiled once per x86 instruction set and chosen at run time.
// Plain data only: the files compiled for wider instruction sets include nothing but ATen's SIMD
// vector headers and this.
#pragma once

#include <cstdint>

#include "../optim_math.h"
#include "storage.h"
#include "x86_variants.h"

namespace resfast::cpu {

// Elements [begin, end) of one param's tensors, in the op's list order (param, grad, states...).
struct Chunk {
  void* data[5];
  const float* coef;  // the tensor's row of the coefficient table (Math::kColumns values)
  int64_t begin, end;
};

// A run of chunks of one call: all of its tensors share one storage dtype.
struct Job {
  const Chunk* chunks;
  int64_t count;
  Storage storage;
  GradTransform grad;  // scaled grads are written back unscaled, as torch's fused steps do
};

// The (number of tensor lists, maths) pairs the ops instantiate; each instruction-set build defines
// exactly these.
#define RESFAST_FOR_EACH_CPU_KERNEL(X) \
  X(2, SgdMath)                        \
  X(3, SgdMath)                        \
  X(3, RmspropMath)                    \
  X(4, RmspropMath)                    \
  X(5, RmspropMath)                    \
  X(3, AdagradMath)                    \
  X(4, AdamMath)                       \
  X(5, AdamMath)                       \
  X(3, LarsMath)

// The instruction set whose build the CPU ops run: "avx512", "avx2" or "default" (optim.cpp).
const char* kernel_isa_name();

// One namespace per instruction set, as ATen names its own (CPU_CAPABILITY). lars_norms is LARS's
// reduction pass over a job of (param, grad, momentum_buffer) chunks: sums[2 * i] and sums[2 * i + 1]
// receive chunk i's sum of param² and of unscaled grad².
namespace DEFAULT {
template <int N, typename Math>
void update_chunks(const Job& job, const Math& math);
void lars_norms(const Job& job, double* sums);
}  // namespace DEFAULT
namespace AVX2 {
template <int N, typename Math>
void update_chunks(const Job& job, const Math& math);
void lars_norms(const Job& job, double* sums);
}  // namespace AVX2
namespace AVX512 {
template <int N, typename Math>
void update_chunks(const Job& job, const Math& math);
void lars_norms(const Job& job, double* sums);
}  // namespace AVX512

}  // namespace resfast::cpu
