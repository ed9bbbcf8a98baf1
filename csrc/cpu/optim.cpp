// C++ kernels of the fused optimizer updates for CPU tensors.
//
// One pass per tensor: every element of param, grad and states is read once and written once. Work
// is split into (tensor, chunk) tasks over all tensors of the call and run with at::parallel_for, so
// many small tensors and one huge one parallelise alike. The inner loop is straight-line fp32 maths
// over contiguous memory with the number of tensors a compile-time constant, which the compiler
// vectorises (-O3); bf16/fp16 are converted on load and rounded to nearest-even on store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "../optim_ops.h"

namespace resfast {
namespace {

// Elements per parallel task: large enough to amortise scheduling, small enough to balance 2-64 cores.
constexpr int64_t kChunk = 1 << 14;

struct Task {
  int64_t tensor, begin, end;
};

template <typename scalar_t, int N, typename Math>
void update_tensors(const std::vector<at::TensorList>& lists, const at::Tensor& coef, bool scaled, float scale,
                    bool maximize, const Math& math) {
  const at::TensorList params = lists[0];
  std::vector<Task> tasks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) tasks.push_back({static_cast<int64_t>(t), b, std::min(b + kChunk, n)});
  }
  const float* coef_data = coef.data_ptr<float>();
  const int64_t columns = coef.size(1);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const Task& task = tasks[i];
      std::array<scalar_t*, N> ptr;
      for (int k = 0; k < N; ++k) ptr[k] = lists[k][task.tensor].data_ptr<scalar_t>();
      const float* c = coef_data + task.tensor * columns;
      for (int64_t e = task.begin; e < task.end; ++e) {
        float r[N];
        for (int k = 0; k < N; ++k) r[k] = static_cast<float>(ptr[k][e]);
        const float unscaled = update_element(r, c, scaled, scale, maximize, math);
        if (scaled) ptr[1][e] = static_cast<scalar_t>(unscaled);
        ptr[0][e] = static_cast<scalar_t>(r[0]);
        for (int k = 2; k < N; ++k) ptr[k][e] = static_cast<scalar_t>(r[k]);
      }
    }
  });
}

struct CpuBackend {
  template <int N, typename Math>
  static void apply(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    bool maximize, const Math& math) {
    if (lists[0].empty()) return;
    // On the CPU these reads cost nothing; a skipped step touches no tensor at all.
    if (found_inf.has_value() && found_inf->item<float>() != 0.f) return;
    const bool scaled = grad_scale.has_value();
    const float scale = scaled ? grad_scale->item<float>() : 1.f;
    RESFAST_DISPATCH_STORAGE_TYPES(lists[0][0].scalar_type(), "resfast_optim_cpu", [&] {
      update_tensors<scalar_t, N>(lists, coef, scaled, scale, maximize, math);
    });
  }
};

}  // namespace
}  // namespace resfast

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  RESFAST_REGISTER_OPTIM_OPS(m, resfast::CpuBackend);
}
