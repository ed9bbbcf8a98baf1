// The CPU optimizer inner loop, written once over ATen's SIMD vector of floats and compiled once per
// instruction set: optim.cpp (the baseline), optim_avx2.cpp and optim_avx512.cpp. Each defines
// CPU_CAPABILITY (and CPU_CAPABILITY_AVX2 / _AVX512, which select ATen's intrinsics) before including
// this, so that every build lands in its own namespace, the scheme ATen uses for its own kernels.
//
// One pass: every element of param, grad and states is read once and written once. bf16/fp16 are
// widened to fp32 on load and rounded to nearest-even on store (ATen's conversions); the maths is
// csrc/optim_math.h, the same as the CUDA kernels'.
#pragma once

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "optim_kernels.h"

namespace resfast {

template <>
struct Elementwise<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  static Vec sqrt(const Vec& x) { return x.sqrt(); }
  static Vec max_propagate_nan(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }  // NaN-propagating
};

namespace cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;

// Updates `count` elements from offset e (a full vector step, or the chunk's tail): load each tensor's
// elements as fp32 vectors, update, store back. The storage vector of a 16-bit dtype holds two fp32
// vectors' worth of elements.
template <typename scalar_t, int N, typename Math>
inline void update_block(scalar_t* const (&ptr)[N], int64_t e, int64_t count, const float* c,
                         const GradTransform& grad, const Math& math) {
  const bool scaled = grad.scaled;
  if constexpr (std::is_same_v<scalar_t, float>) {
    Vec r[N];
    for (int k = 0; k < N; ++k) r[k] = Vec::loadu(ptr[k] + e, count);
    const Vec unscaled = update_element(r, c, grad, math);
    if (scaled) unscaled.store(ptr[1] + e, count);
    r[0].store(ptr[0] + e, count);
    for (int k = 2; k < N; ++k) r[k].store(ptr[k] + e, count);
  } else {
    using Stored = at::vec::Vectorized<scalar_t>;
    Vec lo[N], hi[N];
    for (int k = 0; k < N; ++k) {
      std::tie(lo[k], hi[k]) = at::vec::convert_to_float<scalar_t>(Stored::loadu(ptr[k] + e, count));
    }
    const Vec unscaled_lo = update_element(lo, c, grad, math);
    const Vec unscaled_hi = update_element(hi, c, grad, math);
    const int n = static_cast<int>(count);
    if (scaled) at::vec::convert_from_float<scalar_t>(unscaled_lo, unscaled_hi).store(ptr[1] + e, n);
    at::vec::convert_from_float<scalar_t>(lo[0], hi[0]).store(ptr[0] + e, n);
    for (int k = 2; k < N; ++k) at::vec::convert_from_float<scalar_t>(lo[k], hi[k]).store(ptr[k] + e, n);
  }
}

template <typename scalar_t, int N, typename Math>
void update_chunk(const Chunk& chunk, const Job& job, const Math& math) {
  scalar_t* ptr[N];
  for (int k = 0; k < N; ++k) ptr[k] = static_cast<scalar_t*>(chunk.data[k]);
  // Private copies of the coefficients and options: the compiler cannot prove the table, the job or
  // the maths apart from the tensors the loop stores to, and would reload them at every vector step.
  float c[Math::kColumns];
  std::copy(chunk.coef, chunk.coef + Math::kColumns, c);
  const GradTransform grad = job.grad;
  const Math m = math;
  constexpr int64_t step = std::is_same_v<scalar_t, float> ? Vec::size() : 2 * Vec::size();
  int64_t e = chunk.begin;
  for (; e + step <= chunk.end; e += step) update_block(ptr, e, step, c, grad, m);
  if (e < chunk.end) update_block(ptr, e, chunk.end - e, c, grad, m);
}

// LARS's sums of squares over one chunk. Each block of kNormBlock elements is summed in fp32 vector
// lanes (a few dozen terms per lane), and the blocks' lanes are added in index order in double: the
// result depends only on the chunk, not on the thread that runs it, so a step repeats bit for bit
// whatever the thread count. The grad is unscaled as update_element unscales it (a per-element
// division: dividing the sum by scale² instead could overflow fp32 on large scaled grads).
constexpr int64_t kNormBlock = 1024;

