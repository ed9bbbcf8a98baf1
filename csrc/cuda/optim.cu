// CUDA kernels of the fused optimizer updates: ONE launch updates every tensor of a call.
//
// The host builds the work table (csrc/work_table.h: one row per non-empty tensor with its addresses,
// element count, first chunk and coefficient row); each block takes one chunk of kCudaChunk elements
// and runs csrc/multi_tensor_update.h on it, the body the CPU tests also run compiled for the host.
// The table lives on the device and is reused while the addresses do not change (always, inside a
// CUDA graph). grad_scale / found_inf / grad_clip are read on the device: no host synchronisation.
// Only c10/cuda and the CUDA runtime: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers
// that a minimal CUDA toolkit (nvcc only) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "../multi_tensor_update.h"
#include "../optim_ops.h"
#include "../step_ops.h"

// The fused kernels' storage dtypes (the maths is fp32); anything else is rejected by check_lists.
#define RESFAST_DISPATCH_STORAGE_TYPES(dtype, name, ...) \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace resfast {
namespace {

template <typename T, int N, typename Math>
__global__ void __launch_bounds__(kCudaThreads)
    multi_tensor_update(const int64_t* __restrict__ table, int64_t n_rows, const float* __restrict__ coef,
                        const float* grad_scale, const float* found_inf, const float* grad_clip, bool maximize,
                        Math math) {
  if (found_inf != nullptr && *found_inf != 0.f) return;  // a skipped step touches nothing
  update_chunk_share<T, N>(table, n_rows, blockIdx.x, coef, grad_scale, grad_clip, maximize, math, threadIdx.x,
                           kCudaThreads);
}

// The sum of every thread's `v`, in the order multi_tensor_update.h fixes; valid in thread 0.
__device__ inline SumSq block_sum(SumSq v) {
  __shared__ SumSq warp_sums[kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
RESFAST_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v.w += __shfl_down_sync(0xffffffffu, v.w, offset);
    v.g += __shfl_down_sync(0xffffffffu, v.g, offset);
  }
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : SumSq{0.f, 0.f};
RESFAST_UNROLL
    for (int offset = kWarps / 2; offset > 0; offset /= 2) {
      v.w += __shfl_down_sync(0xffffffffu, v.w, offset);
      v.g += __shfl_down_sync(0xffffffffu, v.g, offset);
    }
  }
  return v;
}

// LARS's first launch: chunk blockIdx.x's sums of squares (param, unscaled grad) into parts[blockIdx.x].
template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    lars_norms(const int64_t* __restrict__ table, int64_t n_rows, const float* grad_scale, const float* found_inf,
               SumSq* __restrict__ parts) {
  if (found_inf != nullptr && *found_inf != 0.f) return;  // the update skips too: nothing reads parts
  const SumSq sum = block_sum(lars_norms_share<T>(table, n_rows, blockIdx.x, grad_scale, threadIdx.x, kCudaThreads));
  if (threadIdx.x == 0) parts[blockIdx.x] = sum;
}

// LARS's update (its second launch, or its only one without adaptation: parts == nullptr): every block
// sums its tensor's rows of `parts` in the same order, derives the tensor's lr * trust, and updates its
// chunk with it.
template <typename T>
__global__ void __launch_bounds__(kCudaThreads)
    lars_update(const int64_t* __restrict__ table, int64_t n_rows, const float* __restrict__ coef,
                const SumSq* __restrict__ parts, const float* grad_scale, const float* found_inf,
                const float* grad_clip, bool maximize, LarsMath math) {
  if (found_inf != nullptr && *found_inf != 0.f) return;  // a skipped step touches nothing
  const ChunkSpan span = locate_chunk<3>(table, n_rows, blockIdx.x, kCudaChunk);
  const float* row = coef + span.row[WorkRow<3>::kTensor] * LarsMath::kColumns;
  if (parts == nullptr) {
    math.scaled_lr = row[LarsMath::kLr];
  } else {
    __shared__ float scaled_lr;
    const SumSq sum = block_sum(lars_parts_share(parts, lars_parts_of(span.row), threadIdx.x, kCudaThreads));
    if (threadIdx.x == 0) scaled_lr = LarsMath::scaled_lr_of(row, sum.w, sum.g, grad_clip != nullptr ? *grad_clip : 1.f);
    __syncthreads();
    math.scaled_lr = scaled_lr;
  }
  update_chunk_share<T, 3>(table, n_rows, blockIdx.x, coef, grad_scale, grad_clip, maximize, math, threadIdx.x,
                           kCudaThreads);
}

