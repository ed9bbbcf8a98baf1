// CUDA kernels of the fused optimizer updates: ONE launch updates every tensor of a call.
//
// The host writes a table with one row per non-empty tensor: the addresses of its N tensors (param,
// grad, states), its element count and the index of its first chunk. Each block takes one chunk of
// kChunk elements and finds its tensor by binary search over the first-chunk column, so a launch
// covers any number of tensors of any sizes with no kernel-argument limit. The table lives on the
// device and is reused while the addresses do not change (always, inside a CUDA graph). Loads and
// stores are 16-byte vectors where every pointer of the chunk is 16-byte aligned, with a scalar tail;
// offsets are 64-bit. grad_scale / found_inf are read on the device: no host synchronisation.
// Only c10/cuda and the CUDA runtime: ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers
// that a minimal CUDA toolkit (nvcc only) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "../optim_ops.h"

// The fused kernels' storage dtypes (the maths is fp32); anything else is rejected by check_lists.
#define RESFAST_DISPATCH_STORAGE_TYPES(dtype, name, ...) \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace resfast {
namespace {

constexpr int64_t kChunk = 4096;  // elements per block (provisional: to be tuned on the GPU)
constexpr int kThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Row layout of `table`: N addresses, numel, first chunk  (N + 2 int64 values).
template <typename T, int N, typename Math>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_update(const int64_t* __restrict__ table, int64_t n_tensors, const float* __restrict__ coef,
                        int64_t columns, const float* grad_scale, const float* found_inf, bool maximize, Math math) {
  if (found_inf != nullptr && *found_inf != 0.f) return;  // a skipped step touches nothing
  const int64_t chunk = blockIdx.x;
  int64_t lo = 0, hi = n_tensors - 1;  // the last tensor whose first chunk is <= this chunk
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid * (N + 2) + N + 1] <= chunk) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * (N + 2);
  const int64_t begin = (chunk - row[N + 1]) * kChunk;
  const int64_t end = min(begin + kChunk, row[N]);
  T* ptr[N];
  bool aligned = true;
  for (int k = 0; k < N; ++k) {
    ptr[k] = reinterpret_cast<T*>(row[k]);
    aligned &= reinterpret_cast<uintptr_t>(ptr[k] + begin) % 16 == 0;
  }
  const float* c = coef + lo * columns;
  const bool scaled = grad_scale != nullptr;
  const float scale = scaled ? *grad_scale : 1.f;

  constexpr int V = 16 / sizeof(T);
  int64_t tail = begin;
  if (aligned) {
    const int64_t vector_end = begin + (end - begin) / V * V;
    for (int64_t base = begin + threadIdx.x * V; base < vector_end; base += int64_t(kThreads) * V) {
      Vec<T, V> data[N];
      for (int k = 0; k < N; ++k) data[k] = *reinterpret_cast<const Vec<T, V>*>(ptr[k] + base);
#pragma unroll
      for (int lane = 0; lane < V; ++lane) {
        float r[N];
        for (int k = 0; k < N; ++k) r[k] = static_cast<float>(data[k].v[lane]);
        data[1].v[lane] = static_cast<T>(update_element(r, c, scaled, scale, maximize, math));
        data[0].v[lane] = static_cast<T>(r[0]);
        for (int k = 2; k < N; ++k) data[k].v[lane] = static_cast<T>(r[k]);
      }
      *reinterpret_cast<Vec<T, V>*>(ptr[0] + base) = data[0];
      if (scaled) *reinterpret_cast<Vec<T, V>*>(ptr[1] + base) = data[1];
      for (int k = 2; k < N; ++k) *reinterpret_cast<Vec<T, V>*>(ptr[k] + base) = data[k];
    }
    tail = vector_end;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kThreads) {
    float r[N];
    for (int k = 0; k < N; ++k) r[k] = static_cast<float>(ptr[k][i]);
    const float unscaled = update_element(r, c, scaled, scale, maximize, math);
    if (scaled) ptr[1][i] = static_cast<T>(unscaled);
    ptr[0][i] = static_cast<T>(r[0]);
    for (int k = 2; k < N; ++k) ptr[k][i] = static_cast<T>(r[k]);
  }
}

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
                    bool maximize, const Math& math) {
    const at::TensorList params = lists[0];
    if (params.empty()) return;
    std::vector<int64_t> host;
    int64_t n_tensors = 0, n_chunks = 0;
    for (size_t t = 0; t < params.size(); ++t) {
      const int64_t numel = params[t].numel();
      if (numel == 0) continue;  // no chunk, no row: the binary search never lands on it
      for (int k = 0; k < N; ++k) host.push_back(reinterpret_cast<int64_t>(lists[k][t].data_ptr()));
      host.push_back(numel);
      host.push_back(n_chunks);
      n_chunks += (numel + kChunk - 1) / kChunk;
      ++n_tensors;
    }
    if (n_chunks == 0) return;
    TORCH_CHECK(n_chunks < (int64_t(1) << 31), "resfast: too many chunks for one launch: ", n_chunks);
    const c10::cuda::CUDAGuard guard(params[0].device());
    auto [table, chunks] = table_cache().get(std::move(host), n_chunks, params[0].device());
    const float* scale_ptr = nullptr;
    const float* inf_ptr = nullptr;
    at::Tensor scale_t, inf_t;  // keep converted copies alive until the launch is queued
    if (grad_scale.has_value()) {
      scale_t = grad_scale->to(params[0].device(), at::kFloat);
      scale_ptr = scale_t.data_ptr<float>();
    }
    if (found_inf.has_value()) {
      inf_t = found_inf->to(params[0].device(), at::kFloat);
      inf_ptr = inf_t.data_ptr<float>();
    }
    auto stream = c10::cuda::getCurrentCUDAStream(params[0].device().index());
    RESFAST_DISPATCH_STORAGE_TYPES(params[0].scalar_type(), "resfast_optim_cuda", [&] {
      multi_tensor_update<scalar_t, N, Math><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
          table.data_ptr<int64_t>(), n_tensors, coef.data_ptr<float>(), coef.size(1), scale_ptr, inf_ptr, maximize,
          math);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace resfast

TORCH_LIBRARY_IMPL(resfast, CUDA, m) {
  RESFAST_REGISTER_OPTIM_OPS(m, resfast::CudaBackend);
}
