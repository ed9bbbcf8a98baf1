// The CPU BN inner loops, written once over ATen's SIMD vector of floats and compiled once per
// instruction set: bn.cpp (the baseline), bn_avx2.cpp and bn_avx512.cpp, each defining
// CPU_CAPABILITY first (see optim_kernels_impl.h for the scheme).
//
// Every loop walks an item's data along the plan's memory-contiguous axis one fp32 vector at a time
// (bf16/fp16 loaded as Vec::size() values and widened, rounded to nearest-even on store), with the
// remainder of a run or of a position's channels done by the same maths on scalars. The maths is
// csrc/bn_math.h; the item layout csrc/bn_plan.h.
#pragma once

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../bn_math.h"
#include "bn_kernels.h"

namespace resfast::bn {

template <>
struct BnElementwise<at::vec::Vectorized<float>> {
  using Vec = at::vec::Vectorized<float>;
  // Lanes below zero become 0; NaN lanes compare false and stay NaN, as torch.relu.
  static Vec relu(const Vec& z) { return Vec::blendv(z, Vec(0.f), z < Vec(0.f)); }
  // The comparison is an all-ones lane mask where y > 0 (false for NaN).
  static Vec pass_where_positive(const Vec& y, const Vec& dy) { return (y > Vec(0.f)) & dy; }
};

}  // namespace resfast::bn

namespace resfast::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

template <typename T>
inline Vec vload(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
  }
}

template <typename T>
inline void vstore(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    // The 16-bit vector holds 2 * kW values; only the first kW are stored.
    at::vec::convert_from_float<T>(v, v).store(p, static_cast<int>(kW));
  }
}

template <typename T>
inline float sload(const T* p) {
  return static_cast<float>(*p);
}

// Sum of the lanes, in lane order (the result depends on nothing but the data).
inline float hsum(const Vec& v) {
  float lanes[kW];
  v.store(lanes);
  float s = 0.f;
  for (int64_t k = 0; k < kW; ++k) s += lanes[k];
  return s;
}

// Channels-first: f(pointer offset of the run's first element without the channel term, length) for
// each run of an item: a run is the values of one sample at consecutive spatial positions.
template <typename F>
inline void for_each_run(const bn::Plan& p, const bn::ItemRange& r, F&& f) {
  int64_t n = r.q0 / p.S, s = r.q0 % p.S;
  for (int64_t q = r.q0; q < r.q1; ++n, s = 0) {
    const int64_t len = std::min(p.S - s, r.q1 - q);
    f(n, s, len);
    q += len;
  }
}

// Channels-first: f(n, s, len, c) for each run of each of the item's channels, in memory order (a
// sample-major item's data is one contiguous span).
template <typename F>
inline void for_each_channel_run(const bn::Plan& p, const bn::ItemRange& r, F&& f) {
  for_each_run(p, r, [&](int64_t n, int64_t s, int64_t len) {
    for (int64_t c = r.c; c < r.c_end; ++c) f(n, s, len, c);
  });
}

// Per-channel accumulators of a channels-first item: one fp32 vector of lanes and one scalar tail per
// channel, kept in memory between the item's runs (a sample-major item visits every channel per
// sample). Lanes and tail add in the order a single register would, so a channel's sum depends on the
// plan alone.
class ChannelSums {
 public:
  explicit ChannelSums(int64_t channels) : lanes_(channels * kW), tails_(channels) {}
  void reset(int64_t channels) {
    std::fill(lanes_.begin(), lanes_.begin() + channels * kW, 0.f);
    std::fill(tails_.begin(), tails_.begin() + channels, 0.f);
  }
  Vec lanes(int64_t i) const { return Vec::loadu(lanes_.data() + i * kW); }
  void set_lanes(int64_t i, const Vec& v) { v.store(lanes_.data() + i * kW); }
  float& tail(int64_t i) { return tails_[i]; }
  float total(int64_t i) const { return hsum(lanes(i)) + tails_[i]; }

