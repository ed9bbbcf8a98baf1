// Op schemas of resfast's native kernels and the Python module resfast._C.
//
// Every op mutates its tensor lists in place and declares it ((a!) annotations), so torch.compile
// and torch.library.opcheck see the mutation; fake implementations are registered in Python
// (resfast/kernels/cext.py). Kernels: csrc/cpu (CPU dispatch key) and csrc/cuda (CUDA).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <iterator>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cpu/optim_kernels.h"
#include "optim_ops.h"
#include "step_ops.h"

TORCH_LIBRARY(resfast, m) {
  RESFAST_DEFINE_OPTIM_SCHEMAS(m);
  RESFAST_DEFINE_STEP_SCHEMAS(m);
}

namespace resfast {

// A kept kernel call of the optimizers' step cache (resfast/optim/_step_cache.py): its params, state
// lists and flags stay on the C++ side, so that a step converts only its grads from Python (each tensor
// list costs ~0.1 us per tensor to convert) and reaches the op through a typed dispatcher call, the
// same kernels and checks as torch.ops.resfast.<op>_.
class PreparedUpdate {
 public:
  using States = std::vector<std::vector<at::Tensor>>;

  PreparedUpdate(std::string op, std::vector<at::Tensor> params, States states, bool has_wd, bool nesterov,
                 bool maximize, int64_t wd_mode, bool lars_adaptation)
      : op_(std::move(op)), params_(std::move(params)), states_(std::move(states)), has_wd_(has_wd),
        nesterov_(nesterov), maximize_(maximize), lars_adaptation_(lars_adaptation), wd_mode_(wd_mode) {
    const size_t want = op_ == "sgd"       ? 1
                        : op_ == "rmsprop" ? 3
                        : op_ == "adagrad" ? 1
                        : op_ == "adam"    ? 3
                        : op_ == "lars"    ? 1
                                           : 0;
    TORCH_CHECK(want != 0, "resfast: PreparedUpdate: unknown op '", op_, "'");
    TORCH_CHECK(states_.size() == want, "resfast: PreparedUpdate: ", op_, " takes ", want, " state lists, got ",
                states_.size());
  }

  void run(const std::vector<at::Tensor>& grads, const at::Tensor& coef, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_clip) const {
    using Optional = const std::optional<at::Tensor>&;
    auto& dispatcher = c10::Dispatcher::singleton();
    const States& s = states_;
    if (op_ == "sgd") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::sgd_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, Optional,
                                       Optional, bool, bool, bool, Optional)>();
      op.call(params_, grads, s[0], coef, grad_scale, found_inf, has_wd_, nesterov_, maximize_, grad_clip);
    } else if (op_ == "rmsprop") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::rmsprop_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                       const at::Tensor&, Optional, Optional, bool, bool, Optional)>();
      op.call(params_, grads, s[0], s[1], s[2], coef, grad_scale, found_inf, has_wd_, maximize_, grad_clip);
    } else if (op_ == "adagrad") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::adagrad_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, Optional,
                                       Optional, bool, bool, Optional)>();
      op.call(params_, grads, s[0], coef, grad_scale, found_inf, has_wd_, maximize_, grad_clip);
    } else if (op_ == "lars") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::lars_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, Optional,
                                       Optional, bool, bool, bool, bool, Optional)>();
      op.call(params_, grads, s[0], coef, grad_scale, found_inf, has_wd_, lars_adaptation_, nesterov_, maximize_,
              grad_clip);
    } else {
      static auto op = dispatcher.findSchemaOrThrow("resfast::adam_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                       const at::Tensor&, Optional, Optional, int64_t, bool, Optional)>();
      op.call(params_, grads, s[0], s[1], s[2], coef, grad_scale, found_inf, wd_mode_, maximize_, grad_clip);
    }
  }

 private:
  std::string op_;
  std::vector<at::Tensor> params_;
  States states_;  // in the op's order; an absent state is an empty list
  bool has_wd_, nesterov_, maximize_, lars_adaptation_;
  int64_t wd_mode_;
};

}  // namespace resfast

template <typename Math>
std::vector<std::string> column_names() {
  return {std::begin(Math::kColumnNames), std::end(Math::kColumnNames)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resfast native kernels; the ops are registered as torch.ops.resfast.*";
  // The torch this was compiled against: resfast.backends refuses a mismatched build instead of crashing.
  m.attr("TORCH_VERSION") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
  m.def("layouts_fit", &resfast::layouts_fit,
        "Per row (a param, then its grad and states): can the fused kernels update it as flat spans?");
  m.def("grads_fit", &resfast::grads_fit,
        "Is every param still at its address, and every grad strided (and, with layout, laid out as its param)?");
  pybind11::class_<resfast::PreparedUpdate>(m, "PreparedUpdate",
                                             "An optimizer op's kernel call whose params and states stay here")
      .def(pybind11::init<std::string, std::vector<at::Tensor>, resfast::PreparedUpdate::States, bool, bool, bool,
                          int64_t, bool>(),
           pybind11::arg("op"), pybind11::arg("params"), pybind11::arg("states"), pybind11::kw_only(),
           pybind11::arg("has_wd") = false, pybind11::arg("nesterov") = false, pybind11::arg("maximize") = false,
           pybind11::arg("wd_mode") = 0, pybind11::arg("lars_adaptation") = false)
      .def("run", &resfast::PreparedUpdate::run, "One update with this step's grads and coefficients",
           pybind11::arg("grads"), pybind11::arg("coef"), pybind11::arg("grad_scale"), pybind11::arg("found_inf"),
           pybind11::arg("grad_clip") = pybind11::none());
  m.def("cpu_kernel_isa", &resfast::cpu::kernel_isa_name,
        "The instruction set the CPU kernels run with on this machine: avx512, avx2 or default");
  // The coefficient columns each op reads, by name, and Adam's weight-decay modes (tests check them
  // against resfast/kernels/optim_spec.py).
  pybind11::dict columns;
  columns["sgd_"] = column_names<resfast::SgdMath>();
  columns["rmsprop_"] = column_names<resfast::RmspropMath>();
  columns["adagrad_"] = column_names<resfast::AdagradMath>();
  columns["adam_"] = column_names<resfast::AdamMath>();
  columns["lars_"] = column_names<resfast::LarsMath>();
  m.attr("COEF_COLUMNS") = columns;
  m.attr("ADAM_WEIGHT_DECAY") =
      pybind11::dict(pybind11::arg("none") = int(resfast::AdamMath::kNone), pybind11::arg("l2") = int(resfast::AdamMath::kL2),
                     pybind11::arg("decoupled") = int(resfast::AdamMath::kDecoupled));
#ifdef RESFAST_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
}
