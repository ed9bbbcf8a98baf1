// The fused optimizer ops for CPU tensors: validation, work split and the choice of instruction set;
// the inner loops are optim_kernels_impl.h.
//
// Work is split into (tensor, chunk) pieces over all tensors of the call and run with
// at::parallel_for, so many small tensors and one huge one parallelise alike. The loop is compiled
// for the baseline here and for AVX2 and AVX-512 in optim_avx2.cpp / optim_avx512.cpp; the build
// matching torch's own choice (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY) runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../optim_ops.h"
#include "../work_table.h"
#include "optim_kernels_impl.h"

namespace resfast {
namespace cpu {

namespace {

enum class Isa { Default, Avx2, Avx512 };

Isa selected_isa() {
#if RESFAST_CPU_X86_VARIANTS
  static const Isa isa = [] {
    const std::string torch_choice = at::get_cpu_capability();
    return torch_choice == "AVX512" ? Isa::Avx512 : torch_choice == "AVX2" ? Isa::Avx2 : Isa::Default;
  }();
  return isa;
#else
  return Isa::Default;
#endif
}

template <int N, typename Math>
auto kernel_for_this_cpu() {
#if RESFAST_CPU_X86_VARIANTS
  if (selected_isa() == Isa::Avx512) return &AVX512::update_chunks<N, Math>;
  if (selected_isa() == Isa::Avx2) return &AVX2::update_chunks<N, Math>;
#endif
  return &DEFAULT::update_chunks<N, Math>;
}

// Elements per chunk: large enough to amortise scheduling, small enough to balance 2-64 cores.
constexpr int64_t kChunk = 1 << 14;
// Below this many elements in a call, one thread updates them all (a few microseconds of work).
constexpr int64_t kMinParallelElements = 1 << 15;

Storage storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return Storage::BFloat16;
    case at::kHalf: return Storage::Half;
    default: return Storage::Float;  // check_lists admits only these three
  }
}

struct CpuBackend {
  template <int N, typename Math>
  static void apply(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    bool maximize, const Math& math) {
    const at::TensorList params = lists[0];
    if (params.empty()) return;
    // On the CPU these reads cost nothing; a skipped step touches no tensor at all.
    if (found_inf.has_value() && found_inf->item<float>() != 0.f) return;
    // The work table and chunk lookup of the CUDA driver (csrc/work_table.h), so that the CPU tests
    // exercise the indexing the GPU runs.
    const WorkTable work = build_work_table<N>(lists, kChunk);
    const float* coef_data = coef.const_data_ptr<float>();
    std::vector<Chunk> chunks(work.n_chunks);
    for (int64_t i = 0; i < work.n_chunks; ++i) {
      const ChunkSpan span = locate_chunk<N>(work.rows.data(), work.n_rows, i, kChunk);
      for (int k = 0; k < N; ++k) chunks[i].data[k] = reinterpret_cast<void*>(span.row[k]);
      chunks[i].coef = coef_data + span.row[WorkRow<N>::kTensor] * Math::kColumns;
      chunks[i].begin = span.begin;
      chunks[i].end = span.end;
    }
    Job job{nullptr, 0, storage_of(params[0].scalar_type()), grad_scale.has_value(), 1.f, maximize};
    if (job.scaled) job.scale = grad_scale->item<float>();
    const auto kernel = kernel_for_this_cpu<N, Math>();
    // A call with little work runs on this thread: starting the parallel region (and waiting for every
    // thread at its end, which on a loaded machine can take milliseconds) would cost more than it saves.
    int64_t elements = 0;
    for (const Chunk& chunk : chunks) elements += chunk.end - chunk.begin;
    const int64_t n = static_cast<int64_t>(chunks.size());
    const int64_t grain = elements < kMinParallelElements ? std::max<int64_t>(n, 1) : 1;
    at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
      Job part = job;
      part.chunks = chunks.data() + first;
      part.count = last - first;
      kernel(part, math);
    });
  }
};

void count_steps_(at::TensorList steps, const std::optional<at::Tensor>& found_inf) {
  for (const at::Tensor& step : steps) {
    TORCH_CHECK(step.device().is_cpu() && step.numel() == 1 && at::isFloatingType(step.scalar_type()),
                "resfast: count_steps_ takes one-element floating-point CPU tensors, got ", step.sizes(), " ",
                step.scalar_type(), " on ", step.device());
  }
  TORCH_CHECK(!found_inf.has_value() || (found_inf->device().is_cpu() && found_inf->numel() == 1),
              "resfast: count_steps_: found_inf must be a one-element CPU tensor");
  if (found_inf.has_value() && found_inf->item<double>() != 0) return;  // a skipped step counts nothing
  for (const at::Tensor& step : steps) {
    AT_DISPATCH_FLOATING_TYPES(step.scalar_type(), "resfast_count_steps", [&] { *step.data_ptr<scalar_t>() += 1; });
  }
}

}  // namespace

const char* kernel_isa_name() {
  switch (selected_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace resfast

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  RESFAST_REGISTER_OPTIM_OPS(m, resfast::cpu::CpuBackend);
  m.impl("count_steps_", &resfast::cpu::count_steps_);
}
