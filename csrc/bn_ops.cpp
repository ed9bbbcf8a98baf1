// Op schemas of the native fused BatchNorm + add + ReLU (csrc/bn_schemas.h) and their CPU
// implementations (csrc/cpu/bn.cpp); the CUDA ones are registered by csrc/cuda/bn.cu. A fragment of the
// `resfast` library that csrc/ops.cpp defines. Fake implementations are registered in Python
// (resfast/kernels/native_bn.py). The maths, and what each output is, in csrc/bn_math.h.
//
// The ops mirror resfast/kernels/reference_bn.py's functions; names carry `native_` because the
// differentiable ops that resfast.nn.functional registers (bn_stats, bn_add_relu_fwd, ...) call the
// kernels of any backend, these included. Only native_bn_stats_ mutates (the running statistics).
#include <torch/library.h>

#include "bn_schemas.h"
#include "cpu/bn.h"

TORCH_LIBRARY_FRAGMENT(resfast, m) {
  RESFAST_DEFINE_BN_SCHEMAS(m);
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("native_bn_stats_", &resfast::cpu::bn_stats_);
  m.impl("native_bn_forward", &resfast::cpu::bn_forward);
  m.impl("native_bn_backward", &resfast::cpu::bn_backward);
  m.impl("native_bn_grad_input", &resfast::cpu::bn_grad_input);
}
