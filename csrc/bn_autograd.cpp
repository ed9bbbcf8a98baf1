// The eager training path of the native fused BN + add + ReLU with its autograd in C++: one call from
// Python per layer (resfast._C.bn_add_relu), which runs the statistics op and a torch::autograd::Function
// whose forward and backward call the native ops (csrc/bn_schemas.h) through the dispatcher, so they run
// on the tensors' device (CPU, or CUDA where built). It replaces a Python autograd.Function whose
// checks, context and backward node cost tens of microseconds of host time per layer and step.
//
// Same saved tensors and gradients as resfast/nn/functional.py's _EagerBatchNormAddReLU (the reference
// for this path): x and y are saved (y > 0 is ReLU's mask), with the (C,) statistics x was normalised
// with; dweight and dbias come back in the parameters' dtypes; a second differentiation raises, as
// @once_differentiable makes the Python one raise. The inputs were checked in Python beforehand
// (resfast.nn.functional.check_inputs).
#include "bn_autograd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace resfast {
namespace {

using Optional = const std::optional<at::Tensor>&;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> stats_op(const at::Tensor& x, Optional running_mean, Optional running_var,
                                            double momentum) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resfast::native_bn_stats_", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, Optional, Optional, double)>();
  return op.call(x, running_mean, running_var, momentum);
}

at::Tensor forward_op(const at::Tensor& x, Optional residual, Optional weight, Optional bias, const at::Tensor& mean,
                      const at::Tensor& var, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("resfast::native_bn_forward", "")
                       .typed<at::Tensor(const at::Tensor&, Optional, Optional, Optional, const at::Tensor&,
                                         const at::Tensor&, double)>();
  return op.call(x, residual, weight, bias, mean, var, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dy, const at::Tensor& x,
                                                                       const at::Tensor& y, Optional weight,
                                                                       const at::Tensor& mean, const at::Tensor& var,
                                                                       double eps, bool training, bool need_dx) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resfast::native_bn_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, Optional, const at::Tensor&,
              const at::Tensor&, double, bool, bool)>();
  return op.call(dy, x, y, weight, mean, var, eps, training, need_dx);
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Gradients that refuse to be differentiated again: what @once_differentiable does in Python (aliases
// whose grad_fn raises when a backward reaches it).
variable_list once_differentiable(variable_list grads) {
  variable_list aliases;
  for (const at::Tensor& g : grads) {
    if (!g.defined()) {
      aliases.emplace_back();
      continue;
    }
    at::Tensor alias = g.detach();
    alias.set_requires_grad(true);
    aliases.push_back(alias);
  }
  const auto error = std::make_shared<torch::autograd::DelayedError>(
      "trying to differentiate twice a function that was marked with @once_differentiable",
      static_cast<int64_t>(aliases.size()));
  return (*error)(std::move(aliases));
}

class BnAddRelu : public torch::autograd::Function<BnAddRelu> {
 public:
  // The variable inputs (edges) are x, then residual, weight and bias where given, then mean and var.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, Optional residual, Optional weight,
                            Optional bias, const at::Tensor& mean, const at::Tensor& var, double eps, bool training) {
    at::Tensor y = forward_op(x, residual, weight, bias, mean, var, eps);
    ctx->save_for_backward({x, y, weight.value_or(at::Tensor()), mean, var});
    int64_t edge = 1;
    ctx->saved_data["residual_edge"] = residual.has_value() ? edge++ : int64_t(-1);
    ctx->saved_data["weight_edge"] = weight.has_value() ? edge++ : int64_t(-1);
    ctx->saved_data["bias_edge"] = bias.has_value() ? edge++ : int64_t(-1);
    ctx->saved_data["bias_dtype"] = bias.has_value() ? int64_t(bias->scalar_type()) : int64_t(-1);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1], &weight = saved[2], &mean = saved[3], &var = saved[4];
    const at::Tensor& dy = grad_outputs[0];
    const auto needs = [&](const char* key) {
      const int64_t edge = ctx->saved_data[key].toInt();
      return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge));
    };
    const bool need_x = ctx->needs_input_grad(0), need_residual = needs("residual_edge");
    const bool need_weight = needs("weight_edge"), need_bias = needs("bias_edge");
    // One gradient per forward argument: x, residual, weight, bias, mean, var, eps, training.
    variable_list grads(8);
    if (!dy.defined()) return grads;  // the output was not used
    auto [dx, dz, dweight, dbias] =
        backward_op(dy, x, y, defined_or_none(weight), mean, var, ctx->saved_data["eps"].toDouble(),
                    ctx->saved_data["training"].toBool(), need_x);
    if (need_x) grads[0] = dx;
    if (need_residual) grads[1] = dz;
    if (need_weight) grads[2] = dweight.to(weight.scalar_type());
    if (need_bias) grads[3] = dbias.to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
    // A backward with create_graph runs with grad mode on.
    return at::GradMode::is_enabled() ? once_differentiable(std::move(grads)) : grads;
  }
};

}  // namespace

at::Tensor bn_add_relu(const at::Tensor& x, Optional residual, Optional running_mean, Optional running_var,
                       Optional weight, Optional bias, bool training, double momentum, double eps) {
  at::Tensor mean, var;
  if (training) {
    std::tie(mean, var) = stats_op(x.detach(), running_mean, running_var, momentum);
    // The kernel wrote the running stats behind autograd's back: bump their versions as an in-place op
    // would, so that a graph which saved them (an earlier eval forward) refuses to run backward.
    for (const std::optional<at::Tensor>& t : {running_mean, running_var}) {
      if (t.has_value()) torch::autograd::impl::bump_version(*t);
    }
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                "resfast: bn_add_relu: running_mean and running_var are needed in evaluation mode");
    mean = *running_mean;
    var = *running_var;
  }
  return BnAddRelu::apply(x, residual, weight, bias, mean, var, eps, training);
}

}  // namespace resfast