// Adds the squares of the first `count` lanes of w and g (the grad unscaled) to the accumulators.
inline void add_squares(Vec w, Vec g, int64_t count, bool scaled, const Vec& scale, Vec& w_acc, Vec& g_acc) {
  if (count < Vec::size()) {
    const Vec zero(0.f);
    w = Vec::set(zero, w, count);
    g = Vec::set(zero, g, count);
  }
  if (scaled) g = g / scale;
  w_acc = at::vec::fmadd(w, w, w_acc);
  g_acc = at::vec::fmadd(g, g, g_acc);
}

inline double lane_sum(const Vec& acc) {
  __at_align__ float lanes[Vec::size()];
  acc.store(lanes);
  double sum = 0.0;
  for (int i = 0; i < Vec::size(); ++i) sum += lanes[i];
  return sum;
}

template <typename scalar_t>
void chunk_sums(const Chunk& chunk, const Job& job, double* out) {
  const scalar_t* w = static_cast<const scalar_t*>(chunk.data[0]);
  const scalar_t* g = static_cast<const scalar_t*>(chunk.data[1]);
  const bool scaled = job.grad.scaled;
  const Vec scale(job.grad.scale);
  constexpr int64_t step = std::is_same_v<scalar_t, float> ? Vec::size() : 2 * Vec::size();
  double w_total = 0.0, g_total = 0.0;
  for (int64_t block = chunk.begin; block < chunk.end; block += kNormBlock) {
    const int64_t block_end = std::min(block + kNormBlock, chunk.end);
    Vec w_acc(0.f), g_acc(0.f);
    for (int64_t e = block; e < block_end; e += step) {
      const int64_t count = std::min(step, block_end - e);
      if constexpr (std::is_same_v<scalar_t, float>) {
        add_squares(Vec::loadu(w + e, count), Vec::loadu(g + e, count), count, scaled, scale, w_acc, g_acc);
      } else {
        using Stored = at::vec::Vectorized<scalar_t>;
        const auto [w_lo, w_hi] = at::vec::convert_to_float<scalar_t>(Stored::loadu(w + e, count));
        const auto [g_lo, g_hi] = at::vec::convert_to_float<scalar_t>(Stored::loadu(g + e, count));
        const int64_t lo = std::min<int64_t>(count, Vec::size());
        add_squares(w_lo, g_lo, lo, scaled, scale, w_acc, g_acc);
        if (count > lo) add_squares(w_hi, g_hi, count - lo, scaled, scale, w_acc, g_acc);
      }
    }
    w_total += lane_sum(w_acc);
    g_total += lane_sum(g_acc);
  }
  out[0] = w_total;
  out[1] = g_total;
}

}  // namespace

void lars_norms(const Job& job, double* sums) {
  for (int64_t i = 0; i < job.count; ++i) {
    const Chunk& chunk = job.chunks[i];
    switch (job.storage) {
      case Storage::Float: chunk_sums<float>(chunk, job, sums + 2 * i); break;
      case Storage::BFloat16: chunk_sums<c10::BFloat16>(chunk, job, sums + 2 * i); break;
      case Storage::Half: chunk_sums<c10::Half>(chunk, job, sums + 2 * i); break;
    }
  }
}

template <int N, typename Math>
void update_chunks(const Job& job, const Math& math) {
  for (int64_t i = 0; i < job.count; ++i) {
    const Chunk& chunk = job.chunks[i];
    switch (job.storage) {
      case Storage::Float: update_chunk<float, N>(chunk, job, math); break;
      case Storage::BFloat16: update_chunk<c10::BFloat16, N>(chunk, job, math); break;
      case Storage::Half: update_chunk<c10::Half, N>(chunk, job, math); break;
    }
  }
}

#define RESFAST_INSTANTIATE_CPU_KERNEL(N, Math) template void update_chunks<N, Math>(const Job&, const Math&);
RESFAST_FOR_EACH_CPU_KERNEL(RESFAST_INSTANTIATE_CPU_KERNEL)
#undef RESFAST_INSTANTIATE_CPU_KERNEL

}  // namespace cpu::CPU_CAPABILITY
}  // namespace resfast
