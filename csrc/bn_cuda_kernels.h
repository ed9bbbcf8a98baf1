// The bodies of the CUDA kernels of the fused BN + add + ReLU (csrc/cuda/bn.cu): what one thread of
// one block does, written as C10_HOST_DEVICE code so that the same bodies also run on the host
// (csrc/cpu/bn_cuda_on_host.cpp, torch.ops.resfast_cuda_on_host.native_bn_*), where the CPU tests
// check the GPU's indexing, vector/scalar split, reductions and merge order on every CI run.
//
// A kernel is a sequence of phases separated by block-wide barriers: the device runs
//     for phase: { run(phase, blockIdx.x, threadIdx.x, shared); __syncthreads(); }
// and the host runs, per block, every thread of a phase before the next phase. Threads talk to each
// other only through `shared` between phases (nothing is kept in locals across a barrier), so both
// orders compute the same thing. run() returns false, for every thread of a block alike, when the
// block has nothing left to do.
//
// Layout (csrc/bn_plan.h): every tensor as (N, C, S) with one memory-contiguous axis. A block works
// on one item = (group, chunk j of the outer index q = n * S + s):
// - channels-first: group = a channel; the block's 256 threads walk the chunk's q in vectors of V
//   consecutive spatial values (16 bytes), thread t taking vectors t, t + 256, ...
// - channels-last: group = a tile of `lanes * V` channels (at most 32); thread t = row * lanes + lane
//   takes channels [lane * V, lane * V + V) of the tile at positions q0 + row, q0 + row + rows, ...
// Each thread loads several vectors (its slots: bn_slots(V), kBnStatsSlots in the statistics) before
// using them, to have several loads in flight. V = 1 (scalar accesses) when a run or a channel row is
// not made of whole aligned 16-byte vectors.
//
// Reductions are deterministic: a thread reduces its values in a fixed order; a block merges its
// threads by a fixed tree in shared memory and writes one partial result per (chunk, channel); the
// last block of a group to finish (an integer ticket per group, no float atomics) merges the group's
// partial results in chunk order, in double, as the CPU driver does. Which block comes last changes
// nothing: the merge reads every chunk's partial in the same order (the host runs the blocks in
// reverse order, so its last block is chunk 0, not the last chunk).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "bn_math.h"
#include "bn_plan.h"
#include "multi_tensor_update.h"  // load_global / store_global, Vec, RESFAST_UNROLL

namespace resfast::bn {

// Threads per block, and vectors each thread loads before computing in the streaming kernels: 4 (2 for
// 8-element 16-bit vectors, the same bytes in flight: with 4, the 16-bit backward reduction took up
// to 186 registers). The statistics keep 4 (with 2, ptxas spilled 4 bytes of the 16-bit channels-last
// one at 80 registers; with 4 it takes 106 and spills nothing). Items are sized with bn_slots; any
// slot count walks them correctly. Provisional: to be measured.
constexpr int kBnThreads = 256;
C10_HOST_DEVICE constexpr int bn_slots(int vec) { return vec >= 8 ? 2 : 4; }
constexpr int kBnStatsSlots = 4;
// Channels-first: rounds of bn_slots vectors per thread in an item (16K fp32 or 16-bit values).
// Channels-last: channels per tile, and the chunks per tile an item's size aims for: every chunk of a
// tile is merged by one block, whose threads split the chunks into 256 / tile-width slices.
constexpr int64_t kBnRoundsChannelsFirst = 4;
constexpr int kBnTileChannels = 32;
constexpr int64_t kBnChunksPerTile = 256;

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

C10_HOST_DEVICE inline int log2_of_pow2(int64_t v) {
  int k = 0;
  while ((int64_t(1) << k) < v) ++k;
  return k;
}

// How a call's tensors are split into blocks. p.chunk / p.chunks / partial_index are bn_plan.h's;
// p.items is the number of blocks.
struct CudaPlan {
  Plan p;
  int vec;                 // elements per access: 16 / sizeof(storage), or 1 (scalar)
  int lanes, rows;         // threads across a tile's channel vectors, and along q (lanes * rows = 256)
  int64_t group_channels;  // channels of a group: 1 (channels-first) or the tile's lanes * vec
  int64_t groups;          // C (channels-first) or tiles (channels-last)
};

inline CudaPlan make_cuda_plan(int64_t N, int64_t C, int64_t S, bool channels_last, int vec) {
  CudaPlan g{};
  g.p = Plan{N, C, S, N * S, channels_last, 0, 0, 0};
  g.vec = vec;
  int64_t chunk;
  if (channels_last) {
    int64_t lanes = 1;
    while (lanes < kBnTileChannels / vec && lanes * vec < C) lanes *= 2;
    g.lanes = static_cast<int>(lanes);
    g.rows = kBnThreads / g.lanes;
    g.group_channels = lanes * vec;
    g.groups = ceil_div(C, g.group_channels);
    const int64_t per_round = int64_t(g.rows) * bn_slots(vec);
    chunk = per_round * ceil_div(g.p.M, per_round * kBnChunksPerTile);
  } else {
    g.lanes = 1;
    g.rows = kBnThreads;
    g.group_channels = 1;
    g.groups = C;
    chunk = int64_t(kBnThreads) * bn_slots(vec) * vec * kBnRoundsChannelsFirst;
  }
  g.p.chunk = chunk > g.p.M ? g.p.M : chunk;
  g.p.chunks = g.p.M > 0 ? ceil_div(g.p.M, g.p.chunk) : 0;
  g.p.items = g.groups * g.p.chunks;
  return g;
}

// A thread's walk over its block's item: the outer index q of its current slot, with (n, s) kept by
// additions (no division per slot).
struct Cursor {
  int64_t q, n, s;
  int64_t step, dn, ds, S;