 private:
  std::vector<float> lanes_, tails_;
};

// How many channels a channels-first item holds at most (0 for channels-last: no ChannelSums needed).
inline int64_t item_channels(const bn::Plan& p) { return p.channels_last ? 0 : p.sample_major ? p.C : 1; }

// Channels-last: f(n, s) for each position of an item.
template <typename F>
inline void for_each_position(const bn::Plan& p, const bn::ItemRange& r, F&& f) {
  int64_t n = r.q0 / p.S, s = r.q0 % p.S;
  for (int64_t q = r.q0; q < r.q1; ++q) {
    f(n, s);
    if (++s == p.S) {
      s = 0;
      ++n;
    }
  }
}

// Channels-last: f(c, B) for the channels that fill whole vectors, B (4, 2 or 1: a
// std::integral_constant) vectors from channel c at a time; returns the first channel left over for
// scalar code. A pass over an item's positions then keeps B vectors of accumulators or coefficients
// in registers and touches whole cache lines at each position (up to 4 vectors: 64 fp32 channels
// with AVX-512), where one vector at a time would re-read every line once per vector.
template <typename F>
inline int64_t for_each_channel_block(int64_t C, F&& f) {
  int64_t c = 0;
  while (c + kW <= C) {
    const int64_t vectors = (C - c) / kW;
    if (vectors >= 4) {
      f(c, std::integral_constant<int, 4>{});
      c += 4 * kW;
    } else if (vectors >= 2) {
      f(c, std::integral_constant<int, 2>{});
      c += 2 * kW;
    } else {
      f(c, std::integral_constant<int, 1>{});
      c += kW;
    }
  }
  return c;
}

template <typename T>
inline T* ptr_at(const bn::Operand& o, int64_t n, int64_t s, int64_t c) {
  return static_cast<T*>(o.data) + bn::offset(o, n, s, c);
}

// ---- forward statistics ----------------------------------------------------------------------

