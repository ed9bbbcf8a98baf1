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
#include <cmath>
#include <string>
#include <vector>

#include "../optim_ops.h"
#include "../step_ops.h"
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

auto lars_norms_for_this_cpu() {
#if RESFAST_CPU_X86_VARIANTS
  if (selected_isa() == Isa::Avx512) return &AVX512::lars_norms;
  if (selected_isa() == Isa::Avx2) return &AVX2::lars_norms;
#endif
  return &DEFAULT::lars_norms;
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
                    const std::optional<at::Tensor>& grad_clip, bool maximize, const Math& math) {
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
    const GradTransform grad{grad_scale.has_value(), grad_scale.has_value() ? grad_scale->item<float>() : 1.f,
                             grad_clip.has_value(), grad_clip.has_value() ? grad_clip->item<float>() : 1.f, maximize};
    const Job job{nullptr, 0, storage_of(params[0].scalar_type()), grad};
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

  static void lars(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_clip, bool adaptation, bool maximize,
                   const LarsMath& math);
};

// LARS: a norm pass over all chunks, then the update, each one at::parallel_for over the chunks of
// every tensor of the call. Each chunk's sums of squares are its own (optim_kernels_impl.h) and a
// tensor's are added in chunk order in double, so the trust ratios, and the whole step, do not depend
// on the thread count. Without adaptation the norm pass is skipped.
void CpuBackend::lars(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& grad_clip, bool adaptation, bool maximize,
                      const LarsMath& math) {
  const at::TensorList params = lists[0];
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<float>() != 0.f) return;  // a skipped step touches nothing
  const WorkTable work = build_work_table<3>(lists, kChunk);
  const float* coef_data = coef.const_data_ptr<float>();
  const int64_t n = work.n_chunks;
  std::vector<Chunk> chunks(n);
  std::vector<int64_t> tensor_of(n);  // each chunk's tensor index in the call
  int64_t elements = 0;
  for (int64_t i = 0; i < n; ++i) {
    const ChunkSpan span = locate_chunk<3>(work.rows.data(), work.n_rows, i, kChunk);
    for (int k = 0; k < 3; ++k) chunks[i].data[k] = reinterpret_cast<void*>(span.row[k]);
    tensor_of[i] = span.row[WorkRow<3>::kTensor];
    chunks[i].coef = coef_data + tensor_of[i] * LarsMath::kColumns;
    chunks[i].begin = span.begin;
    chunks[i].end = span.end;
    elements += span.end - span.begin;
  }
  const GradTransform grad{grad_scale.has_value(), grad_scale.has_value() ? grad_scale->item<float>() : 1.f,
                           grad_clip.has_value(), grad_clip.has_value() ? grad_clip->item<float>() : 1.f, maximize};
  const Job job{chunks.data(), n, storage_of(params[0].scalar_type()), grad};
  // Few elements: both passes on this thread (see CpuBackend::apply).
  const int64_t grain = elements < kMinParallelElements ? std::max<int64_t>(n, 1) : 1;

  std::vector<float> scaled_lr(params.size());
  for (size_t t = 0; t < params.size(); ++t) scaled_lr[t] = coef_data[t * LarsMath::kColumns + LarsMath::kLr];
  if (adaptation) {
    std::vector<double> sums(2 * n);
    const auto norms = lars_norms_for_this_cpu();
    at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
      Job part = job;
      part.chunks = chunks.data() + first;
      part.count = last - first;
      norms(part, sums.data() + 2 * first);
    });
    std::vector<double> w_sq(params.size(), 0.0), g_sq(params.size(), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      w_sq[tensor_of[i]] += sums[2 * i];
      g_sq[tensor_of[i]] += sums[2 * i + 1];
    }
    for (size_t t = 0; t < params.size(); ++t) {
      scaled_lr[t] = LarsMath::scaled_lr_of(coef_data + t * LarsMath::kColumns, static_cast<float>(w_sq[t]),
                                            static_cast<float>(g_sq[t]), grad.clip);
    }
  }
  const auto kernel = kernel_for_this_cpu<3, LarsMath>();
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    // One chunk per kernel call: each carries its tensor's lr * trust in its copy of the maths.
    for (int64_t i = first; i < last; ++i) {
      Job one = job;
      one.chunks = chunks.data() + i;
      one.count = 1;
      LarsMath tensor_math = math;
      tensor_math.scaled_lr = scaled_lr[tensor_of[i]];
      kernel(one, tensor_math);
    }
  });
}

// The step counters on the CPU: plain loops (torch's foreach add costs ~1.3 us per counter there).
struct CpuSteps {
  static double value(const at::Tensor& step) {
    return step.scalar_type() == at::kDouble ? *step.data_ptr<double>() : *step.data_ptr<float>();
  }

