// Op schemas of resfast's native kernels and the Python module resfast._C.
//
// Every op mutates its tensor lists in place and declares it ((a!) annotations), so torch.compile
// and torch.library.opcheck see the mutation; fake implementations are registered in Python
// (resfast/kernels/cext.py). Kernels: csrc/cpu (CPU dispatch key) and csrc/cuda (CUDA).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>

#include <iterator>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bn_autograd.h"
#include "cpu/optim_kernels.h"
#include "optim_ops.h"
#include "step_ops.h"

TORCH_LIBRARY(resfast, m) {
  RESFAST_DEFINE_OPTIM_SCHEMAS(m);
  RESFAST_DEFINE_STEP_SCHEMAS(m);
}

namespace resfast {

// A kept kernel call of the optimizers' step cache (resfast/optim/_step_cache.py): its params and state
// lists stay on the C++ side, and each step it reads its params' grads itself (load), so that a step
// converts no tensor list from Python (each costs ~0.1 us per tensor, and reading `p.grad` from Python
// creates a Python object for every fresh grad). It reaches the op through a typed dispatcher call: the
// same kernels and checks as torch.ops.resfast.<op>_. The op's flags come with each run, as the group's
// options may change between steps.
// The params are held as their Python objects, and their tensors taken from them at each run: a C++
// reference to a param's tensor would make torch.utils.swap_tensors refuse it (nn.Module conversions
// under swap_module_params_on_conversion). (Internal linkage: it holds pybind11 objects, whose
// namespace is hidden.)
namespace {
class PreparedUpdate {
 public:
  using States = std::vector<std::vector<at::Tensor>>;

  PreparedUpdate(std::string op, const pybind11::list& params, States states)
      : op_(std::move(op)), states_(std::move(states)) {
    const size_t want = op_ == "sgd"       ? 1
                        : op_ == "rmsprop" ? 3
                        : op_ == "adagrad" ? 1
                        : op_ == "adam"    ? 3
                        : op_ == "lars"    ? 1
                                           : 0;
    TORCH_CHECK(want != 0, "resfast: PreparedUpdate: unknown op '", op_, "'");
    TORCH_CHECK(states_.size() == want, "resfast: PreparedUpdate: ", op_, " takes ", want, " state lists, got ",
                states_.size());
    for (const pybind11::handle item : params) {
      TORCH_CHECK(THPVariable_Check(item.ptr()), "resfast: PreparedUpdate: params must be tensors");
      objects_.push_back(pybind11::reinterpret_borrow<pybind11::object>(item));
      addresses_.push_back(THPVariable_Unpack(item.ptr()).data_ptr());
    }
  }

  // This step's grads, read from the params, if the call still fits: `params` (the param group's list)
  // holds exactly this call's param objects, each still at the address it had (`p.data = ...`, a cast, a
  // move or torch.utils.swap_tensors change it), and every grad is strided and shares its param's dtype,
  // device, shape and strides. Else false, and nothing is kept. The C++ twin of
  // resfast.optim._layout.grads_fit for a call that owns its whole group.
  bool load(const pybind11::handle& params) {
    loaded_.reset();
    PyObject* list = params.ptr();
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != static_cast<Py_ssize_t>(objects_.size())) return false;
    std::vector<at::Tensor> grads;
    grads.reserve(objects_.size());
    for (size_t i = 0; i < objects_.size(); ++i) {
      PyObject* item = PyList_GET_ITEM(list, static_cast<Py_ssize_t>(i));
      if (item != objects_[i].ptr()) return false;
      const at::Tensor& p = THPVariable_Unpack(item);
      if (p.data_ptr() != addresses_[i]) return false;
      const at::Tensor& grad = p.grad();
      if (!grad.defined() || grad.layout() != at::kStrided || !same_span(p, grad)) return false;
      grads.push_back(grad);
    }
    loaded_ = std::move(grads);
    return true;
  }

  // The optimizer state the step cache planned this call with: `state_values` (the per-param state dicts
  // in the state's order) and, for every state tensor the call uses, its dict, key and tensor object.
  void watch(const pybind11::list& state_values, const pybind11::list& dicts, const pybind11::list& keys,
             const pybind11::list& tensors) {
    TORCH_CHECK(dicts.size() == keys.size() && keys.size() == tensors.size(),
                "resfast: PreparedUpdate.watch: dicts, keys and tensors must have one length");
    watched_values_.clear();
    watched_.clear();
    for (const pybind11::handle d : state_values) {
      watched_values_.push_back(pybind11::reinterpret_borrow<pybind11::object>(d));
    }
    for (size_t i = 0; i < dicts.size(); ++i) {
      TORCH_CHECK(PyDict_Check(dicts[i].ptr()), "resfast: PreparedUpdate.watch: dicts must be dicts");
      watched_.push_back({dicts[i], keys[i], tensors[i]});
    }
  }