  C10_HOST_DEVICE Cursor(int64_t first, int64_t step_, int64_t S_)
      : q(first), n(first / S_), s(first % S_), step(step_), dn(step_ / S_), ds(step_ % S_), S(S_) {}

  C10_HOST_DEVICE void advance() {
    q += step;
    n += dn;
    s += ds;
    if (s >= S) {
      s -= S;
      ++n;
    }
  }
};

// Where thread t of a block works.
struct Spot {
  int64_t group, j, q0, q1;
  int lane, row;
  int64_t c0;      // the thread's first channel
  bool channels;   // whether that channel exists (channels-last tiles may overhang C)
  int64_t first;   // q of the thread's first slot
  int64_t step;    // q between its slots
  int64_t slots;   // slots of the item per thread (the last ones may lie past q1)
};

C10_HOST_DEVICE inline Spot locate(const CudaPlan& g, int64_t block, int t) {
  Spot w;
  w.group = block / g.p.chunks;
  w.j = block % g.p.chunks;
  w.q0 = w.j * g.p.chunk;
  w.q1 = w.q0 + g.p.chunk < g.p.M ? w.q0 + g.p.chunk : g.p.M;
  w.lane = t % g.lanes;
  w.row = t / g.lanes;
  if (g.p.channels_last) {
    w.c0 = w.group * g.group_channels + int64_t(w.lane) * g.vec;
    w.first = w.q0 + w.row;
    w.step = g.rows;
  } else {
    w.c0 = w.group;
    w.first = w.q0 + int64_t(t) * g.vec;
    w.step = int64_t(kBnThreads) * g.vec;
  }
  w.channels = w.c0 < g.p.C;
  w.slots = ceil_div(w.q1 - w.q0, w.step);
  return w;
}

template <typename T>
C10_HOST_DEVICE inline T* at_(const Operand& o, int64_t n, int64_t s, int64_t c) {
  return static_cast<T*>(o.data) + offset(o, n, s, c);
}

// V consecutive elements as fp32 (one 16-byte access, or one scalar when V = 1), and back, rounded
// to nearest-even.
template <typename T, int V>
C10_HOST_DEVICE inline void load_vec(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = static_cast<float>(load_global(p));
  } else {
    const resfast::Vec<T, V> v = load_global(reinterpret_cast<const resfast::Vec<T, V>*>(p));
RESFAST_UNROLL
    for (int i = 0; i < V; ++i) out[i] = static_cast<float>(v.v[i]);
  }
}