  static void count(const std::vector<at::Tensor>& steps, const std::optional<at::Tensor>& found_inf) {
    TORCH_CHECK(steps[0].device().is_cpu() && (!found_inf.has_value() || found_inf->device().is_cpu()),
                "resfast: count_steps_ on the CPU takes CPU step counters and found_inf");
    if (found_inf.has_value() && found_inf->item<double>() != 0) return;  // a skipped step counts nothing
    for (const at::Tensor& step : steps) {
      if (step.scalar_type() == at::kDouble) {
        *step.data_ptr<double>() += 1;
      } else {
        *step.data_ptr<float>() += 1;
      }
    }
  }

  template <typename Coef>
  static at::Tensor table(const std::vector<at::Tensor>& steps, const std::optional<at::Tensor>& lr, Coef coef,
                          int64_t columns) {
    const auto n = static_cast<int64_t>(steps.size());
    at::Tensor out = at::empty({n, columns}, at::TensorOptions(at::kFloat));
    if (n == 0) return out;
    TORCH_CHECK(steps[0].device().is_cpu() && (!lr.has_value() || lr->device().is_cpu()),
                "resfast: the CPU coefficient ops take CPU step counters and lr");
    float* rows = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) coef(value(steps[i]), rows + i * columns);
    return out;
  }
};

// Sum of squares of `count` elements, in double: four accumulators for instruction-level parallelism
// (a double sum of fp32 squares does not round away what torch's fp32 norm keeps).
template <typename T>
double sum_of_squares(const T* data, int64_t count) {
  double acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    for (int k = 0; k < 4; ++k) {
      const auto v = static_cast<double>(data[i + k]);
      acc[k] += v * v;
    }
  }
  for (; i < count; ++i) {
    const auto v = static_cast<double>(data[i]);
    acc[0] += v * v;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

}  // namespace

// The L2 norm of all `tensors` together (as torch.nn.utils.get_total_norm computes it, in the dtype it
// returns: their promoted dtype), in one call: torch's CPU foreach norm dispatches one norm per tensor
// (~3 us each: 0.5 ms for ResNet-50's 161 tensors). Sums of squares per chunk in double, run in parallel
// and added in chunk order, so the result does not depend on the thread count. Registered for the CPU
// key only: the dispatcher refuses tensors of other devices and layouts.
at::Tensor total_norm(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "resfast: total_norm: no tensors");
  at::ScalarType dtype = tensors[0].scalar_type();
  std::vector<at::Tensor> dense;  // the tensors, or contiguous copies of those that are not one span
  dense.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16 ||
                    t.scalar_type() == at::kHalf,
                "resfast: total_norm takes float32/float64/bfloat16/float16 tensors, got ", t.scalar_type());
    dtype = at::promote_types(dtype, t.scalar_type());
    dense.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  struct Piece {
    const void* data;
    at::ScalarType dtype;
    int64_t begin, end;
  };
  std::vector<Piece> pieces;
  int64_t elements = 0;
  for (const at::Tensor& t : dense) {
    // A non-overlapping, dense tensor's elements fill [data_ptr, data_ptr + numel) in some order: the
    // order does not matter to a sum.
    for (int64_t begin = 0; begin < t.numel(); begin += kChunk) {
      pieces.push_back({t.const_data_ptr(), t.scalar_type(), begin, std::min(begin + kChunk, t.numel())});
    }
    elements += t.numel();
  }
  std::vector<double> partial(pieces.size());
  const auto n = static_cast<int64_t>(pieces.size());
  const int64_t grain = elements < kMinParallelElements ? std::max<int64_t>(n, 1) : 1;
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const Piece& piece = pieces[i];
      const int64_t count = piece.end - piece.begin;
      switch (piece.dtype) {
        case at::kDouble: partial[i] = sum_of_squares(static_cast<const double*>(piece.data) + piece.begin, count); break;
        case at::kBFloat16:
          partial[i] = sum_of_squares(static_cast<const c10::BFloat16*>(piece.data) + piece.begin, count);
          break;
        case at::kHalf: partial[i] = sum_of_squares(static_cast<const c10::Half*>(piece.data) + piece.begin, count); break;
        default: partial[i] = sum_of_squares(static_cast<const float*>(piece.data) + piece.begin, count); break;
      }
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return at::scalar_tensor(std::sqrt(total), at::TensorOptions(at::kDouble)).to(dtype);
}

const char* kernel_isa_name() {
  switch (selected_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "default";
  }
}

}  // namespace cpu
}  // namespace resfast

TORCH_LIBRARY_FRAGMENT(resfast, m) {
  m.def("total_norm(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(resfast, CPU, m) {
  m.impl("total_norm", &resfast::cpu::total_norm);
  RESFAST_REGISTER_OPTIM_OPS(m, resfast::cpu::CpuBackend);
  RESFAST_REGISTER_STEP_OPS(m, resfast::cpu::CpuSteps);
}
