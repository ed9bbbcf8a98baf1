// The five optimizer ops, written once over a Backend (CPU or CUDA) that supplies
//   template <int N, typename Math> static void apply(const std::vector<at::TensorList>& lists,
//       const at::Tensor& coef, const std::optional<at::Tensor>& grad_scale,
//       const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_clip, bool maximize,
//       const Math& math);
// and, for LARS, whose update needs every tensor's norms first (a reduction, then the update),
//   static void lars(const std::vector<at::TensorList>& lists, const at::Tensor& coef,
//       const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
//       const std::optional<at::Tensor>& grad_clip, bool adaptation, bool maximize, const LarsMath& math);
// Each op's lists are [params, grads, states...]; optional states are empty lists. N, the number of
// lists, is a compile-time constant so the per-element loops over them unroll; each op instantiates
// only the counts its options can produce.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "optim_math.h"

namespace resfast {

// The layout contract of the flat kernels: a dense param, and every other tensor of its update with the
// param's dtype, device, shape and strides, so that element k of each memory span is the same element.
// resfast/optim/_base.py's fast_layout states the same rule for installs without this extension.
inline bool dense_param(const at::Tensor& p) {
  return p.numel() <= 1 || p.is_non_overlapping_and_dense();
}

inline bool same_span(const at::Tensor& p, const at::Tensor& other) {
  return other.scalar_type() == p.scalar_type() && other.device() == p.device() && other.sizes() == p.sizes() &&
         (other.strides() == p.strides() || p.numel() <= 1);
}

// Per row (a param, then the tensors updated with it): does it meet the contract? The optimizers ask
// this for every param at every step, so it is native (a few ns per tensor instead of ~0.4 us).
inline std::vector<bool> layouts_fit(const std::vector<std::vector<at::Tensor>>& rows) {
  std::vector<bool> fit(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::vector<at::Tensor>& row = rows[i];
    TORCH_CHECK(!row.empty(), "resfast: layouts_fit: row ", i, " is empty");
    fit[i] = dense_param(row[0]) &&
             std::all_of(row.begin() + 1, row.end(), [&](const at::Tensor& t) { return same_span(row[0], t); });
  }
  return fit;
}

// Does a kept kernel call fit this step (resfast/optim/_step_cache.py asks once per call)? Every param is
// still at its address (`p.data = ...`, a cast or a move give it another), and every grad is strided
// and, where `layout` (the fast kernels), shares its param's dtype, device, shape and strides.
inline bool grads_fit(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<int64_t>& addresses, bool layout) {
  if (params.size() != grads.size() || params.size() != addresses.size()) return false;
  for (size_t i = 0; i < params.size(); ++i) {
    if (reinterpret_cast<int64_t>(params[i].data_ptr()) != addresses[i] || grads[i].layout() != at::kStrided) {
      return false;
    }
    if (layout && !same_span(params[i], grads[i])) return false;
  }
  return true;
}

// The ops are public (torch.ops.resfast.*): validate what the kernels assume, with clear errors.
// `columns`: the op's coefficient count (its Math::kColumns; resfast/kernels/optim_coef.py).
inline void check_lists(const std::vector<at::TensorList>& lists, const at::Tensor& coef, int64_t columns) {
  const at::TensorList params = lists[0];
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 2 && coef.is_contiguous() &&
                  coef.size(0) == static_cast<int64_t>(params.size()) && coef.size(1) == columns,
              "resfast: coef must be a contiguous float32 [n_tensors, ", columns, "] tensor, got ", coef.sizes());
  for (size_t k = 1; k < lists.size(); ++k) {
    TORCH_CHECK(lists[k].size() == params.size(), "resfast: tensor list ", k, " has ", lists[k].size(),
                " tensors, expected ", params.size());
  }
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "resfast: fused updates take float32, bfloat16 or float16 tensors, got ", dtype);
    TORCH_CHECK(dtype == params[0].scalar_type(), "resfast: one call updates tensors of one dtype, got ",
                params[0].scalar_type(), " and ", dtype);
    TORCH_CHECK(dense_param(p), "resfast: tensor ", t, " is not dense");
    TORCH_CHECK(p.device() == coef.device(), "resfast: tensor ", t, " is on ", p.device(),
                " but coef is on ", coef.device());
    for (size_t k = 1; k < lists.size(); ++k) {
      const at::Tensor& other = lists[k][t];
      TORCH_CHECK(same_span(p, other), "resfast: tensor ", t, " of list ", k, " must match its param's dtype, device, shape and strides");
    }
  }
}

// max_grad_norm's clip factor: one element, which every kernel reads as a float.
inline void check_grad_clip(const std::optional<at::Tensor>& grad_clip) {
  TORCH_CHECK(!grad_clip.has_value() || (grad_clip->numel() == 1 && grad_clip->is_floating_point()),
              "resfast: grad_clip must be a one-element floating-point tensor, got ",
              grad_clip.has_value() ? grad_clip->sizes() : at::IntArrayRef{});
}

template <typename Backend>
void sgd_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const at::Tensor& coef,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, bool has_wd,
          bool nesterov, bool maximize, const std::optional<at::Tensor>& grad_clip) {
  std::vector<at::TensorList> lists{params, grads};
  if (!momentum_buffers.empty()) lists.push_back(momentum_buffers);
  check_grad_clip(grad_clip);
  check_lists(lists, coef, SgdMath::kColumns);
  const SgdMath math{has_wd, nesterov};
  if (!momentum_buffers.empty()) {
    Backend::template apply<3>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
  } else {
    Backend::template apply<2>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
  }
}

