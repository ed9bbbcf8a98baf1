// The coefficient rows that depend on a tensor's step count (Adam's bias corrections, Adagrad's decayed
// lr), shared by the CPU and CUDA coefficient ops (csrc/cpu/optim.cpp, csrc/cuda/optim.cu).
//
// They compute what resfast/kernels/optim_coef.py computes with torch ops, to the bit: the step count
// and every term in float64 (as torch promotes a float64 step vector), rounded to float32 once when
// stored; a tensor lr is a float32 value promoted the same way. The one float32 term is AdamW's
// `1 - lr * weight_decay` with a tensor lr, which torch computes in the tensor's float32. Products are
// rounded on their own (no fused multiply-add, which torch's elementwise ops do not use either).
// Column order: the maths' Column enums (csrc/optim_math.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "optim_math.h"

namespace resfast {

#if defined(__CUDA_ARCH__)
C10_HOST_DEVICE inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
C10_HOST_DEVICE inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
#else
C10_HOST_DEVICE inline double mul_rn(double a, double b) {
  volatile double product = a * b;  // volatile: the host compiler may not contract it into an FMA either
  return product;
}
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
  volatile float product = a * b;
  return product;
}
#endif

// Hyperparameters as torch sees them: Python floats are doubles; `lr_float32` says lr came from a
// float32 tensor (widened into `lr`; the CUDA op reads a device lr in its kernel).
struct AdamCoef {
  double lr, beta1, beta2, eps, weight_decay;
  int wd_mode;  // AdamMath::WeightDecay
  bool lr_float32;

  C10_HOST_DEVICE void operator()(double step, float* row) const {
    row[AdamMath::kStepSize] = static_cast<float>(lr / (1.0 - ::pow(beta1, step)));
    row[AdamMath::kSqrtBiasCorrection2] = static_cast<float>(::sqrt(1.0 - ::pow(beta2, step)));
    row[AdamMath::kOneMinusBeta1] = static_cast<float>(1.0 - beta1);
    row[AdamMath::kBeta2] = static_cast<float>(beta2);
    row[AdamMath::kOneMinusBeta2] = static_cast<float>(1.0 - beta2);
    row[AdamMath::kEps] = static_cast<float>(eps);
    float term = static_cast<float>(weight_decay);
    if (wd_mode == AdamMath::kDecoupled) {
      term = lr_float32 ? 1.0f - mul_rn(static_cast<float>(lr), static_cast<float>(weight_decay))
                          : static_cast<float>(1.0 - mul_rn(lr, weight_decay));
    }
    row[AdamMath::kWeightDecayTerm] = term;
  }
};

struct AdagradCoef {
  double lr, lr_decay, weight_decay, eps;
  bool lr_float32;  // unused: Adagrad's only lr term is float64 either way

  C10_HOST_DEVICE void operator()(double step, float* row) const {
    row[AdagradMath::kClr] = static_cast<float>(lr / (1.0 + mul_rn(step - 1.0, lr_decay)));
    row[AdagradMath::kWeightDecay] = static_cast<float>(weight_decay);
    row[AdagradMath::kEps] = static_cast<float>(eps);
  }
};

}  // namespace resfast