// A GradScaler or clip-factor tensor as a float32 one on the params' device (itself when it already is: no copy, no
// launch), or an undefined tensor when absent; data() is then nullptr.
struct DeviceScalar {
  at::Tensor value;
  DeviceScalar(const std::optional<at::Tensor>& t, const at::Device& device) {
    if (t.has_value()) value = t->to(device, at::kFloat);
  }
  const float* data() const { return value.defined() ? value.data_ptr<float>() : nullptr; }
};

// Device tables keyed by their host contents. Reusing one is what makes the step capturable: a graph
// replays the same addresses, and nothing is copied from the host during capture.
class TableCache {
 public:
  std::pair<at::Tensor, int64_t> get(std::vector<int64_t>&& host, int64_t n_chunks, const at::Device& device) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->host == host) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return {it->table, it->n_chunks};
      }
    }
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()), &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
                "resfast: the tensors' addresses changed while capturing a CUDA graph; run one step before "
                "capturing so the work table exists, and keep params, grads and states in place");
    at::Tensor staged = at::empty({static_cast<int64_t>(host.size())}, at::TensorOptions(at::kLong).pinned_memory(true));
    std::copy(host.begin(), host.end(), staged.data_ptr<int64_t>());
    at::Tensor table = staged.to(device, /*non_blocking=*/true);
    entries_.push_front({device, std::move(host), table, n_chunks});
    if (entries_.size() > kMaxEntries) entries_.pop_back();
    return {table, n_chunks};
  }

 private:
  struct Entry {
    at::Device device;
    std::vector<int64_t> host;
    at::Tensor table;
    int64_t n_chunks;
  };
  static constexpr size_t kMaxEntries = 64;
  std::mutex mutex_;
  std::list<Entry> entries_;
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

