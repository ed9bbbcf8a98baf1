// The maths of y = relu(batch_norm(x) + residual), shared by the native drivers: the C++ CPU driver
// (csrc/cpu/bn.cpp, T = float or at::vec::Vectorized<float>) and a CUDA driver (T = float). Every
// function is C10_HOST_DEVICE and reads nothing but its arguments, so it compiles for either side.
//
// The specification is resfast/kernels/reference_bn.py. Per channel, over the M = N * prod(spatial)
// values of the batch, the drivers compute in fp32 whatever the storage dtype:
//
// Forward statistics. A driver reduces blocks of values to Moments (mean, M2 = sum (x - mean)^2,
// count), each block in two passes over cached data (its mean, then the squared deviations from it,
// free of the cancellation of sum(x^2) - sum(x)^2 / M), and merges the blocks with Chan et al.'s
// formula (`merge`). var = M2 / M (biased) normalises; the running variance gets M2 / (M - 1).
//
// Forward: z = (x - mean) * scale + bias + residual, y = relu(z), scale = weight / sqrt(var + eps).
//
// Backward (x is saved, and y, whose sign is ReLU's mask):
//     dz        = dy * (y > 0)                    = dresidual
//     dbias     = sum(dz)
//     dweight   = sum(dz * xhat) = invstd * sum(dz * (x - mean)),   xhat = (x - mean) * invstd
// Training (mean and var are functions of x):
//     dx = scale * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)
//        = alpha * dz + beta * (x - mean) + gamma,   alpha = scale,
//          beta = -scale * invstd * sum(dz * xhat) / M,   gamma = -scale * sum(dz) / M
// Eval (running stats are constants): dx = scale * dz, i.e. beta = gamma = 0.
// So the backward is one reduction pass (writing dz, summing dz and dz * (x - mean)), per-channel
// coefficients (`grad_coefficients`), and one elementwise pass (`grad_input`).
//
// NaN and Inf propagate as in PyTorch's unfused expression: a non-finite x poisons its channel's
// statistics in training; relu keeps NaN (it is not max(z, 0), which would drop it).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace resfast::bn {

// The element operations beyond + - * that the maths needs, for T = float; the CPU driver
// specialises it for its SIMD vector type (csrc/cpu/bn_kernels_impl.h).
template <typename T>
struct BnElementwise {
  // torch.relu: NaN stays NaN (the comparison is false for it).
  C10_HOST_DEVICE static float relu(float z) { return z < 0.f ? 0.f : z; }
  // ReLU's gradient from its output: y > 0 passes dy, anything else (0, or NaN) gives 0, as
  // torch.where(y > 0, dy, 0) in the specification.
  C10_HOST_DEVICE static float pass_where_positive(float y, float dy) { return y > 0.f ? dy : 0.f; }
};

// A summary of `count` values: their mean and the sum of squared deviations from it.
template <typename A>
struct Moments {
  A mean;
  A m2;
  A count;
};

// Chan et al.'s combination: a becomes the summary of a's and b's values together. Exact in exact
// arithmetic; an empty b leaves a unchanged, an empty a becomes b.
template <typename A>
C10_HOST_DEVICE inline void merge(Moments<A>& a, const Moments<A>& b) {
  const A count = a.count + b.count;
  if (b.count == A(0)) return;
  const A frac_b = b.count / count;
  const A delta = b.mean - a.mean;
  a.mean = a.mean + delta * frac_b;
  a.m2 = a.m2 + b.m2 + delta * delta * a.count * frac_b;
  a.count = count;
}

// 1 / sqrt(var + eps), with IEEE division and square root as torch's BN computes it (an approximate
// reciprocal square root would put its error into every output). Per channel, so its cost is nil.
C10_HOST_DEVICE inline float inv_std(float var, float eps) { return 1.f / ::sqrtf(var + eps); }

// The running statistics' update of nn.BatchNorm2d, in fp32: exponential average with weight
// `momentum` for the batch, the unbiased variance M2 / (count - 1) = var * count / (count - 1).
C10_HOST_DEVICE inline void update_running(float& running_mean, float& running_var, float mean, float var,
                                           float unbias, float momentum) {
  running_mean = running_mean * (1.f - momentum) + mean * momentum;
  running_var = running_var * (1.f - momentum) + var * unbias * momentum;
}

// The forward's normalised part before the residual: (x - mean) * scale + bias. Subtracting the mean
// first keeps x's own digits when the mean is large against the spread (x * scale + shift would
// cancel two large terms).
template <typename T>
C10_HOST_DEVICE inline T normalize(const T& x, const T& mean, const T& scale, const T& bias) {
  return (x - mean) * scale + bias;
}

template <typename T>
C10_HOST_DEVICE inline T normalize_relu(const T& x, const T& mean, const T& scale, const T& bias) {
  return BnElementwise<T>::relu(normalize(x, mean, scale, bias));
}

template <typename T>
C10_HOST_DEVICE inline T normalize_add_relu(const T& x, const T& residual, const T& mean, const T& scale,
                                            const T& bias) {
  return BnElementwise<T>::relu(normalize(x, mean, scale, bias) + residual);
}

// dz = dy where the output was positive (ReLU's gradient), the gradient of z and of the residual.
template <typename T>
C10_HOST_DEVICE inline T relu_grad(const T& dy, const T& y) {
  return BnElementwise<T>::pass_where_positive(y, dy);
}

// One channel's backward coefficients (see the top of this file).
struct GradCoefficients {
  float alpha, beta, gamma;  // dx = alpha * dz + beta * (x - mean) + gamma
  float dweight, dbias;      // sum(dz * xhat), sum(dz)
};

// From the channel's sums over `count` values, sum_dz = sum(dz) and sum_dz_xhat = sum(dz * xhat)
// (= invstd * sum(dz * (x - mean)), which a driver accumulates), with invstd = inv_std(var, eps).
// `weight` is 1 without an affine weight. Training differentiates through the batch statistics; the
// sums and count may cover more than this process's batch (synchronised statistics).
C10_HOST_DEVICE inline GradCoefficients grad_coefficients(float sum_dz, float sum_dz_xhat, float invstd,
                                                          float weight, float count, bool training) {
  const float scale = invstd * weight;
  GradCoefficients g{scale, 0.f, 0.f, sum_dz_xhat, sum_dz};
  if (training) {
    g.beta = -scale * invstd * sum_dz_xhat / count;
    g.gamma = -scale * sum_dz / count;
  }
  return g;
}

// dx from dz and the centred input xc = x - mean (eval: beta = gamma = 0, xc unused by the driver).
template <typename T>
C10_HOST_DEVICE inline T grad_input(const T& dz, const T& xc, const T& alpha, const T& beta, const T& gamma) {
  return dz * alpha + xc * beta + gamma;
}

template <typename T>
C10_HOST_DEVICE inline T grad_input_eval(const T& dz, const T& alpha) {
  return dz * alpha;
}

}  // namespace resfast::bn