template <typename T, int V>
C10_HOST_DEVICE inline void store_vec(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    store_global(p, static_cast<T>(in[0]));
  } else {
    resfast::Vec<T, V> v;
RESFAST_UNROLL
    for (int i = 0; i < V; ++i) v.v[i] = static_cast<T>(in[i]);
    store_global(reinterpret_cast<resfast::Vec<T, V>*>(p), v);
  }
}

// A per-channel tensor updated in place (the running statistics): any floating dtype and stride.
enum class ChannelDtype : int32_t { Float, Double, Half, BFloat16 };
struct ChannelRef {
  void* data;  // nullptr: absent
  int64_t stride;
  ChannelDtype dtype;
};

C10_HOST_DEVICE inline float load_channel(const ChannelRef& r, int64_t c) {
  const int64_t i = c * r.stride;
  switch (r.dtype) {
    case ChannelDtype::Double: return static_cast<float>(static_cast<const double*>(r.data)[i]);
    case ChannelDtype::Half: return static_cast<float>(static_cast<const c10::Half*>(r.data)[i]);
    case ChannelDtype::BFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(r.data)[i]);
    default: return static_cast<const float*>(r.data)[i];
  }
}

C10_HOST_DEVICE inline void store_channel(const ChannelRef& r, int64_t c, float v) {
  const int64_t i = c * r.stride;
  switch (r.dtype) {
    case ChannelDtype::Double: static_cast<double*>(r.data)[i] = static_cast<double>(v); break;
    case ChannelDtype::Half: static_cast<c10::Half*>(r.data)[i] = static_cast<c10::Half>(v); break;
    case ChannelDtype::BFloat16: static_cast<c10::BFloat16*>(r.data)[i] = static_cast<c10::BFloat16>(v); break;
    default: static_cast<float*>(r.data)[i] = v;
  }
}

// The grid-level hand-over: a block makes its partial results visible to the other blocks, then
// takes a ticket for its group; the block holding the group's last ticket merges.
C10_HOST_DEVICE inline void publish() {
#ifdef __CUDA_ARCH__
  __threadfence();
#endif
}

C10_HOST_DEVICE inline int take_ticket(int* counter) {
#ifdef __CUDA_ARCH__
  return atomicAdd(counter, 1);
#else
  return (*counter)++;
#endif
}

// The phases shared by the two reducing kernels (statistics, backward pass 1): after the threads have
// filled shared.rows (one Acc per thread and channel of the thread), a tree over rows, the partial
// result of row 0, the ticket, and the last block's merge of the group's partial results in chunk
// order (Wide: the double accumulator). Reduce supplies combine(a, b) for both accumulator types,
// write_partial / read_partial and finish(channel, merged).
//
// Phases: 0 fill | 1..a row tree (a = log2 rows) | a+1 write partials | a+2 ticket |
//         a+3 slices (last block only) | a+4..a+3+b slice tree (b = log2 slices) | a+4+b finish.
template <typename Reduce, int W>
struct GroupReduction {
  using Acc = typename Reduce::Acc;
  using Wide = typename Reduce::Wide;
  struct Shared {
    Acc rows[kBnThreads * W];   // thread t's value for its channel w at t * W + w
    Wide merge[kBnThreads];     // the last block's slices: slice * group_channels + channel
    int last;
  };

  C10_HOST_DEVICE static int phases(const CudaPlan& g) {
    return log2_of_pow2(g.rows) + log2_of_pow2(kBnThreads / g.group_channels) + 5;
  }

