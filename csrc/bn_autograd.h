// The eager training path of the native fused BN + add + ReLU, autograd included, as one call from Python
// (resfast._C.bn_add_relu; csrc/bn_autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace resfast {

// relu(batch_norm(x) + residual) (or relu(batch_norm(x))) on checked inputs, differentiable in x,
// residual, weight and bias; in training the batch statistics update the running ones in place.
at::Tensor bn_add_relu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                       const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool training,
                       double momentum, double eps);

}  // namespace resfast