template <typename T>
void stats_items(const BnStatsJob& job, int64_t first, int64_t last) {
  const bn::Plan& p = job.plan;
  ChannelSums sums(item_channels(p)), squares(item_channels(p));
  for (int64_t item = first; item < last; ++item) {
    const bn::ItemRange r = bn::item_range(p, item);
    const float count = static_cast<float>(r.q1 - r.q0);
    if (!p.channels_last) {
      // Pass 1: each channel's mean over the item; pass 2: squared deviations from it, over the same
      // (cached) runs.
      const int64_t channels = r.c_end - r.c;
      sums.reset(channels);
      for_each_channel_run(p, r, [&](int64_t n, int64_t s, int64_t len, int64_t c) {
        const T* x = ptr_at<T>(job.x, n, s, c);
        const int64_t i = c - r.c;
        Vec acc = sums.lanes(i);
        float tail = sums.tail(i);
        int64_t k = 0;
        for (; k + kW <= len; k += kW) acc = acc + vload(x + k);
        for (; k < len; ++k) tail += sload(x + k);
        sums.set_lanes(i, acc);
        sums.tail(i) = tail;
      });
      for (int64_t c = r.c; c < r.c_end; ++c) job.mean[bn::partial_index(p, r.j, c)] = sums.total(c - r.c) / count;
      squares.reset(channels);
      for_each_channel_run(p, r, [&](int64_t n, int64_t s, int64_t len, int64_t c) {
        const T* x = ptr_at<T>(job.x, n, s, c);
        const int64_t i = c - r.c;
        const float mean = job.mean[bn::partial_index(p, r.j, c)];
        const Vec vmean(mean);
        Vec acc2 = squares.lanes(i);
        float tail2 = squares.tail(i);
        int64_t k = 0;
        for (; k + kW <= len; k += kW) {
          const Vec d = vload(x + k) - vmean;
          acc2 = at::vec::fmadd(d, d, acc2);
        }
        for (; k < len; ++k) {
          const float d = sload(x + k) - mean;
          tail2 += d * d;
        }
        squares.set_lanes(i, acc2);
        squares.tail(i) = tail2;
      });
      for (int64_t c = r.c; c < r.c_end; ++c) job.m2[bn::partial_index(p, r.j, c)] = squares.total(c - r.c);
    } else {
      // The same two passes, for a block of channel vectors at a time (for_each_channel_block): their
      // accumulators stay in registers over the item's positions.
      const int64_t C = p.C;
      float* mean = job.mean + bn::partial_index(p, r.j, 0);
      float* m2 = job.m2 + bn::partial_index(p, r.j, 0);
      const float inv_count = 1.f / count;
      int64_t c = for_each_channel_block(C, [&](int64_t c0, auto block) {
        constexpr int B = decltype(block)::value;
        Vec acc[B], vmean[B], acc2[B];
        for (int b = 0; b < B; ++b) acc[b] = acc2[b] = Vec(0.f);
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const T* x = ptr_at<T>(job.x, n, s, c0);
          for (int b = 0; b < B; ++b) acc[b] = acc[b] + vload(x + b * kW);
        });
        for (int b = 0; b < B; ++b) {
          vmean[b] = acc[b] * Vec(inv_count);
          vmean[b].store(mean + c0 + b * kW);
        }
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const T* x = ptr_at<T>(job.x, n, s, c0);
          for (int b = 0; b < B; ++b) {
            const Vec d = vload(x + b * kW) - vmean[b];
            acc2[b] = at::vec::fmadd(d, d, acc2[b]);
          }
        });
        for (int b = 0; b < B; ++b) acc2[b].store(m2 + c0 + b * kW);
      });
      for (; c < C; ++c) {
        float sum = 0.f;
        for_each_position(p, r, [&](int64_t n, int64_t s) { sum += sload(ptr_at<T>(job.x, n, s, c)); });
        const float channel_mean = sum * inv_count;
        float sum2 = 0.f;
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const float d = sload(ptr_at<T>(job.x, n, s, c)) - channel_mean;
          sum2 += d * d;
        });
        mean[c] = channel_mean;
        m2[c] = sum2;
      }
    }
  }
}

// ---- forward: normalise + add + ReLU ---------------------------------------------------------