struct CudaBackend {
  template <int N, typename Math>
  static void apply(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_clip, bool maximize, const Math& math) {
    const at::TensorList params = lists[0];
    if (params.empty()) return;
    WorkTable work = build_work_table<N>(lists, kCudaChunk);
    if (work.n_chunks == 0) return;
    TORCH_CHECK(work.n_chunks < (int64_t(1) << 31), "resfast: too many chunks for one launch: ", work.n_chunks);
    const c10::cuda::CUDAGuard guard(params[0].device());
    auto [table, chunks] = table_cache().get(std::move(work.rows), work.n_chunks, params[0].device());
    // Kept alive until the launch is queued.
    const DeviceScalar scale(grad_scale, params[0].device()), inf(found_inf, params[0].device()),
        clip(grad_clip, params[0].device());
    auto stream = c10::cuda::getCurrentCUDAStream(params[0].device().index());
    RESFAST_DISPATCH_STORAGE_TYPES(params[0].scalar_type(), "resfast_optim_cuda", [&] {
      multi_tensor_update<scalar_t, N, Math><<<static_cast<unsigned>(chunks), kCudaThreads, 0, stream>>>(
          table.data_ptr<int64_t>(), work.n_rows, coef.data_ptr<float>(), scale.data(), inf.data(), clip.data(),
          maximize, math);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // LARS: two launches over one work table with adaptation (the norms, then the update), one without.
  static void lars(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_clip, bool adaptation, bool maximize, const LarsMath& math) {
    const at::TensorList params = lists[0];
    if (params.empty()) return;
    WorkTable work = build_work_table<3>(lists, kCudaChunk);
    if (work.n_chunks == 0) return;
    TORCH_CHECK(work.n_chunks < (int64_t(1) << 31), "resfast: too many chunks for one launch: ", work.n_chunks);
    const at::Device device = params[0].device();
    const c10::cuda::CUDAGuard guard(device);
    auto [table, chunks] = table_cache().get(std::move(work.rows), work.n_chunks, device);
    const DeviceScalar scale(grad_scale, device), inf(found_inf, device), clip(grad_clip, device);
    // One row of two floats (a SumSq) per chunk, from the caching allocator (a captured graph's pool
    // while capturing): no launch, no synchronisation.
    at::Tensor parts;
    if (adaptation) parts = at::empty({chunks, 2}, at::TensorOptions(at::kFloat).device(device));
    SumSq* parts_ptr = adaptation ? reinterpret_cast<SumSq*>(parts.data_ptr<float>()) : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    const auto blocks = static_cast<unsigned>(chunks);
    RESFAST_DISPATCH_STORAGE_TYPES(params[0].scalar_type(), "resfast_lars_cuda", [&] {
      if (adaptation) {
        lars_norms<scalar_t><<<blocks, kCudaThreads, 0, stream>>>(table.data_ptr<int64_t>(), work.n_rows,
                                                                   scale.data(), inf.data(), parts_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      lars_update<scalar_t><<<blocks, kCudaThreads, 0, stream>>>(table.data_ptr<int64_t>(), work.n_rows,
                                                                  coef.data_ptr<float>(), parts_ptr, scale.data(),
                                                                  inf.data(), clip.data(), maximize, math);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

// The step counters' addresses, passed by value as a kernel argument (no host-to-device copy, so a
// CUDA graph can capture the launch): kStepsPerLaunch of them, 2.3 KB of the 4 KB argument limit.
constexpr int kStepsPerLaunch = 256;
struct StepAddresses {
  void* step[kStepsPerLaunch];
  bool is_double[kStepsPerLaunch];
};

__device__ inline double step_value(const StepAddresses& steps, int i) {
  return steps.is_double[i] ? *static_cast<const double*>(steps.step[i]) : *static_cast<const float*>(steps.step[i]);
}

__global__ void count_steps_kernel(StepAddresses steps, int n, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || (found_inf != nullptr && *found_inf != 0.f)) return;
  if (steps.is_double[i]) {
    *static_cast<double*>(steps.step[i]) += 1.0;
  } else {
    *static_cast<float*>(steps.step[i]) += 1.0f;
  }
}

// lr: a device tensor's address (nullptr: coef.lr holds it), float32 or float64.
template <typename Coef>
__global__ void coef_kernel(StepAddresses steps, int n, const void* lr, bool lr_double, Coef coef, int columns,
                            float* rows) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (lr != nullptr) coef.lr = lr_double ? *static_cast<const double*>(lr) : *static_cast<const float*>(lr);
  coef(step_value(steps, i), rows + static_cast<int64_t>(i) * columns);
}

// Calls launch(addresses, count, first) for each group of kStepsPerLaunch counters.
template <typename Launch>
void for_each_step_group(const std::vector<at::Tensor>& steps, Launch launch) {
  const auto n = static_cast<int64_t>(steps.size());
  for (int64_t first = 0; first < n; first += kStepsPerLaunch) {
    const int count = static_cast<int>(std::min<int64_t>(kStepsPerLaunch, n - first));
    StepAddresses addresses{};
    for (int i = 0; i < count; ++i) {
      const at::Tensor& step = steps[first + i];
      addresses.step[i] = step.data_ptr();
      addresses.is_double[i] = step.scalar_type() == at::kDouble;
    }
    launch(addresses, count, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

struct CudaSteps {
  static void count(const std::vector<at::Tensor>& steps, const std::optional<at::Tensor>& found_inf) {
    const at::Device device = steps[0].device();
    TORCH_CHECK(device.is_cuda(), "resfast: count_steps_ on CUDA takes CUDA step counters");
    const c10::cuda::CUDAGuard guard(device);
    at::Tensor inf_t;  // kept alive until the launches are queued
    if (found_inf.has_value()) inf_t = found_inf->to(device, at::kFloat);
    const float* inf_ptr = found_inf.has_value() ? inf_t.data_ptr<float>() : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    for_each_step_group(steps, [&](const StepAddresses& addresses, int count, int64_t) {
      count_steps_kernel<<<1, kStepsPerLaunch, 0, stream>>>(addresses, count, inf_ptr);
    });
  }

  template <typename Coef>
  static at::Tensor table(const std::vector<at::Tensor>& steps, const std::optional<at::Tensor>& lr, Coef coef,
                          int64_t columns) {
    const auto n = static_cast<int64_t>(steps.size());
    if (n == 0) return at::empty({0, columns}, at::TensorOptions(at::kFloat));
    const at::Device device = steps[0].device();
    TORCH_CHECK(device.is_cuda() && (!lr.has_value() || lr->device().is_cpu() || lr->device() == device),
                "resfast: the CUDA coefficient ops take step counters on one CUDA device, and lr there or on the CPU");
    const c10::cuda::CUDAGuard guard(device);
    at::Tensor out = at::empty({n, columns}, at::TensorOptions(at::kFloat).device(device));
    const bool device_lr = lr.has_value() && lr->is_cuda();
    const void* lr_ptr = device_lr ? lr->data_ptr() : nullptr;
    const bool lr_double = device_lr && lr->scalar_type() == at::kDouble;
    auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    for_each_step_group(steps, [&](const StepAddresses& addresses, int count, int64_t first) {
      coef_kernel<<<1, kStepsPerLaunch, 0, stream>>>(addresses, count, lr_ptr, lr_double, coef,
                                                     static_cast<int>(columns), out.data_ptr<float>() + first * columns);
    });
    return out;
  }
};

}  // namespace
}  // namespace resfast

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  RESFAST_REGISTER_OPTIM_OPS(m, resfast::CudaBackend);
  RESFAST_REGISTER_STEP_OPS(m, resfast::CudaSteps);
}
