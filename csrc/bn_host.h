// Host-side pieces shared by the native BN drivers (the CPU one, csrc/cpu/bn.cpp; the CUDA one,
// csrc/bn_cuda_driver.h, built for the GPU by csrc/cuda/bn.cu and for the host by
// csrc/cpu/bn_cuda_on_host.cpp): the input checks, with the same messages on every device, and how a
// tensor is seen as (N, C, S) along one memory-contiguous axis (csrc/bn_plan.h).
//
// A tensor is read in place when its memory-contiguous axis is the plan's (channels-first: spatial,
// channels-last: channels); otherwise (rare: an expanded gradient, a strided crop) it is first copied
// into the plan's layout. Outputs have at::empty_like(x)'s layout, which the fake implementations
// promise torch.compile.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

#include "bn_plan.h"

namespace resfast::bn {

// (batch, flattened spatial, channel) element strides of t seen as (N, C, S); nullopt when its spatial
// dims cannot be flattened into one stride. Size-1 dims are skipped: their stride is arbitrary.
inline std::optional<std::array<int64_t, 3>> flat_strides(const at::Tensor& t) {
  int64_t stride_s = 1, outer_stride = 0;
  bool first = true;
  for (int64_t d = 2; d < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!first && outer_stride != t.size(d) * t.stride(d)) return std::nullopt;
    outer_stride = t.stride(d);
    stride_s = t.stride(d);
    first = false;
  }
  return std::array<int64_t, 3>{t.stride(0), stride_s, t.stride(1)};
}

// The layout every tensor of a call is walked in (bn_plan.h): decided by x, with the element counts.
struct Layout {
  int64_t N, C, S;
  bool channels_last;

  // Whether t can be walked in place: flattenable, with stride 1 along the inner axis (any stride
  // when that axis has one element).
  bool fits(const at::Tensor& t) const {
    const auto f = flat_strides(t);
    if (!f) return false;
    return channels_last ? ((*f)[2] == 1 || C == 1) : ((*f)[1] == 1 || S == 1);
  }

  // A fresh dense tensor of `like`'s shape and dtype in this layout.
  at::Tensor empty(const at::Tensor& like) const {
    if (!channels_last) return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
    std::vector<int64_t> sizes{like.size(0)};
    for (int64_t d = 2; d < like.dim(); ++d) sizes.push_back(like.size(d));
    sizes.push_back(like.size(1));
    return at::empty(sizes, like.options()).movedim(-1, 1);
  }

  // t itself when it fits, else a copy that does.
  at::Tensor conform(const at::Tensor& t) const { return fits(t) ? t : empty(t).copy_(t); }

  Operand operand(const at::Tensor& t) const {
    const auto f = flat_strides(t);
    TORCH_INTERNAL_ASSERT(f.has_value() && fits(t), "resfast: a BN operand does not fit the plan");
    return Operand{t.data_ptr(), (*f)[0], (*f)[1], (*f)[2]};
  }

  Plan plan() const { return make_plan(N, C, S, channels_last); }
};

// x's layout: runs along space when spatial positions are contiguous (NCHW), channels innermost when
// channels are (channels_last, (N, C)); any other x is copied contiguous first.
inline Layout layout_of(at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = N * C == 0 ? 0 : x.numel() / (N * C);
  if (const auto f = flat_strides(x)) {
    if (S > 1 && (*f)[1] == 1) return Layout{N, C, S, false};
    if ((*f)[2] == 1 || C == 1) return Layout{N, C, S, true};
  }
  x = x.contiguous();
  return Layout{N, C, S, S <= 1};
}

// An output: `out` is at::empty_like(x) (what the op promises); `target` is what the kernels write,
// out itself or, when out cannot be walked in the plan's layout, a tensor copied into out afterwards.
struct Output {
  at::Tensor out, target;

  Output(const at::Tensor& x, const Layout& layout) : out(at::empty_like(x)) {
    target = layout.fits(out) ? out : layout.empty(x);
  }

  at::Tensor finish() {
    if (!target.is_same(out)) out.copy_(target);
    return out;
  }
};

// ---- checks: the ops are public (torch.ops.resfast.*), so every assumption is an error message ----
// Every tensor of a call lives where x does: on the CPU, or on x's CUDA device.

// "CPU" or "CUDA", as the messages name the device type that a driver runs.
inline const char* device_kind(c10::DeviceType type) { return type == c10::DeviceType::CPU ? "CPU" : "CUDA"; }

// Whether t is on x's device (any CPU tensor is on the CPU).
inline bool on_device_of(const at::Tensor& t, const at::Tensor& x) { return t.device() == x.device(); }

inline void check_activation(const char* op, const char* name, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, "resfast::", op, ": ", name, " must be a ", device_kind(type),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "resfast::", op, ": ", name, " must be a strided tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "resfast::", op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 2, "resfast::", op, ": ", name, " must have at least 2 dims (N, C, ...), got shape ",
              t.sizes());
}

// A tensor of x's shape and dtype (residual, dy, y, dz), on x's device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(on_device_of(t, x) && t.layout() == at::kStrided, "resfast::", op, ": ", name, " must be a strided ",
              device_kind(x.device().type()), " tensor",
              x.is_cpu() ? "" : " on x's device " + x.device().str() + ", got one on " + t.device().str());
  TORCH_CHECK(t.sizes() == x.sizes(), "resfast::", op, ": ", name, " has shape ", t.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "resfast::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
}

// A per-channel tensor of C values of any floating dtype, on x's device.
inline void check_channels(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const int64_t C = x.size(1);
  TORCH_CHECK(on_device_of(t, x), "resfast::", op, ": ", name, " must be a ", device_kind(x.device().type()),
              " tensor", x.is_cpu() ? "" : " on x's device " + x.device().str(), ", got one on ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "resfast::", op, ": ", name, " must have shape (", C,
              ",) for x's ", C, " channels, got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "resfast::", op, ": ", name,
              " must be floating point, got ", t.scalar_type());
}

// torch.nn.functional.batch_norm's refusal of one value per channel in training, word for word (its
// ValueError, and its torch.Size repr). M: values per channel.
inline void check_values_per_channel(const at::Tensor& x, int64_t M) {
  TORCH_CHECK_VALUE(M != 1, "Expected more than 1 value per channel when training, got input size torch.Size(",
                    x.sizes(), ")");
}

// A per-channel tensor as a contiguous fp32 tensor (itself when it is one already).
inline at::Tensor fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

}  // namespace resfast::bn