  C10_HOST_DEVICE static bool run(const Reduce& r, const CudaPlan& g, int* counters, int phase, int64_t block,
                                  int t, Shared& sh) {
    const int a = log2_of_pow2(g.rows);
    const int b = log2_of_pow2(kBnThreads / g.group_channels);
    const Spot w = locate(g, block, t);
    if (phase == 0) {
      r.fill(g, w, t, sh.rows);
    } else if (phase <= a) {
      const int stride = g.rows >> phase;
      if (w.row < stride) {
RESFAST_UNROLL
        for (int k = 0; k < W; ++k) Reduce::combine(sh.rows[t * W + k], sh.rows[(t + stride * g.lanes) * W + k]);
      }
    } else if (phase == a + 1) {
      if (w.row == 0 && w.channels) {
RESFAST_UNROLL
        for (int k = 0; k < W; ++k) {
          if (w.c0 + k < g.p.C) r.write_partial(partial_index(g.p, w.j, w.c0 + k), sh.rows[t * W + k]);
        }
        publish();
      }
    } else if (phase == a + 2) {
      if (t == 0) {
        publish();  // the block's partial results (written by other threads before the barrier) first
        sh.last = take_ticket(counters + w.group) == g.p.chunks - 1;
      }
    } else if (phase == a + 3) {
      if (!sh.last) return false;
      publish();  // and the other blocks' partial results are read after their tickets
      const int64_t G = g.group_channels;
      const int64_t slices = kBnThreads / G, slice = t / G, c = w.group * G + t % G;
      const int64_t per = ceil_div(g.p.chunks, slices);
      Wide acc = Reduce::zero();
      if (c < g.p.C) {
        const int64_t end = (slice + 1) * per < g.p.chunks ? (slice + 1) * per : g.p.chunks;
        for (int64_t j = slice * per; j < end; ++j) Reduce::combine(acc, r.read_partial(g.p, j, c));
      }
      sh.merge[t] = acc;
    } else if (phase <= a + 3 + b) {
      const int64_t G = g.group_channels;
      const int64_t stride = (kBnThreads / G) >> (phase - a - 3);
      if (t / G < stride) Reduce::combine(sh.merge[t], sh.merge[t + stride * G]);
    } else {
      const int64_t c = w.group * g.group_channels + t;
      if (t < g.group_channels && c < g.p.C) r.finish(g, c, sh.merge[t]);
    }
    return true;
  }
};

// ---- forward statistics --------------------------------------------------------------------------
// Each thread, per round of kSlots vectors: the round's mean, then its squared deviations from it
// (both over registers, free of the cancellation of sum(x^2) - sum(x)^2 / n), merged into the
// thread's running Moments by Chan's formula (bn_math.h `merge`); threads and blocks merge the same
// way; the last block of a group writes mean, var = M2 / M and the running statistics.
template <typename T, int V, bool kLast>
struct StatsKernel {
  static constexpr int W = kLast ? V : 1;  // channels per thread
  static constexpr int kSlots = kBnStatsSlots;
  using Acc = Moments<float>;
  using Wide = Moments<double>;
  using Group = GroupReduction<StatsKernel, W>;
  using Shared = typename Group::Shared;

  CudaPlan g;
  Operand x;
  float* partial_mean;   // C * chunks, at partial_index
  float* partial_m2;
  int* counters;         // one per group, zero before the launch
  float* mean;           // out: (C,) batch mean
  float* var;            // out: (C,) biased variance
  ChannelRef running_mean, running_var;  // updated in place when present
  float momentum, unbias;                // unbias = M / (M - 1)

  C10_HOST_DEVICE static Wide zero() { return Wide{0.0, 0.0, 0.0}; }
  template <typename A>
  C10_HOST_DEVICE static void combine(Moments<A>& a, const Moments<A>& b) { merge(a, b); }

  C10_HOST_DEVICE int phases() const { return Group::phases(g); }
  C10_HOST_DEVICE bool run(int phase, int64_t block, int t, Shared& sh) const {
    return Group::run(*this, g, counters, phase, block, t, sh);
  }

