// The body of the CUDA optimizer kernel (csrc/cuda/optim.cu): what one block does with one chunk.
//
// Written as a host-device function of (chunk, thread, thread count) so that the same code is also
// compiled for the host (csrc/cpu/cuda_kernel_on_host.cpp) and run by the CPU tests over every
// optimizer, dtype and layout: the table lookup, the coefficient row, the 16-byte vector / scalar
// tail split and the stores are then checked in CI, where no GPU exists. The kernel itself only adds
// the found_inf early exit and blockIdx/threadIdx.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "optim_math.h"
#include "work_table.h"

// Loops over N or a vector's lanes: unrolled by nvcc; the host compiler decides for itself.
#ifdef __CUDACC__
#define RESFAST_UNROLL _Pragma("unroll")
#else
#define RESFAST_UNROLL
#endif

namespace resfast {

// Elements per CUDA block (the work table's chunk) and threads per block. Provisional: to be tuned on
// the GPU.
constexpr int64_t kCudaChunk = 4096;
constexpr int kCudaThreads = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Global-memory accesses. The addresses come from the table as plain integers, so the compiler cannot
// tell that they point to global memory and would emit generic loads and stores (LD.E/ST.E, whose
// address space is resolved at run time); on the device these go through ld/st.global.cg (cached in
// L2 only: each element is read once and written once, L1 would not help). Plain accesses on the host.
template <typename V>
C10_HOST_DEVICE inline V load_global(const V* p) {
#ifdef __CUDA_ARCH__
  static_assert(sizeof(V) == 16 || sizeof(V) == 4 || sizeof(V) == 2, "16-byte vectors or 4/2-byte scalars");
  using Raw = std::conditional_t<sizeof(V) == 16, int4, std::conditional_t<sizeof(V) == 4, unsigned, unsigned short>>;
  const Raw raw = __ldcg(reinterpret_cast<const Raw*>(p));
  V value;
  memcpy(&value, &raw, sizeof(V));
  return value;
#else
  return *p;
#endif
}

template <typename V>
C10_HOST_DEVICE inline void store_global(V* p, const V& value) {
#ifdef __CUDA_ARCH__
  using Raw = std::conditional_t<sizeof(V) == 16, int4, std::conditional_t<sizeof(V) == 4, unsigned, unsigned short>>;
  Raw raw;
  memcpy(&raw, &value, sizeof(V));
  __stcg(reinterpret_cast<Raw*>(p), raw);
#else
  *p = value;
#endif
}

// Updates this thread's share of chunk `index`: the elements thread, thread + n_threads, ... (16-byte
// vectors of them where every tensor of the chunk is 16-byte aligned, then a scalar tail). grad_scale and
// grad_clip: device scalars, or nullptr when the call has none.
template <typename T, int N, typename Math>
C10_HOST_DEVICE inline void update_chunk_share(const int64_t* table, int64_t n_rows, int64_t index,
                                               const float* coef, const float* grad_scale,
                                               const float* grad_clip, bool maximize, const Math& math,
                                               int64_t thread, int64_t n_threads) {
  const ChunkSpan span = locate_chunk<N>(table, n_rows, index, kCudaChunk);
  T* ptr[N];
  bool aligned = true;
RESFAST_UNROLL
  for (int k = 0; k < N; ++k) {
    ptr[k] = reinterpret_cast<T*>(span.row[k]);
    aligned &= reinterpret_cast<uintptr_t>(ptr[k] + span.begin) % 16 == 0;
  }
  // The tensor's coefficient row, in registers for the whole chunk (the stores through ptr could
  // alias a pointer into the table, so the compiler would otherwise reload it for every element).
  float c[Math::kColumns];
  const float* row = coef + span.row[WorkRow<N>::kTensor] * Math::kColumns;
RESFAST_UNROLL
  for (int j = 0; j < Math::kColumns; ++j) c[j] = row[j];
  const GradTransform grad{grad_scale != nullptr, grad_scale != nullptr ? *grad_scale : 1.f, grad_clip != nullptr,
                           grad_clip != nullptr ? *grad_clip : 1.f, maximize};
  const bool scaled = grad.scaled;

  constexpr int V = 16 / sizeof(T);
  int64_t tail = span.begin;
  if (aligned) {
    const int64_t vector_end = span.begin + (span.end - span.begin) / V * V;
    for (int64_t base = span.begin + thread * V; base < vector_end; base += n_threads * V) {
      Vec<T, V> data[N];
RESFAST_UNROLL
      for (int k = 0; k < N; ++k) data[k] = load_global(reinterpret_cast<const Vec<T, V>*>(ptr[k] + base));
RESFAST_UNROLL
      for (int lane = 0; lane < V; ++lane) {
        float r[N];
RESFAST_UNROLL
        for (int k = 0; k < N; ++k) r[k] = static_cast<float>(data[k].v[lane]);
        data[1].v[lane] = static_cast<T>(update_element(r, c, grad, math));
        data[0].v[lane] = static_cast<T>(r[0]);
RESFAST_UNROLL
        for (int k = 2; k < N; ++k) data[k].v[lane] = static_cast<T>(r[k]);
      }
      store_global(reinterpret_cast<Vec<T, V>*>(ptr[0] + base), data[0]);
      if (scaled) store_global(reinterpret_cast<Vec<T, V>*>(ptr[1] + base), data[1]);
RESFAST_UNROLL
      for (int k = 2; k < N; ++k) store_global(reinterpret_cast<Vec<T, V>*>(ptr[k] + base), data[k]);
    }
    tail = vector_end;
  }
  for (int64_t i = tail + thread; i < span.end; i += n_threads) {
    float r[N];
RESFAST_UNROLL
    for (int k = 0; k < N; ++k) r[k] = static_cast<float>(load_global(ptr[k] + i));
    const float unscaled = update_element(r, c, grad, math);
    if (scaled) store_global(ptr[1] + i, static_cast<T>(unscaled));
    store_global(ptr[0] + i, static_cast<T>(r[0]));
RESFAST_UNROLL
    for (int k = 2; k < N; ++k) store_global(ptr[k] + i, static_cast<T>(r[k]));
  }
}

// LARS's norms: the update of a tensor needs its whole param's and grad's sums of squares, so a LARS
// step is two launches over the same work table. The first (lars_norms_share, one block per chunk)
// writes each chunk's two sums to its own row of a [n_chunks] array of SumSq (no atomics); the second
// sums its tensor's rows (lars_parts_share) before updating, in every block of the tensor. Within a
// block the threads' partial sums are added in one fixed order (block_sum in csrc/cuda/optim.cu, and
// its host twin in csrc/cpu/cuda_kernel_on_host.cpp), so every block of a tensor derives the same trust
// ratio, bit for bit, and a run repeats bit for bit. The sums are fp32 (a norm above ~1.8e19 would
// overflow, far beyond any param or grad), each thread's over a few elements or rows, then a tree.
struct SumSq {
  float w, g;  // sum of param², sum of (unscaled) grad²
  C10_HOST_DEVICE SumSq operator+(const SumSq& o) const { return {w + o.w, g + o.g}; }
};

// The fixed order in which a block adds its threads' SumSq: within each warp, halving (thread i adds
// thread i + 16's value, then i + 8's, ..., 1's: what __shfl_down_sync gives), then the same over the
// kWarps warps' sums (i + 4, i + 2, i + 1). The device (block_sum, csrc/cuda/optim.cu) and its host twin
// (csrc/cpu/cuda_kernel_on_host.cpp) both follow it.
constexpr int kWarpSize = 32;
constexpr int kWarps = kCudaThreads / kWarpSize;

// This thread's sums of squares over its share of chunk `index`: elements thread, thread + n_threads, ...
// (16-byte vectors of them where param and grad are aligned, then a scalar tail), the grad unscaled as
// the update unscales it.
template <typename T>
C10_HOST_DEVICE inline SumSq lars_norms_share(const int64_t* table, int64_t n_rows, int64_t index,
                                              const float* grad_scale, int64_t thread, int64_t n_threads) {
  const ChunkSpan span = locate_chunk<3>(table, n_rows, index, kCudaChunk);
  const T* w = reinterpret_cast<const T*>(span.row[0]);
  const T* g = reinterpret_cast<const T*>(span.row[1]);
  const bool scaled = grad_scale != nullptr;
  const float scale = scaled ? *grad_scale : 1.f;
  SumSq sum{0.f, 0.f};
  constexpr int V = 16 / sizeof(T);
  int64_t tail = span.begin;
  if (reinterpret_cast<uintptr_t>(w + span.begin) % 16 == 0 && reinterpret_cast<uintptr_t>(g + span.begin) % 16 == 0) {
    const int64_t vector_end = span.begin + (span.end - span.begin) / V * V;
    for (int64_t base = span.begin + thread * V; base < vector_end; base += n_threads * V) {
      const Vec<T, V> wv = load_global(reinterpret_cast<const Vec<T, V>*>(w + base));
      const Vec<T, V> gv = load_global(reinterpret_cast<const Vec<T, V>*>(g + base));
RESFAST_UNROLL
      for (int lane = 0; lane < V; ++lane) {
        const float wf = static_cast<float>(wv.v[lane]);
        const float gf = scaled ? static_cast<float>(gv.v[lane]) / scale : static_cast<float>(gv.v[lane]);
        sum.w += wf * wf;
        sum.g += gf * gf;
      }
    }
    tail = vector_end;
  }
  for (int64_t i = tail + thread; i < span.end; i += n_threads) {
    const float wf = static_cast<float>(load_global(w + i));
    const float gf = scaled ? static_cast<float>(load_global(g + i)) / scale : static_cast<float>(load_global(g + i));
    sum.w += wf * wf;
    sum.g += gf * gf;
  }
  return sum;
}

// The rows of the norm pass's output that hold the chunks of the tensor in `row` of the work table.
struct PartRange {
  int64_t first, count;
};

C10_HOST_DEVICE inline PartRange lars_parts_of(const int64_t* row) {
  return {row[WorkRow<3>::kFirstChunk], (row[WorkRow<3>::kNumel] + kCudaChunk - 1) / kCudaChunk};
}

// This thread's share of the sum of a tensor's rows: rows thread, thread + n_threads, ... in order.
C10_HOST_DEVICE inline SumSq lars_parts_share(const SumSq* parts, PartRange range, int64_t thread,
                                              int64_t n_threads) {
  SumSq sum{0.f, 0.f};
  for (int64_t j = thread; j < range.count; j += n_threads) sum = sum + parts[range.first + j];
  return sum;
}

}  // namespace resfast