template <typename T, bool kResidual>
void apply_items(const BnApplyJob& job, int64_t first, int64_t last) {
  const bn::Plan& p = job.plan;
  for (int64_t item = first; item < last; ++item) {
    const bn::ItemRange r = bn::item_range(p, item);
    if (!p.channels_last) {
      for_each_channel_run(p, r, [&](int64_t n, int64_t s, int64_t len, int64_t c) {
        const float mean = job.mean[c], scale = job.scale[c], bias = job.bias[c];
        const Vec vmean(mean), vscale(scale), vbias(bias);
        const T* x = ptr_at<T>(job.x, n, s, c);
        T* y = ptr_at<T>(job.y, n, s, c);
        const T* res = kResidual ? ptr_at<T>(job.residual, n, s, c) : nullptr;
        int64_t k = 0;
        for (; k + kW <= len; k += kW) {
          if constexpr (kResidual) {
            vstore(y + k, bn::normalize_add_relu(vload(x + k), vload(res + k), vmean, vscale, vbias));
          } else {
            vstore(y + k, bn::normalize_relu(vload(x + k), vmean, vscale, vbias));
          }
        }
        for (; k < len; ++k) {
          if constexpr (kResidual) {
            y[k] = static_cast<T>(bn::normalize_add_relu(sload(x + k), sload(res + k), mean, scale, bias));
          } else {
            y[k] = static_cast<T>(bn::normalize_relu(sload(x + k), mean, scale, bias));
          }
        }
      });
    } else {
      // A block of channel vectors at a time (for_each_channel_block): coefficients in registers.
      const int64_t C = p.C;
      int64_t c = for_each_channel_block(C, [&](int64_t c0, auto block) {
        constexpr int B = decltype(block)::value;
        Vec vmean[B], vscale[B], vbias[B];
        for (int b = 0; b < B; ++b) {
          vmean[b] = Vec::loadu(job.mean + c0 + b * kW);
          vscale[b] = Vec::loadu(job.scale + c0 + b * kW);
          vbias[b] = Vec::loadu(job.bias + c0 + b * kW);
        }
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const T* x = ptr_at<T>(job.x, n, s, c0);
          T* y = ptr_at<T>(job.y, n, s, c0);
          for (int b = 0; b < B; ++b) {
            const int64_t k = b * kW;
            if constexpr (kResidual) {
              const T* res = ptr_at<T>(job.residual, n, s, c0);
              vstore(y + k, bn::normalize_add_relu(vload(x + k), vload(res + k), vmean[b], vscale[b], vbias[b]));
            } else {
              vstore(y + k, bn::normalize_relu(vload(x + k), vmean[b], vscale[b], vbias[b]));
            }
          }
        });
      });
      for (; c < C; ++c) {
        const float mean = job.mean[c], scale = job.scale[c], bias = job.bias[c];
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const float x = sload(ptr_at<T>(job.x, n, s, c));
          T* y = ptr_at<T>(job.y, n, s, c);
          if constexpr (kResidual) {
            *y = static_cast<T>(bn::normalize_add_relu(x, sload(ptr_at<T>(job.residual, n, s, c)), mean, scale, bias));
          } else {
            *y = static_cast<T>(bn::normalize_relu(x, mean, scale, bias));
          }
        });
      }
    }
  }
}

// ---- backward pass 1: dz, sum(dz), sum(dz * (x - mean)) --------------------------------------