  C10_HOST_DEVICE void fill(const CudaPlan& plan, const Spot& w, int t, Acc* rows) const {
    Acc acc[W];
RESFAST_UNROLL
    for (int k = 0; k < W; ++k) acc[k] = Acc{0.f, 0.f, 0.f};
    if (w.channels) {
      Cursor cur(w.first, w.step, plan.p.S);
      for (int64_t u = 0; u < w.slots; u += kSlots) {
        float v[kSlots][V];
        bool ok[kSlots];
RESFAST_UNROLL
        for (int k = 0; k < kSlots; ++k) {
          ok[k] = cur.q < w.q1;
          if (ok[k]) load_vec<T, V>(at_<const T>(x, cur.n, cur.s, w.c0), v[k]);
          cur.advance();
        }
RESFAST_UNROLL
        for (int c = 0; c < W; ++c) {
          // channel c's values of the round: lane c of each slot (channels-last), or all of them
          float sum = 0.f, count = 0.f;
RESFAST_UNROLL
          for (int k = 0; k < kSlots; ++k) {
RESFAST_UNROLL
            for (int i = 0; i < V; ++i) {
              if (ok[k] && (!kLast || i == c)) {
                sum += v[k][i];
                count += 1.f;
              }
            }
          }
          if (count == 0.f) continue;
          const float mean_r = sum / count;
          float m2 = 0.f;
RESFAST_UNROLL
          for (int k = 0; k < kSlots; ++k) {
RESFAST_UNROLL
            for (int i = 0; i < V; ++i) {
              if (ok[k] && (!kLast || i == c)) {
                const float d = v[k][i] - mean_r;
                m2 += d * d;
              }
            }
          }
          merge(acc[c], Acc{mean_r, m2, count});
        }
      }
    }
RESFAST_UNROLL
    for (int k = 0; k < W; ++k) rows[t * W + k] = acc[k];
  }

  C10_HOST_DEVICE void write_partial(int64_t i, const Acc& a) const {
    store_global(partial_mean + i, a.mean);
    store_global(partial_m2 + i, a.m2);
  }

  C10_HOST_DEVICE Wide read_partial(const Plan& p, int64_t j, int64_t c) const {
    const int64_t i = partial_index(p, j, c);
    return Wide{load_global(partial_mean + i), load_global(partial_m2 + i), double(chunk_count(p, j))};
  }

  C10_HOST_DEVICE void finish(const CudaPlan& plan, int64_t c, const Wide& m) const {
    const float mean_c = static_cast<float>(m.mean);
    const float var_c = static_cast<float>(m.m2 / double(plan.p.M));
    mean[c] = mean_c;
    var[c] = var_c;
    if (running_mean.data != nullptr) {
      float rm = load_channel(running_mean, c), rv = load_channel(running_var, c);
      update_running(rm, rv, mean_c, var_c, unbias, momentum);
      store_channel(running_mean, c, rm);
      store_channel(running_var, c, rv);
    }
  }
};

// ---- forward: normalise + add + ReLU --------------------------------------------------------------
struct NoShared {
  int unused;
};

template <typename T, int V, bool kLast, bool kResidual>
struct ApplyKernel {
  static constexpr int W = kLast ? V : 1;
  static constexpr int kSlots = bn_slots(V);
  using Shared = NoShared;

  CudaPlan g;
  Operand x, residual, y;
  const float *mean, *var, *weight, *bias;  // (C,) fp32; weight, bias nullptr when absent
  float eps;

  C10_HOST_DEVICE int phases() const { return 1; }
  C10_HOST_DEVICE bool run(int, int64_t block, int t, Shared&) const {
    const Spot w = locate(g, block, t);
    if (!w.channels) return true;
    // y = relu((x - mean) * scale + bias + residual), scale = weight / sqrt(var + eps), per channel
    float m[W], scale[W], shift[W];
RESFAST_UNROLL
    for (int k = 0; k < W; ++k) {
      const int64_t c = w.c0 + k;
      m[k] = mean[c];
      scale[k] = inv_std(var[c], eps) * (weight != nullptr ? weight[c] : 1.f);
      shift[k] = bias != nullptr ? bias[c] : 0.f;
    }
    Cursor cur(w.first, w.step, g.p.S);
    for (int64_t u = 0; u < w.slots; u += kSlots) {
      float xv[kSlots][V], rv[kSlots][V];
      bool ok[kSlots];
      int64_t n[kSlots], s[kSlots];
RESFAST_UNROLL
      for (int k = 0; k < kSlots; ++k) {
        ok[k] = cur.q < w.q1;
        n[k] = cur.n;
        s[k] = cur.s;
        if (ok[k]) {
          load_vec<T, V>(at_<const T>(x, cur.n, cur.s, w.c0), xv[k]);
          if constexpr (kResidual) load_vec<T, V>(at_<const T>(residual, cur.n, cur.s, w.c0), rv[k]);
        }
        cur.advance();
      }
RESFAST_UNROLL
      for (int k = 0; k < kSlots; ++k) {
        if (!ok[k]) continue;
        float out[V];
RESFAST_UNROLL
        for (int i = 0; i < V; ++i) {
          const int c = kLast ? i : 0;
          if constexpr (kResidual) {
            out[i] = normalize_add_relu(xv[k][i], rv[k][i], m[c], scale[c], shift[c]);
          } else {
            out[i] = normalize_relu(xv[k][i], m[c], scale[c], shift[c]);
          }
        }
        store_vec<T, V>(at_<T>(y, n[k], s[k], w.c0), out);
      }
    }
    return true;
  }
};

