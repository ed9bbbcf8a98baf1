// Op schemas of the native fused BatchNorm + add + ReLU and their CPU implementations (csrc/cpu/bn.cpp).
// A fragment of the `resfast` library that csrc/ops.cpp defines. Fake implementations are registered in
// Python (resfast/kernels/native_bn.py). The maths, and what each output is, in csrc/bn_math.h.
//
// The ops mirror resfast/kernels/reference_bn.py's functions; names carry `native_` because the
// differentiable ops that resfast.nn.functional registers (bn_stats, bn_add_relu_fwd, ...) call the
// kernels of any backend, these included. Only native_bn_stats_ mutates (the running statistics).
#include <torch/library.h>

#include "cpu/bn.h"

TORCH_LIBRARY_FRAGMENT(resfast, m) {
  m.def(
      "native_bn_stats_(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) "
      "-> (Tensor mean, Tensor var)");
  m.def(
      "native_bn_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "float eps) -> Tensor");
  m.def(
      "native_bn_backward(Tensor dy, Tensor x, Tensor y, Tensor? weight, Tensor mean, Tensor var, float eps, "
      "bool training, bool need_dx) -> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)");
  m.def(
      "native_bn_grad_input(Tensor dz, Tensor x, Tensor? weight, Tensor mean, Tensor var, float eps, "
      "Tensor sum_dz, Tensor sum_dz_xhat, Tensor count) -> Tensor");
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("native_bn_stats_", &resfast::cpu::bn_stats_);
  m.impl("native_bn_forward", &resfast::cpu::bn_forward);
  m.impl("native_bn_backward", &resfast::cpu::bn_backward);
  m.impl("native_bn_grad_input", &resfast::cpu::bn_grad_input);
}