  // Does `state` (the optimizer's state dict) still hold what watch saw: the same per-param dicts in
  // the same order, each holding the same tensor object under each watched key? The step cache's
  // identity checks, at C speed (in Python they cost ~20 us for Adam's 161 params and 3 states each).
  bool holds(const pybind11::handle& state) const {
    PyObject* dict = state.ptr();
    if (!PyDict_Check(dict) || PyDict_Size(dict) != static_cast<Py_ssize_t>(watched_values_.size())) return false;
    Py_ssize_t pos = 0;
    PyObject *key = nullptr, *value = nullptr;
    for (size_t i = 0; PyDict_Next(dict, &pos, &key, &value); ++i) {
      if (value != watched_values_[i].ptr()) return false;
    }
    for (const Watched& w : watched_) {
      // A borrowed reference, or null (no such key, or a key whose hash raised: either way, not held).
      PyObject* found = PyDict_GetItemWithError(w.dict.ptr(), w.key.ptr());
      if (found == nullptr) PyErr_Clear();
      if (found != w.tensor.ptr()) return false;
    }
    return true;
  }

  // Forget loaded grads that will not run (a step that raised before its update): they hold memory.
  void unload() { loaded_.reset(); }

  // One update with this step's `grads`, or (None) the loaded ones, which it releases.
  void run(std::optional<std::vector<at::Tensor>> grads, const at::Tensor& coef,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
           const std::optional<at::Tensor>& grad_clip, bool has_wd, bool nesterov, bool maximize, int64_t wd_mode,
           bool lars_adaptation) {
    if (!grads.has_value()) {
      TORCH_CHECK(loaded_.has_value(), "resfast: PreparedUpdate.run: no grads given and none loaded");
      grads.swap(loaded_);
    }
    const std::vector<at::Tensor>& g = *grads;
    std::vector<at::Tensor> params;
    params.reserve(objects_.size());
    for (const pybind11::object& p : objects_) params.push_back(THPVariable_Unpack(p.ptr()));
    using Optional = const std::optional<at::Tensor>&;
    auto& dispatcher = c10::Dispatcher::singleton();
    const States& s = states_;
    if (op_ == "sgd") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::sgd_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, Optional,
                                       Optional, bool, bool, bool, Optional)>();
      op.call(params, g, s[0], coef, grad_scale, found_inf, has_wd, nesterov, maximize, grad_clip);
    } else if (op_ == "rmsprop") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::rmsprop_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                       const at::Tensor&, Optional, Optional, bool, bool, Optional)>();
      op.call(params, g, s[0], s[1], s[2], coef, grad_scale, found_inf, has_wd, maximize, grad_clip);
    } else if (op_ == "adagrad") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::adagrad_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, Optional,
                                       Optional, bool, bool, Optional)>();
      op.call(params, g, s[0], coef, grad_scale, found_inf, has_wd, maximize, grad_clip);
    } else if (op_ == "lars") {
      static auto op = dispatcher.findSchemaOrThrow("resfast::lars_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, Optional,
                                       Optional, bool, bool, bool, bool, Optional)>();
      op.call(params, g, s[0], coef, grad_scale, found_inf, has_wd, lars_adaptation, nesterov, maximize, grad_clip);
    } else {
      static auto op = dispatcher.findSchemaOrThrow("resfast::adam_", "")
                           .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                       const at::Tensor&, Optional, Optional, int64_t, bool, Optional)>();
      op.call(params, g, s[0], s[1], s[2], coef, grad_scale, found_inf, wd_mode, maximize, grad_clip);
    }
  }

 private:
  std::string op_;
  std::vector<pybind11::object> objects_;  // the params, as Python objects (see above)
  std::vector<void*> addresses_;
  States states_;  // in the op's order; an absent state is an empty list
  std::optional<std::vector<at::Tensor>> loaded_;
  struct Watched {
    pybind11::object dict, key, tensor;
  };
  std::vector<pybind11::object> watched_values_;
  std::vector<Watched> watched_;
};
}  // namespace

// The L2 norm of the grads of every param in `param_lists` (the param groups' lists), for max_grad_norm:
// the grads are read here and handed to the CPU total_norm op, so that a clipped step creates no Python
// object per grad and walks no grad list in Python (~1 us per grad for the reads and checks there).
// Returns whether any param has a grad and, where every grad is a plain strided CPU tensor of a dtype the
// op takes, their norm; else None, and the caller takes torch's general path (other devices, DTensor
// shards and other tensor subclasses, sparse grads).
namespace {
std::tuple<bool, std::optional<at::Tensor>> grads_norm(const pybind11::list& param_lists) {
  std::vector<at::Tensor> grads;
  bool native = true;
  for (const pybind11::handle params : param_lists) {
    TORCH_CHECK(PyList_Check(params.ptr()), "resfast: grads_norm takes lists of params");
    for (const pybind11::handle item : params) {
      TORCH_CHECK(THPVariable_Check(item.ptr()), "resfast: grads_norm: params must be tensors");
      const at::Tensor& grad = THPVariable_Unpack(item.ptr()).grad();
      if (!grad.defined()) continue;
      const at::ScalarType dtype = grad.scalar_type();
      native = native && grad.device().is_cpu() && grad.layout() == at::kStrided &&
               !grad.key_set().has(c10::DispatchKey::Python) &&
               (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf);
      grads.push_back(grad);
    }
  }
  if (grads.empty() || !native) return {!grads.empty(), std::nullopt};
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("resfast::total_norm", "").typed<at::Tensor(at::TensorList)>();
  return {true, op.call(grads)};
}
}  // namespace