// ---- backward pass 1: dz = dy * (y > 0), sum(dz), sum(dz * (x - mean)) ---------------------------
template <typename A>
struct GradSums {
  A dz, dz_xc;
};

template <typename T, int V, bool kLast>
struct GradReduceKernel {
  static constexpr int W = kLast ? V : 1;
  static constexpr int kSlots = bn_slots(V);
  using Acc = GradSums<float>;
  using Wide = GradSums<double>;
  using Group = GroupReduction<GradReduceKernel, W>;
  using Shared = typename Group::Shared;

  CudaPlan g;
  Operand dy, y, x, dz;  // dz: out
  const float *mean, *var, *weight;  // (C,) fp32; weight nullptr when absent
  float eps;
  bool training;
  float* partial_dz;     // C * chunks, at partial_index
  float* partial_dz_xc;
  int* counters;         // one per group, zero before the launch
  float* dweight;        // out: (C,) sum(dz * xhat)
  float* dbias;          // out: (C,) sum(dz)

  C10_HOST_DEVICE static Wide zero() { return Wide{0.0, 0.0}; }
  template <typename A>
  C10_HOST_DEVICE static void combine(GradSums<A>& a, const GradSums<A>& b) {
    a.dz += b.dz;
    a.dz_xc += b.dz_xc;
  }

  C10_HOST_DEVICE int phases() const { return Group::phases(g); }
  C10_HOST_DEVICE bool run(int phase, int64_t block, int t, Shared& sh) const {
    return Group::run(*this, g, counters, phase, block, t, sh);
  }

  C10_HOST_DEVICE void fill(const CudaPlan& plan, const Spot& w, int t, Acc* rows) const {
    Acc acc[W];
RESFAST_UNROLL
    for (int k = 0; k < W; ++k) acc[k] = Acc{0.f, 0.f};
    if (w.channels) {
      float m[W];
RESFAST_UNROLL
      for (int k = 0; k < W; ++k) m[k] = mean[w.c0 + k];
      Cursor cur(w.first, w.step, plan.p.S);
      for (int64_t u = 0; u < w.slots; u += kSlots) {
        float dyv[kSlots][V], yv[kSlots][V], xv[kSlots][V];
        bool ok[kSlots];
        int64_t n[kSlots], s[kSlots];
RESFAST_UNROLL
        for (int k = 0; k < kSlots; ++k) {
          ok[k] = cur.q < w.q1;
          n[k] = cur.n;
          s[k] = cur.s;
          if (ok[k]) {
            load_vec<T, V>(at_<const T>(dy, cur.n, cur.s, w.c0), dyv[k]);
            load_vec<T, V>(at_<const T>(y, cur.n, cur.s, w.c0), yv[k]);
            load_vec<T, V>(at_<const T>(x, cur.n, cur.s, w.c0), xv[k]);
          }
          cur.advance();
        }
RESFAST_UNROLL
        for (int k = 0; k < kSlots; ++k) {
          if (!ok[k]) continue;
          float g_[V];
RESFAST_UNROLL
          for (int i = 0; i < V; ++i) {
            const int c = kLast ? i : 0;
            g_[i] = relu_grad(dyv[k][i], yv[k][i]);
            acc[c].dz += g_[i];
            acc[c].dz_xc += g_[i] * (xv[k][i] - m[c]);
          }
          store_vec<T, V>(at_<T>(dz, n[k], s[k], w.c0), g_);
        }
      }
    }
RESFAST_UNROLL
    for (int k = 0; k < W; ++k) rows[t * W + k] = acc[k];
  }

  C10_HOST_DEVICE void write_partial(int64_t i, const Acc& a) const {
    store_global(partial_dz + i, a.dz);
    store_global(partial_dz_xc + i, a.dz_xc);
  }

