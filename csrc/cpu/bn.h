// The CPU implementations of the native BN ops (csrc/bn_ops.cpp registers them; schemas there).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace resfast::cpu {

// (mean, biased var) of x per channel, fp32; running stats updated in place when given.
std::tuple<at::Tensor, at::Tensor> bn_stats_(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                                             const std::optional<at::Tensor>& running_var, double momentum);

// y = relu((x - mean) / sqrt(var + eps) * weight + bias + residual), x's dtype, at::empty_like(x)'s layout.
at::Tensor bn_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& mean, const at::Tensor& var, double eps);

// (dx, or an empty tensor when not need_dx; dresidual; dweight; dbias), the last two fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool training, bool need_dx);

// Training's dx from dz and given sums over `count` values per channel (a 1- or C-element tensor).
at::Tensor bn_grad_input(const at::Tensor& dz, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& sum_dz,
                         const at::Tensor& sum_dz_xhat, const at::Tensor& count);

}  // namespace resfast::cpu