// A kept kernel call's step counters, held on the C++ side: counting them and building the coefficient
// tables that depend on them (Adam's, Adagrad's) then converts no tensor list from Python (measured over
// 161 counters on the CPU: count_steps_ 8.3 -> 5.1 us, adam_coef 18.5 -> 13.9 us). The same ops
// through the dispatcher: same checks and kernels as torch.ops.resfast.count_steps_/<op>_coef. The
// step cache reuses a call only while its state holds these same counters.
class StepCounters {
 public:
  explicit StepCounters(std::vector<at::Tensor> steps) : steps_(std::move(steps)) {
    TORCH_CHECK(!steps_.empty(), "resfast: StepCounters: no step counters");
    check_steps(steps_, "StepCounters");
  }

  void count(const std::optional<at::Tensor>& found_inf) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("resfast::count_steps_", "")
                         .typed<void(at::TensorList, const std::optional<at::Tensor>&)>();
    op.call(steps_, found_inf);
  }

  at::Tensor adam_coef(const std::optional<at::Tensor>& lr, double lr_value, double beta1, double beta2, double eps,
                       double weight_decay, int64_t wd_mode) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("resfast::adam_coef", "")
                         .typed<at::Tensor(at::TensorList, const std::optional<at::Tensor>&, double, double, double,
                                           double, double, int64_t)>();
    return op.call(steps_, lr, lr_value, beta1, beta2, eps, weight_decay, wd_mode);
  }

  at::Tensor adagrad_coef(const std::optional<at::Tensor>& lr, double lr_value, double lr_decay, double weight_decay,
                          double eps) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("resfast::adagrad_coef", "")
                         .typed<at::Tensor(at::TensorList, const std::optional<at::Tensor>&, double, double, double,
                                           double)>();
    return op.call(steps_, lr, lr_value, lr_decay, weight_decay, eps);
  }

  size_t size() const { return steps_.size(); }

 private:
  std::vector<at::Tensor> steps_;
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
      .def(pybind11::init<std::string, const pybind11::list&, resfast::PreparedUpdate::States>(),
           pybind11::arg("op"), pybind11::arg("params"), pybind11::arg("states"))
      .def("load", &resfast::PreparedUpdate::load,
           "Read this step's grads from the params if the call still fits its group's `params` list")
      .def("watch", &resfast::PreparedUpdate::watch,
           "Keep the optimizer state this call was planned with (see holds)", pybind11::arg("state_values"),
           pybind11::arg("dicts"), pybind11::arg("keys"), pybind11::arg("tensors"))
      .def("holds", &resfast::PreparedUpdate::holds,
           "Does the optimizer's state still hold the watched per-param dicts and state tensors?",
           pybind11::arg("state"))
      .def("unload", &resfast::PreparedUpdate::unload, "Forget loaded grads that will not run")
      .def("run", &resfast::PreparedUpdate::run,
           "One update with this step's grads (None: the loaded ones), coefficients and flags", pybind11::arg("grads"),
           pybind11::arg("coef"), pybind11::arg("grad_scale"), pybind11::arg("found_inf"),
           pybind11::arg("grad_clip") = pybind11::none(), pybind11::kw_only(), pybind11::arg("has_wd") = false,
           pybind11::arg("nesterov") = false, pybind11::arg("maximize") = false, pybind11::arg("wd_mode") = 0,
           pybind11::arg("lars_adaptation") = false);
  m.def("grads_norm", &resfast::grads_norm,
        "(any grad?, the L2 norm of every param's grad, or None where they are not all plain CPU tensors)",
        pybind11::arg("param_lists"));
  pybind11::class_<resfast::StepCounters>(m, "StepCounters",
                                            "A kept kernel call's step counters, held here for the ops over them")
      .def(pybind11::init<std::vector<at::Tensor>>(), pybind11::arg("steps"))
      .def("count_", &resfast::StepCounters::count, "count_steps_ over the held counters", pybind11::arg("found_inf"))
      .def("adam_coef", &resfast::StepCounters::adam_coef, "adam_coef over the held counters", pybind11::arg("lr"),
           pybind11::arg("lr_value"), pybind11::arg("beta1"), pybind11::arg("beta2"), pybind11::arg("eps"),
           pybind11::arg("weight_decay"), pybind11::arg("wd_mode"))
      .def("adagrad_coef", &resfast::StepCounters::adagrad_coef, "adagrad_coef over the held counters",
           pybind11::arg("lr"), pybind11::arg("lr_value"), pybind11::arg("lr_decay"), pybind11::arg("weight_decay"),
           pybind11::arg("eps"))
      .def("__len__", &resfast::StepCounters::size);
  m.def("bn_add_relu", &resfast::bn_add_relu,
        "relu(batch_norm(x) + residual) on checked inputs through the native ops, with its autograd in C++",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("running_mean"), pybind11::arg("running_var"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("training"), pybind11::arg("momentum"),
        pybind11::arg("eps"));
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