  C10_HOST_DEVICE Wide read_partial(const Plan& p, int64_t j, int64_t c) const {
    const int64_t i = partial_index(p, j, c);
    return Wide{load_global(partial_dz + i), load_global(partial_dz_xc + i)};
  }

  // The channel's sums: dweight = sum(dz * xhat), dbias = sum(dz), computed as the CPU driver does.
  C10_HOST_DEVICE void finish(const CudaPlan& plan, int64_t c, const Wide& m) const {
    const float invstd = inv_std(var[c], eps);
    const GradCoefficients k =
        grad_coefficients(static_cast<float>(m.dz), static_cast<float>(m.dz_xc) * invstd, invstd,
                          weight != nullptr ? weight[c] : 1.f, static_cast<float>(plan.p.M), training);
    dweight[c] = k.dweight;
    dbias[c] = k.dbias;
  }
};

// ---- backward pass 2: dx = alpha * dz + beta * (x - mean) + gamma ---------------------------------
// The coefficients (bn_math.h `grad_coefficients`) from the channel's sums: pass 1's dbias and
// dweight, or given ones (synchronised statistics), over `count` values per channel.
template <typename T, int V, bool kLast, bool kTraining>
struct GradInputKernel {
  static constexpr int W = kLast ? V : 1;
  static constexpr int kSlots = bn_slots(V);
  using Shared = NoShared;

  CudaPlan g;
  Operand dz, x, dx;  // x unread in eval
  const float *mean, *var, *weight;     // (C,) fp32; weight nullptr when absent
  const float *sum_dz, *sum_dz_xhat;    // (C,) fp32
  const float* count;                   // (C,) or (1,) fp32 values per channel; nullptr: count_value
  int64_t count_stride;                 // 1 (per channel) or 0 (one for all)
  float count_value;
  float eps;

  C10_HOST_DEVICE int phases() const { return 1; }
  C10_HOST_DEVICE bool run(int, int64_t block, int t, Shared&) const {
    const Spot w = locate(g, block, t);
    if (!w.channels) return true;
    float m[W], alpha[W], beta[W], gamma[W];
RESFAST_UNROLL
    for (int k = 0; k < W; ++k) {
      const int64_t c = w.c0 + k;
      const float invstd = inv_std(var[c], eps);
      const float n_c = count != nullptr ? count[c * count_stride] : count_value;
      const GradCoefficients coef = grad_coefficients(sum_dz[c], sum_dz_xhat[c], invstd,
                                                      weight != nullptr ? weight[c] : 1.f, n_c, kTraining);
      m[k] = mean[c];
      alpha[k] = coef.alpha;
      beta[k] = coef.beta;
      gamma[k] = coef.gamma;
    }
    Cursor cur(w.first, w.step, g.p.S);
    for (int64_t u = 0; u < w.slots; u += kSlots) {
      float dzv[kSlots][V], xv[kSlots][V];
      bool ok[kSlots];
      int64_t n[kSlots], s[kSlots];
RESFAST_UNROLL
      for (int k = 0; k < kSlots; ++k) {
        ok[k] = cur.q < w.q1;
        n[k] = cur.n;
        s[k] = cur.s;
        if (ok[k]) {
          load_vec<T, V>(at_<const T>(dz, cur.n, cur.s, w.c0), dzv[k]);
          if constexpr (kTraining) load_vec<T, V>(at_<const T>(x, cur.n, cur.s, w.c0), xv[k]);
        }
        cur.advance();
      }
RESFAST_UNROLL
      for (int k = 0; k < kSlots; ++k) {
        if (!ok[k]) continue;
        float out[V];
RESFAST_UNROLL
        for (int i = 0; i < V; ++i) {
          const int c = kLast ? i : 0;
          if constexpr (kTraining) {
            out[i] = grad_input(dzv[k][i], xv[k][i] - m[c], alpha[c], beta[c], gamma[c]);
          } else {
            out[i] = grad_input_eval(dzv[k][i], alpha[c]);
          }
        }
        store_vec<T, V>(at_<T>(dx, n[k], s[k], w.c0), out);
      }
    }
    return true;
  }
};

}  // namespace resfast::bn