template <typename T>
void grad_reduce_items(const BnGradReduceJob& job, int64_t first, int64_t last) {
  const bn::Plan& p = job.plan;
  ChannelSums sum_dz(item_channels(p)), sum_dz_xc(item_channels(p));
  for (int64_t item = first; item < last; ++item) {
    const bn::ItemRange r = bn::item_range(p, item);
    if (!p.channels_last) {
      const int64_t channels = r.c_end - r.c;
      sum_dz.reset(channels);
      sum_dz_xc.reset(channels);
      for_each_channel_run(p, r, [&](int64_t n, int64_t s, int64_t len, int64_t c) {
        const float mean = job.mean[c];
        const Vec vmean(mean);
        const int64_t i = c - r.c;
        Vec acc_dz = sum_dz.lanes(i), acc_dz_xc = sum_dz_xc.lanes(i);
        float tail_dz = sum_dz.tail(i), tail_dz_xc = sum_dz_xc.tail(i);
        const T* dy = ptr_at<T>(job.dy, n, s, c);
        const T* y = ptr_at<T>(job.y, n, s, c);
        const T* x = ptr_at<T>(job.x, n, s, c);
        T* dz = ptr_at<T>(job.dz, n, s, c);
        int64_t k = 0;
        for (; k + kW <= len; k += kW) {
          const Vec g = bn::relu_grad(vload(dy + k), vload(y + k));
          vstore(dz + k, g);
          acc_dz = acc_dz + g;
          acc_dz_xc = at::vec::fmadd(g, vload(x + k) - vmean, acc_dz_xc);
        }
        for (; k < len; ++k) {
          const float g = bn::relu_grad(sload(dy + k), sload(y + k));
          dz[k] = static_cast<T>(g);
          tail_dz += g;
          tail_dz_xc += g * (sload(x + k) - mean);
        }
        sum_dz.set_lanes(i, acc_dz);
        sum_dz_xc.set_lanes(i, acc_dz_xc);
        sum_dz.tail(i) = tail_dz;
        sum_dz_xc.tail(i) = tail_dz_xc;
      });
      for (int64_t c = r.c; c < r.c_end; ++c) {
        const int64_t i = bn::partial_index(p, r.j, c);
        job.sum_dz[i] = sum_dz.total(c - r.c);
        job.sum_dz_xc[i] = sum_dz_xc.total(c - r.c);
      }
    } else {
      // A block of channel vectors at a time (for_each_channel_block), its sums in registers.
      const int64_t C = p.C;
      float* sum_dz = job.sum_dz + bn::partial_index(p, r.j, 0);
      float* sum_dz_xc = job.sum_dz_xc + bn::partial_index(p, r.j, 0);
      int64_t c = for_each_channel_block(C, [&](int64_t c0, auto block) {
        constexpr int B = decltype(block)::value;
        Vec vmean[B], acc_dz[B], acc_dz_xc[B];
        for (int b = 0; b < B; ++b) {
          vmean[b] = Vec::loadu(job.mean + c0 + b * kW);
          acc_dz[b] = acc_dz_xc[b] = Vec(0.f);
        }
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const T* dy = ptr_at<T>(job.dy, n, s, c0);
          const T* y = ptr_at<T>(job.y, n, s, c0);
          const T* x = ptr_at<T>(job.x, n, s, c0);
          T* dz = ptr_at<T>(job.dz, n, s, c0);
          for (int b = 0; b < B; ++b) {
            const int64_t k = b * kW;
            const Vec g = bn::relu_grad(vload(dy + k), vload(y + k));
            vstore(dz + k, g);
            acc_dz[b] = acc_dz[b] + g;
            acc_dz_xc[b] = at::vec::fmadd(g, vload(x + k) - vmean[b], acc_dz_xc[b]);
          }
        });
        for (int b = 0; b < B; ++b) {
          acc_dz[b].store(sum_dz + c0 + b * kW);
          acc_dz_xc[b].store(sum_dz_xc + c0 + b * kW);
        }
      });
      for (; c < C; ++c) {
        const float mean = job.mean[c];
        float tail_dz = 0.f, tail_dz_xc = 0.f;
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const float g = bn::relu_grad(sload(ptr_at<T>(job.dy, n, s, c)), sload(ptr_at<T>(job.y, n, s, c)));
          *ptr_at<T>(job.dz, n, s, c) = static_cast<T>(g);
          tail_dz += g;
          tail_dz_xc += g * (sload(ptr_at<T>(job.x, n, s, c)) - mean);
        });
        sum_dz[c] = tail_dz;
        sum_dz_xc[c] = tail_dz_xc;
      }
    }
  }
}

// ---- backward pass 2: dx ---------------------------------------------------------------------