template <typename Backend>
void rmsprop_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
              at::TensorList momentum_buffers, const at::Tensor& coef, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, bool has_wd, bool maximize,
              const std::optional<at::Tensor>& grad_clip) {
  std::vector<at::TensorList> lists{params, grads, square_avgs};
  if (!grad_avgs.empty()) lists.push_back(grad_avgs);
  if (!momentum_buffers.empty()) lists.push_back(momentum_buffers);
  check_grad_clip(grad_clip);
  check_lists(lists, coef, RmspropMath::kColumns);
  const RmspropMath math{has_wd, !grad_avgs.empty(), !momentum_buffers.empty()};
  switch (lists.size()) {
    case 3: return Backend::template apply<3>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
    case 4: return Backend::template apply<4>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
    default: return Backend::template apply<5>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
  }
}

template <typename Backend>
void adagrad_(at::TensorList params, at::TensorList grads, at::TensorList sums, const at::Tensor& coef,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, bool has_wd,
              bool maximize, const std::optional<at::Tensor>& grad_clip) {
  std::vector<at::TensorList> lists{params, grads, sums};
  check_grad_clip(grad_clip);
  check_lists(lists, coef, AdagradMath::kColumns);
  Backend::template apply<3>(lists, coef, grad_scale, found_inf, grad_clip, maximize, AdagradMath{has_wd});
}

template <typename Backend>
void adam_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, const at::Tensor& coef, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, int64_t wd_mode, bool maximize,
           const std::optional<at::Tensor>& grad_clip) {
  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs};
  if (!max_exp_avg_sqs.empty()) lists.push_back(max_exp_avg_sqs);
  check_grad_clip(grad_clip);
  check_lists(lists, coef, AdamMath::kColumns);
  TORCH_CHECK(wd_mode == AdamMath::kNone || wd_mode == AdamMath::kL2 || wd_mode == AdamMath::kDecoupled,
              "resfast: wd_mode must be 0 (none), 1 (l2) or 2 (decoupled), got ", wd_mode);
  const AdamMath math{static_cast<int>(wd_mode)};
  if (!max_exp_avg_sqs.empty()) {
    Backend::template apply<5>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
  } else {
    Backend::template apply<4>(lists, coef, grad_scale, found_inf, grad_clip, maximize, math);
  }
}

template <typename Backend>
void lars_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const at::Tensor& coef,
           const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, bool has_wd,
           bool lars_adaptation, bool nesterov, bool maximize, const std::optional<at::Tensor>& grad_clip) {
  const std::vector<at::TensorList> lists{params, grads, momentum_buffers};
  check_grad_clip(grad_clip);
  check_lists(lists, coef, LarsMath::kColumns);
  Backend::lars(lists, coef, grad_scale, found_inf, grad_clip, lars_adaptation, maximize,
                LarsMath{has_wd, nesterov, 0.f});
}

// The five ops' schemas (used inside TORCH_LIBRARY). Every op mutates its tensor lists in place and
// declares it ((a!) annotations).
#define RESFAST_DEFINE_OPTIM_SCHEMAS(m)                                                                          \
  m.def(                                                                                                         \
      "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor coef, "               \
      "Tensor? grad_scale, Tensor? found_inf, bool has_wd, bool nesterov, bool maximize, "                       \
      "Tensor? grad_clip=None) -> ()");                 \
  m.def(                                                                                                         \
      "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, Tensor(d!)[] grad_avgs, "     \
      "Tensor(e!)[] momentum_buffers, Tensor coef, Tensor? grad_scale, Tensor? found_inf, bool has_wd, "         \
      "bool maximize, Tensor? grad_clip=None) -> ()");                                                           \
  m.def(                                                                                                         \
      "adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] sums, Tensor coef, Tensor? grad_scale, "   \
      "Tensor? found_inf, bool has_wd, bool maximize, Tensor? grad_clip=None) -> ()");                                                   \
  m.def(                                                                                                         \
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "         \
      "Tensor(e!)[] max_exp_avg_sqs, Tensor coef, Tensor? grad_scale, Tensor? found_inf, int wd_mode, "          \
      "bool maximize, Tensor? grad_clip=None) -> ()");                                                           \
  m.def(                                                                                                         \
      "lars_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor coef, "              \
      "Tensor? grad_scale, Tensor? found_inf, bool has_wd, bool lars_adaptation, bool nesterov, "                \
      "bool maximize, Tensor? grad_clip=None) -> ()")

// Registers the five ops for one dispatch key (used inside TORCH_LIBRARY_IMPL).
#define RESFAST_REGISTER_OPTIM_OPS(m, Backend)     \
  m.impl("sgd_", &resfast::sgd_<Backend>);         \
  m.impl("rmsprop_", &resfast::rmsprop_<Backend>); \
  m.impl("adagrad_", &resfast::adagrad_<Backend>); \
  m.impl("adam_", &resfast::adam_<Backend>);       \
  m.impl("lars_", &resfast::lars_<Backend>)

}  // namespace resfast
