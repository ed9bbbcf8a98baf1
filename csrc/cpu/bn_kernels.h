// The interface between the CPU BN driver (bn.cpp: checks, layout, allocation, threads, merging of
// partial results) and its inner loops (bn_kernels_impl.h), compiled once per x86 instruction set and
// chosen at run time as the optimizer kernels are. Plain data only.
//
// Each kernel runs work items [first, last) of a plan (csrc/bn_plan.h); every tensor of a job has the
// storage dtype `storage`, per-channel inputs are fp32 arrays of C values, partial outputs fp32 arrays
// of C * chunks values at bn::partial_index.
#pragma once

#include <cstdint>

#include "../bn_plan.h"
#include "storage.h"
#include "x86_variants.h"

namespace resfast::cpu {

// Forward statistics: per (item, channel), the mean and M2 of the item's values.
struct BnStatsJob {
  bn::Plan plan;
  Storage storage;
  bn::Operand x;
  float* mean;  // out: partial means
  float* m2;    // out: partial sums of squared deviations from them
};

// Forward: y = relu((x - mean) * scale + bias + residual); residual.data null when absent.
struct BnApplyJob {
  bn::Plan plan;
  Storage storage;
  bn::Operand x, residual, y;
  const float *mean, *scale, *bias;  // per channel
};

// Backward pass 1: dz = dy * (y > 0) written; per (item, channel) sums of dz and dz * (x - mean).
struct BnGradReduceJob {
  bn::Plan plan;
  Storage storage;
  bn::Operand dy, y, x, dz;
  const float* mean;  // per channel
  float* sum_dz;      // out: partial sums
  float* sum_dz_xc;   // out: partial sums of dz * (x - mean)
};

// Backward pass 2: dx = alpha * dz + beta * (x - mean) + gamma (training), alpha * dz (eval: x unread).
struct BnGradInputJob {
  bn::Plan plan;
  Storage storage;
  bn::Operand dz, x, dx;
  const float *mean, *alpha, *beta, *gamma;  // per channel
  bool training;
};

struct BnKernels {
  void (*stats)(const BnStatsJob&, int64_t first, int64_t last);
  void (*apply)(const BnApplyJob&, int64_t first, int64_t last);
  void (*grad_reduce)(const BnGradReduceJob&, int64_t first, int64_t last);
  void (*grad_input)(const BnGradInputJob&, int64_t first, int64_t last);
};

// One namespace per instruction set, as ATen names its own (CPU_CAPABILITY).
namespace DEFAULT {
BnKernels bn_kernels();
}
namespace AVX2 {
BnKernels bn_kernels();
}
namespace AVX512 {
BnKernels bn_kernels();
}

}  // namespace resfast::cpu
