// The schemas of the native BN ops, written once: defined in the `resfast` library (csrc/bn_ops.cpp)
// and in `resfast_cuda_on_host` (csrc/cpu/bn_cuda_on_host.cpp, the CUDA kernels' bodies run on the
// host for the CPU tests). The maths, and what each output is, in csrc/bn_math.h.
#pragma once

#define RESFAST_DEFINE_BN_SCHEMAS(m)                                                                            \
  m.def(                                                                                                         \
      "native_bn_stats_(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum) "          \
      "-> (Tensor mean, Tensor var)");                                                                           \
  m.def(                                                                                                         \
      "native_bn_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "   \
      "float eps) -> Tensor");                                                                                   \
  m.def(                                                                                                         \
      "native_bn_backward(Tensor dy, Tensor x, Tensor y, Tensor? weight, Tensor mean, Tensor var, float eps, "  \
      "bool training, bool need_dx) -> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)");           \
  m.def(                                                                                                         \
      "native_bn_grad_input(Tensor dz, Tensor x, Tensor? weight, Tensor mean, Tensor var, float eps, "          \
      "Tensor sum_dz, Tensor sum_dz_xhat, Tensor count) -> Tensor")

// Registers a driver's four ops (static member functions of Driver with the schemas' signatures).
#define RESFAST_REGISTER_BN_OPS(m, Driver)                  \
  m.impl("native_bn_stats_", &Driver::stats_);            \
  m.impl("native_bn_forward", &Driver::forward);          \
  m.impl("native_bn_backward", &Driver::backward);        \
  m.impl("native_bn_grad_input", &Driver::grad_input)
