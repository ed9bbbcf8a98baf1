// The CUDA optimizer kernel's body (csrc/multi_tensor_update.h) compiled for the host, as the ops
// torch.ops.resfast_cuda_on_host.{sgd_,rmsprop_,adagrad_,adam_,lars_} on CPU tensors: a verification aid,
// not a backend. Every block of the launch and every thread of a block runs in turn, on one core, over
// the same work table the CUDA driver builds, so the CPU tests (tests/test_cuda_kernel_on_host.py)
// check the table, the chunk lookup, the coefficient rows and the vector/tail split that the GPU runs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../multi_tensor_update.h"
#include "../optim_ops.h"
#include "host_fma.h"

namespace resfast {
namespace {

// block_sum of csrc/cuda/optim.cu on the host: the threads' values v[0..kCudaThreads) added in the
// order multi_tensor_update.h fixes (halving within each warp, then over the warps' sums).
SumSq block_sum_on_host(std::vector<SumSq>& v) {
  const auto halve = [](SumSq* x, int n) {
    for (int offset = n / 2; offset > 0; offset /= 2) {
      for (int i = 0; i < offset; ++i) x[i] = x[i] + x[i + offset];
    }
  };
  SumSq warp_sums[kWarps];
  for (int warp = 0; warp < kWarps; ++warp) {
    halve(v.data() + warp * kWarpSize, kWarpSize);
    warp_sums[warp] = v[warp * kWarpSize];
  }
  halve(warp_sums, kWarps);
  return warp_sums[0];
}

struct CudaKernelOnHost {
  template <typename T, int N, typename Math>
  RESFAST_HOST_FMA static void run_launch(const WorkTable& work, const float* coef, const float* scale,
                                          const float* clip, bool maximize, const Math& math) {
    for (int64_t block = 0; block < work.n_chunks; ++block) {
      for (int thread = 0; thread < kCudaThreads; ++thread) {
        update_chunk_share<T, N>(work.rows.data(), work.n_rows, block, coef, scale, clip, maximize, math, thread,
                                 kCudaThreads);
      }
    }
  }

  // The two launches of CudaBackend::lars (csrc/cuda/optim.cu), block by block and thread by thread.
  template <typename T>
  RESFAST_HOST_FMA static void run_lars(const WorkTable& work, const float* coef, const float* scale,
                                        const float* clip, bool adaptation, bool maximize, LarsMath math) {
    std::vector<SumSq> parts(adaptation ? work.n_chunks : 0), threads(kCudaThreads);
    for (int64_t block = 0; block < static_cast<int64_t>(parts.size()); ++block) {
      for (int thread = 0; thread < kCudaThreads; ++thread) {
        threads[thread] = lars_norms_share<T>(work.rows.data(), work.n_rows, block, scale, thread, kCudaThreads);
      }
      parts[block] = block_sum_on_host(threads);
    }
    for (int64_t block = 0; block < work.n_chunks; ++block) {
      const ChunkSpan span = locate_chunk<3>(work.rows.data(), work.n_rows, block, kCudaChunk);
      const float* row = coef + span.row[WorkRow<3>::kTensor] * LarsMath::kColumns;
      math.scaled_lr = row[LarsMath::kLr];
      if (adaptation) {
        for (int thread = 0; thread < kCudaThreads; ++thread) {
          threads[thread] = lars_parts_share(parts.data(), lars_parts_of(span.row), thread, kCudaThreads);
        }
        const SumSq sum = block_sum_on_host(threads);
        math.scaled_lr = LarsMath::scaled_lr_of(row, sum.w, sum.g, clip != nullptr ? *clip : 1.f);
      }
      for (int thread = 0; thread < kCudaThreads; ++thread) {
        update_chunk_share<T, 3>(work.rows.data(), work.n_rows, block, coef, scale, clip, maximize, math, thread,
                                 kCudaThreads);
      }
    }
  }

  // What every entry point does before its kernels: the FMA check, GradScaler's skip, the work table,
  // the scale, clip and coefficient pointers; then run(T{}, work, coef, scale, clip) for the params'
  // storage type T.
  template <int N, typename Run>
  static void on_host(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& grad_clip, Run&& run) {
    const at::TensorList params = lists[0];
    TORCH_CHECK(host_has_fma(), "resfast_cuda_on_host: this CPU has no FMA instructions, which the GPU's "
                "arithmetic needs to be reproduced");
    if (params.empty() || (found_inf.has_value() && found_inf->item<float>() != 0.f)) return;
    const WorkTable work = build_work_table<N>(lists, kCudaChunk);
    const at::Tensor scale = grad_scale.has_value() ? grad_scale->to(at::kFloat).contiguous() : at::Tensor();
    const float* scale_ptr = grad_scale.has_value() ? scale.const_data_ptr<float>() : nullptr;
    const at::Tensor clip = grad_clip.has_value() ? grad_clip->to(at::kFloat).contiguous() : at::Tensor();
    const float* clip_ptr = grad_clip.has_value() ? clip.const_data_ptr<float>() : nullptr;
    const float* coef_ptr = coef.const_data_ptr<float>();
    switch (params[0].scalar_type()) {  // check_lists admits only these three
      case at::kBFloat16: return run(c10::BFloat16{}, work, coef_ptr, scale_ptr, clip_ptr);
      case at::kHalf: return run(c10::Half{}, work, coef_ptr, scale_ptr, clip_ptr);
      default: return run(float{}, work, coef_ptr, scale_ptr, clip_ptr);
    }
  }

  static void lars(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_clip, bool adaptation, bool maximize, const LarsMath& math) {
    on_host<3>(lists, coef, grad_scale, found_inf, grad_clip,
               [&](auto value, const WorkTable& work, const float* coef_ptr, const float* scale, const float* clip) {
                 run_lars<decltype(value)>(work, coef_ptr, scale, clip, adaptation, maximize, math);
               });
  }

  template <int N, typename Math>
  static void apply(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_clip, bool maximize, const Math& math) {
    on_host<N>(lists, coef, grad_scale, found_inf, grad_clip,
               [&](auto value, const WorkTable& work, const float* coef_ptr, const float* scale, const float* clip) {
                 run_launch<decltype(value), N>(work, coef_ptr, scale, clip, maximize, math);
               });
  }
};

}  // namespace
}  // namespace resfast

TORCH_LIBRARY(resfast_cuda_on_host, m) {
  RESFAST_DEFINE_OPTIM_SCHEMAS(m);
}

TORCH_LIBRARY_IMPL(resfast_cuda_on_host, CPU, m) {
  RESFAST_REGISTER_OPTIM_OPS(m, resfast::CudaKernelOnHost);
}
