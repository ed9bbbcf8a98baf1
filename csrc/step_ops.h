// The ops over the optimizers' step counters, written once over a Backend (CPU or CUDA) that supplies
//   static void count(const std::vector<at::Tensor>& steps, const std::optional<at::Tensor>& found_inf);
//   template <typename Coef> static at::Tensor table(const std::vector<at::Tensor>& steps,
//       const std::optional<at::Tensor>& lr, Coef coef, int64_t columns);
// count_steps_ adds one to every counter (none on a step GradScaler skips); <op>_coef builds an update's
// whole coefficient table from the counters in one call: on CUDA one launch each, where torch ops take
// one launch per column and per arithmetic step.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "coef_math.h"

namespace resfast {

// Step counters are one-element float32 or float64 tensors (torch's, saved by either optimizer family),
// all on one device.
inline void check_steps(const std::vector<at::Tensor>& steps, const char* op) {
  for (const at::Tensor& step : steps) {
    TORCH_CHECK(step.numel() == 1 && (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble) &&
                    step.device() == steps[0].device(),
                "resfast: ", op, " takes one-element float32/float64 step counters on one device, got ",
                step.sizes(), " ", step.scalar_type(), " on ", step.device());
  }
}

// A tensor lr must be a one-element float32/float64 tensor on the counters' device or the CPU. Returns
// the coefficients with a CPU lr's value filled in (read on the host: no device synchronisation).
template <typename Coef>
Coef with_lr(Coef coef, const std::optional<at::Tensor>& lr, const char* op) {
  if (!lr.has_value()) return coef;
  TORCH_CHECK(lr->numel() == 1 && (lr->scalar_type() == at::kFloat || lr->scalar_type() == at::kDouble),
              "resfast: ", op, ": a tensor lr must have one float32/float64 element, got ", lr->sizes(), " ",
              lr->scalar_type());
  coef.lr_float32 = lr->scalar_type() == at::kFloat;
  if (lr->device().is_cpu()) coef.lr = lr->item<double>();
  return coef;
}

template <typename Backend>
void count_steps_(at::TensorList steps, const std::optional<at::Tensor>& found_inf) {
  const std::vector<at::Tensor> list = steps.vec();
  check_steps(list, "count_steps_");
  TORCH_CHECK(!found_inf.has_value() || found_inf->numel() == 1, "resfast: count_steps_: found_inf must have one element");
  if (!list.empty()) Backend::count(list, found_inf);
}

template <typename Backend>
at::Tensor adam_coef(at::TensorList steps, const std::optional<at::Tensor>& lr, double lr_value, double beta1,
                     double beta2, double eps, double weight_decay, int64_t wd_mode) {
  const std::vector<at::Tensor> list = steps.vec();
  check_steps(list, "adam_coef");
  TORCH_CHECK(wd_mode == AdamMath::kNone || wd_mode == AdamMath::kL2 || wd_mode == AdamMath::kDecoupled,
              "resfast: adam_coef: wd_mode must be 0 (none), 1 (l2) or 2 (decoupled), got ", wd_mode);
  const AdamCoef coef{lr_value, beta1, beta2, eps, weight_decay, static_cast<int>(wd_mode), false};
  return Backend::table(list, lr, with_lr(coef, lr, "adam_coef"), AdamMath::kColumns);
}

template <typename Backend>
at::Tensor adagrad_coef(at::TensorList steps, const std::optional<at::Tensor>& lr, double lr_value,
                        double lr_decay, double weight_decay, double eps) {
  const std::vector<at::Tensor> list = steps.vec();
  check_steps(list, "adagrad_coef");
  const AdagradCoef coef{lr_value, lr_decay, weight_decay, eps, false};
  return Backend::table(list, lr, with_lr(coef, lr, "adagrad_coef"), AdagradMath::kColumns);
}

// The schemas (used inside TORCH_LIBRARY). The tables are new float32 [len(steps), columns] tensors on
// the counters' device, in the column order of the update ops' coef argument.
#define RESFAST_DEFINE_STEP_SCHEMAS(m)                                                                       \
  m.def("count_steps_(Tensor(a!)[] steps, Tensor? found_inf) -> ()");                                        \
  m.def(                                                                                                     \
      "adam_coef(Tensor[] steps, Tensor? lr, float lr_value, float beta1, float beta2, float eps, "          \
      "float weight_decay, int wd_mode) -> Tensor");                                                         \
  m.def(                                                                                                     \
      "adagrad_coef(Tensor[] steps, Tensor? lr, float lr_value, float lr_decay, float weight_decay, "        \
      "float eps) -> Tensor")

#define RESFAST_REGISTER_STEP_OPS(m, Backend)                  \
  m.impl("count_steps_", &resfast::count_steps_<Backend>);     \
  m.impl("adam_coef", &resfast::adam_coef<Backend>);           \
  m.impl("adagrad_coef", &resfast::adagrad_coef<Backend>)

}  // namespace resfast
