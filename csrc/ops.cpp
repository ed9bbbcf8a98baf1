// Op schemas of resfast's native kernels and the Python module resfast._C.
//
// Every op mutates its tensor lists in place and declares it ((a!) annotations), so torch.compile
// and torch.library.opcheck see the mutation; fake implementations are registered in Python
// (resfast/kernels/cext.py). Kernels: csrc/cpu (CPU dispatch key) and csrc/cuda (CUDA).
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <iterator>
#include <string>
#include <vector>

#include "cpu/optim_kernels.h"
#include "optim_ops.h"

TORCH_LIBRARY(resfast, m) {
  RESFAST_DEFINE_OPTIM_SCHEMAS(m);
  // Every step counter += 1, except on a step GradScaler skips (found_inf != 0). CPU only: there torch's
  // foreach add costs ~1.3 us per tensor; on CUDA it is one launch already.
  m.def("count_steps_(Tensor(a!)[] steps, Tensor? found_inf) -> ()");
}

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
        "Does every grad share its param's dtype, device, shape and strides (and is it strided)?");
  m.def("cpu_kernel_isa", &resfast::cpu::kernel_isa_name,
        "The instruction set the CPU kernels run with on this machine: avx512, avx2 or default");
  // The coefficient columns each op reads, by name, and Adam's weight-decay modes (tests check them
  // against resfast/kernels/optim_spec.py).
  pybind11::dict columns;
  columns["sgd_"] = column_names<resfast::SgdMath>();
  columns["rmsprop_"] = column_names<resfast::RmspropMath>();
  columns["adagrad_"] = column_names<resfast::AdagradMath>();
  columns["adam_"] = column_names<resfast::AdamMath>();
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