template <typename T, bool kTraining>
void grad_input_items(const BnGradInputJob& job, int64_t first, int64_t last) {
  const bn::Plan& p = job.plan;
  for (int64_t item = first; item < last; ++item) {
    const bn::ItemRange r = bn::item_range(p, item);
    if (!p.channels_last) {
      for_each_channel_run(p, r, [&](int64_t n, int64_t s, int64_t len, int64_t c) {
        const float mean = job.mean[c], alpha = job.alpha[c], beta = job.beta[c], gamma = job.gamma[c];
        const Vec vmean(mean), valpha(alpha), vbeta(beta), vgamma(gamma);
        const T* dz = ptr_at<T>(job.dz, n, s, c);
        const T* x = kTraining ? ptr_at<T>(job.x, n, s, c) : nullptr;
        T* dx = ptr_at<T>(job.dx, n, s, c);
        int64_t k = 0;
        for (; k + kW <= len; k += kW) {
          if constexpr (kTraining) {
            vstore(dx + k, bn::grad_input(vload(dz + k), vload(x + k) - vmean, valpha, vbeta, vgamma));
          } else {
            vstore(dx + k, bn::grad_input_eval(vload(dz + k), valpha));
          }
        }
        for (; k < len; ++k) {
          if constexpr (kTraining) {
            dx[k] = static_cast<T>(bn::grad_input(sload(dz + k), sload(x + k) - mean, alpha, beta, gamma));
          } else {
            dx[k] = static_cast<T>(bn::grad_input_eval(sload(dz + k), alpha));
          }
        }
      });
    } else {
      // A block of channel vectors at a time (for_each_channel_block): coefficients in registers.
      const int64_t C = p.C;
      int64_t c = for_each_channel_block(C, [&](int64_t c0, auto block) {
        constexpr int B = decltype(block)::value;
        Vec valpha[B], vmean[B], vbeta[B], vgamma[B];
        for (int b = 0; b < B; ++b) {
          valpha[b] = Vec::loadu(job.alpha + c0 + b * kW);
          vmean[b] = Vec::loadu(job.mean + c0 + b * kW);
          vbeta[b] = Vec::loadu(job.beta + c0 + b * kW);
          vgamma[b] = Vec::loadu(job.gamma + c0 + b * kW);
        }
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const T* dz = ptr_at<T>(job.dz, n, s, c0);
          T* dx = ptr_at<T>(job.dx, n, s, c0);
          for (int b = 0; b < B; ++b) {
            const int64_t k = b * kW;
            if constexpr (kTraining) {
              const Vec xc = vload(ptr_at<T>(job.x, n, s, c0) + k) - vmean[b];
              vstore(dx + k, bn::grad_input(vload(dz + k), xc, valpha[b], vbeta[b], vgamma[b]));
            } else {
              vstore(dx + k, bn::grad_input_eval(vload(dz + k), valpha[b]));
            }
          }
        });
      });
      for (; c < C; ++c) {
        const float mean = job.mean[c], alpha = job.alpha[c], beta = job.beta[c], gamma = job.gamma[c];
        for_each_position(p, r, [&](int64_t n, int64_t s) {
          const float dz = sload(ptr_at<T>(job.dz, n, s, c));
          T* dx = ptr_at<T>(job.dx, n, s, c);
          if constexpr (kTraining) {
            *dx = static_cast<T>(bn::grad_input(dz, sload(ptr_at<T>(job.x, n, s, c)) - mean, alpha, beta, gamma));
          } else {
            *dx = static_cast<T>(bn::grad_input_eval(dz, alpha));
          }
        });
      }
    }
  }
}

// ---- entry points: the storage dtype (and options) chosen once per call ------------------------

template <template <typename> class Kernel, typename Job>
void by_storage(const Job& job, int64_t first, int64_t last) {
  switch (job.storage) {
    case Storage::Float: return Kernel<float>::run(job, first, last);
    case Storage::BFloat16: return Kernel<c10::BFloat16>::run(job, first, last);
    case Storage::Half: return Kernel<c10::Half>::run(job, first, last);
  }
}

template <typename T>
struct Stats {
  static void run(const BnStatsJob& job, int64_t first, int64_t last) { stats_items<T>(job, first, last); }
};
template <typename T>
struct Apply {
  static void run(const BnApplyJob& job, int64_t first, int64_t last) {
    if (job.residual.data != nullptr) return apply_items<T, true>(job, first, last);
    apply_items<T, false>(job, first, last);
  }
};
template <typename T>
struct GradReduce {
  static void run(const BnGradReduceJob& job, int64_t first, int64_t last) {
    grad_reduce_items<T>(job, first, last);
  }
};
template <typename T>
struct GradInput {
  static void run(const BnGradInputJob& job, int64_t first, int64_t last) {
    if (job.training) return grad_input_items<T, true>(job, first, last);
    grad_input_items<T, false>(job, first, last);
  }
};

}  // namespace

BnKernels bn_kernels() {
  return BnKernels{&by_storage<Stats, BnStatsJob>, &by_storage<Apply, BnApplyJob>,
                   &by_storage<GradReduce, BnGradReduceJob>, &by_storage<GradInput, BnGradInputJob>};
}

}  // namespace resfast::cpu::CPU_CAPABILITY
