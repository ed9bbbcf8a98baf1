// The native BN ops on CPU tensors: input checks, the layout plan (csrc/bn_plan.h), allocation,
// threads, and the per-channel steps between passes (merging partial results, coefficients, running
// statistics); the passes themselves are bn_kernels_impl.h, compiled here for the baseline and in
// bn_avx2.cpp / bn_avx512.cpp, the build matching torch's own CPU capability running.
//
// Passes over the activation (E elements of x's dtype), as in the Triton kernels:
//   training forward: statistics read x (1 E); normalise reads x and residual, writes y (3 E).
//   backward: pass 1 reads dy, y, x and writes dz = dresidual (4 E); pass 2 reads dz (and x when
//   training) and writes dx (3 E). Writing dz in pass 1 lets pass 2 read it instead of dy and y.
// Checks and layouts (shared with the CUDA driver) are csrc/bn_host.h.
#include "bn.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <array>
#include <string>
#include <vector>

#include "../bn_host.h"
#include "bn_kernels_impl.h"
#include "optim_kernels.h"  // kernel_isa_name: the instruction set the optimizer kernels chose

namespace resfast::cpu {

namespace {

using bn::check_activation;
using bn::check_like;
using bn::fp32;
using bn::Layout;
using bn::Output;

// The build of the kernels for the instruction set the optimizer kernels (and torch) run.
const BnKernels& kernels() {
  static const BnKernels chosen = [] {
#if RESFAST_CPU_X86_VARIANTS
    const std::string isa = kernel_isa_name();
    if (isa == "avx512") return AVX512::bn_kernels();
    if (isa == "avx2") return AVX2::bn_kernels();
#endif
    return DEFAULT::bn_kernels();
  }();
  return chosen;
}

// A thread's task holds at least this many elements; a pass of at most this many runs on the calling
// thread. An eighth of torch's own grain (at::internal::GRAIN_SIZE): with torch's, the small layers of
// a CIFAR ResNet at batch 32 (8192-32768 values) ran on one thread while eager's BN used them all, and
// the fused model trained 0.96x as fast as the unfused one on 2 threads; with this grain and the
// plan's kMinItems, 1.01-1.02x (benchmarks/RESULTS.md).
constexpr int64_t kMinTaskElements = 1 << 12;

Storage storage_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return Storage::BFloat16;
    case at::kHalf: return Storage::Half;
    default: return Storage::Float;  // check_activation admits only these three
  }
}

// Runs kernel(job, first, last) over every item of the plan, on the available threads in tasks of at
// least kMinTaskElements elements (on the calling thread when there is one task's worth or less).
template <typename Job>
void run_items(void (*kernel)(const Job&, int64_t, int64_t), const Job& job, int64_t elements) {
  const int64_t items = job.plan.items;
  if (items == 0) return;
  const int64_t grain = std::max<int64_t>(1, (items * kMinTaskElements + elements - 1) / std::max<int64_t>(elements, 1));
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) { kernel(job, first, last); });
}

// C values: t's as fp32, or `fill` when t is absent.
std::vector<float> channel_values(const std::optional<at::Tensor>& t, int64_t C, float fill) {
  if (!t.has_value()) return std::vector<float>(C, fill);
  const at::Tensor f = fp32(*t);
  const float* p = f.const_data_ptr<float>();
  return std::vector<float>(p, p + C);
}

// Writes fp32 values into a per-channel tensor of any floating dtype and stride, rounding once.
void store_channels(at::Tensor& t, const std::vector<float>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "resfast_bn_store_channels", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (const int64_t c : c10::irange(t.numel())) p[c * stride] = static_cast<scalar_t>(values[c]);
  });
}

// f(c) for every channel, on the available threads when the channels' work (merging `work_per_channel`
// partial results each) is worth it. Each channel's partials are merged in chunk order, in double, so
// that many partials add no rounding of their own and the result does not depend on the threads.
template <typename F>
void for_each_channel_parallel(int64_t C, int64_t work_per_channel, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(work_per_channel, 1));
  at::parallel_for(0, C, grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) f(c);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats_(const at::Tensor& x_in, const std::optional<at::Tensor>& running_mean,
                                             const std::optional<at::Tensor>& running_var, double momentum) {
  constexpr const char* op = "native_bn_stats_";
  check_activation(op, "x", x_in, c10::DeviceType::CPU);
  const int64_t C = x_in.size(1);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "resfast::", op,
              ": running_mean and running_var must both be given or both be None");
  if (running_mean.has_value()) {
    bn::check_channels(op, "running_mean", *running_mean, x_in);
    bn::check_channels(op, "running_var", *running_var, x_in);
  }
  const int64_t M = C == 0 ? 0 : x_in.numel() / C;
  bn::check_values_per_channel(x_in, M);
  const at::TensorOptions f32 = x_in.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({C}, f32), var = at::empty({C}, f32);
  if (M == 0) {
    // No values: undefined statistics, and the running ones are left as they are (as torch does).
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  at::Tensor x = x_in;
  const Layout layout = bn::layout_of(x);
  const bn::Plan plan = layout.plan();
  std::vector<float> partial_mean(C * plan.chunks), partial_m2(C * plan.chunks);
  const BnStatsJob job{plan, storage_of(x), layout.operand(x), partial_mean.data(), partial_m2.data()};
  run_items(kernels().stats, job, x.numel());

  float* mean_p = mean.data_ptr<float>();
  float* var_p = var.data_ptr<float>();
  for_each_channel_parallel(C, plan.chunks, [&](int64_t c) {
    bn::Moments<double> acc{0.0, 0.0, 0.0};
    for (int64_t j = 0; j < plan.chunks; ++j) {
      const int64_t i = bn::partial_index(plan, j, c);
      bn::merge(acc, bn::Moments<double>{partial_mean[i], partial_m2[i], double(bn::chunk_count(plan, j))});
    }
    mean_p[c] = static_cast<float>(acc.mean);
    var_p[c] = static_cast<float>(acc.m2 / double(M));
  });
  if (running_mean.has_value()) {
    std::vector<float> rm = channel_values(running_mean, C, 0.f), rv = channel_values(running_var, C, 0.f);
    const float unbias = static_cast<float>(double(M) / double(M - 1));
    for (int64_t c = 0; c < C; ++c) {
      bn::update_running(rm[c], rv[c], mean_p[c], var_p[c], unbias, static_cast<float>(momentum));
    }
    at::Tensor rm_t = *running_mean, rv_t = *running_var;
    store_channels(rm_t, rm);
    store_channels(rv_t, rv);
  }
  return {mean, var};
}

at::Tensor bn_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& mean, const at::Tensor& var, double eps) {
  constexpr const char* op = "native_bn_forward";
  check_activation(op, "x", x_in, c10::DeviceType::CPU);
  const int64_t C = x_in.size(1);
  if (residual.has_value()) check_like(op, "residual", *residual, x_in);
  if (weight.has_value()) bn::check_channels(op, "weight", *weight, x_in);
  if (bias.has_value()) bn::check_channels(op, "bias", *bias, x_in);
  bn::check_channels(op, "mean", mean, x_in);
  bn::check_channels(op, "var", var, x_in);
  if (x_in.numel() == 0) return at::empty_like(x_in);

  at::Tensor x = x_in;
  const Layout layout = bn::layout_of(x);
  // Per channel: y = relu((x - mean) * scale + bias + residual), scale = weight / sqrt(var + eps).
  std::vector<float> mean_v = channel_values(mean, C, 0.f), scale = channel_values(var, C, 0.f);
  const std::vector<float> weight_v = channel_values(weight, C, 1.f), bias_v = channel_values(bias, C, 0.f);
  for (int64_t c = 0; c < C; ++c) scale[c] = bn::inv_std(scale[c], static_cast<float>(eps)) * weight_v[c];
  at::Tensor res;
  if (residual.has_value()) res = layout.conform(*residual);
  Output y(x_in, layout);
  const bn::Operand none{nullptr, 0, 0, 0};
  const BnApplyJob job{layout.plan(),   storage_of(x),  layout.operand(x),
                       res.defined() ? layout.operand(res) : none,
                       layout.operand(y.target), mean_v.data(), scale.data(), bias_v.data()};
  run_items(kernels().apply, job, x.numel());
  return y.finish();
}

namespace {

// Backward pass 2 over checked, conforming tensors, with per-channel coefficients.
void launch_grad_input(const Layout& layout, const at::Tensor& dz, const at::Tensor& x, Output& dx,
                       const std::vector<float>& mean, const std::vector<bn::GradCoefficients>& coef,
                       bool training) {
  const int64_t C = layout.C;
  std::vector<float> alpha(C), beta(C), gamma(C);
  for (int64_t c = 0; c < C; ++c) {
    alpha[c] = coef[c].alpha;
    beta[c] = coef[c].beta;
    gamma[c] = coef[c].gamma;
  }
  const BnGradInputJob job{layout.plan(),        storage_of(x), layout.operand(dz),
                           layout.operand(x),    layout.operand(dx.target),
                           mean.data(),          alpha.data(),  beta.data(),
                           gamma.data(),         training};
  run_items(kernels().grad_input, job, x.numel());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& y_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool training, bool need_dx) {
  constexpr const char* op = "native_bn_backward";
  check_activation(op, "x", x_in, c10::DeviceType::CPU);
  const int64_t C = x_in.size(1);
  check_like(op, "dy", dy_in, x_in);
  check_like(op, "y", y_in, x_in);
  if (weight.has_value()) bn::check_channels(op, "weight", *weight, x_in);
  bn::check_channels(op, "mean", mean, x_in);
  bn::check_channels(op, "var", var, x_in);
  const at::TensorOptions f32 = x_in.options().dtype(at::kFloat);
  at::Tensor dweight = at::empty({C}, f32), dbias = at::empty({C}, f32);
  if (x_in.numel() == 0) {
    dweight.zero_();
    dbias.zero_();
    return {need_dx ? at::empty_like(x_in) : at::empty({0}, x_in.options()), at::empty_like(x_in), dweight, dbias};
  }

  at::Tensor x = x_in;
  const Layout layout = bn::layout_of(x);
  const bn::Plan plan = layout.plan();
  const at::Tensor dy = layout.conform(dy_in), y = layout.conform(y_in);
  const std::vector<float> mean_v = channel_values(mean, C, 0.f), var_v = channel_values(var, C, 0.f);
  const std::vector<float> weight_v = channel_values(weight, C, 1.f);

  // Pass 1: dz and the per-(item, channel) sums.
  Output dz(x_in, layout);
  std::vector<float> partial_dz(C * plan.chunks), partial_dz_xc(C * plan.chunks);
  const BnGradReduceJob reduce{plan,
                               storage_of(x),
                               layout.operand(dy),
                               layout.operand(y),
                               layout.operand(x),
                               layout.operand(dz.target),
                               mean_v.data(),
                               partial_dz.data(),
                               partial_dz_xc.data()};
  run_items(kernels().grad_reduce, reduce, x.numel());

  // Per channel: the sums, then dweight, dbias and dx's coefficients.
  std::vector<bn::GradCoefficients> coef(C);
  float* dweight_p = dweight.data_ptr<float>();
  float* dbias_p = dbias.data_ptr<float>();
  const float count = static_cast<float>(plan.M);
  for_each_channel_parallel(C, plan.chunks, [&](int64_t c) {
    double sum_dz = 0.0, sum_dz_xc = 0.0;
    for (int64_t j = 0; j < plan.chunks; ++j) {
      const int64_t i = bn::partial_index(plan, j, c);
      sum_dz += partial_dz[i];
      sum_dz_xc += partial_dz_xc[i];
    }
    const float invstd = bn::inv_std(var_v[c], static_cast<float>(eps));
    coef[c] = bn::grad_coefficients(static_cast<float>(sum_dz), static_cast<float>(sum_dz_xc) * invstd, invstd,
                                    weight_v[c], count, training);
    dweight_p[c] = coef[c].dweight;
    dbias_p[c] = coef[c].dbias;
  });

  at::Tensor dx_out = at::empty({0}, x_in.options());
  if (need_dx) {
    Output dx(x_in, layout);
    launch_grad_input(layout, dz.target, x, dx, mean_v, coef, training);
    dx_out = dx.finish();
  }
  return {dx_out, dz.finish(), dweight, dbias};
}

at::Tensor bn_grad_input(const at::Tensor& dz_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                         const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& sum_dz,
                         const at::Tensor& sum_dz_xhat, const at::Tensor& count) {
  constexpr const char* op = "native_bn_grad_input";
  check_activation(op, "x", x_in, c10::DeviceType::CPU);
  const int64_t C = x_in.size(1);
  check_like(op, "dz", dz_in, x_in);
  if (weight.has_value()) bn::check_channels(op, "weight", *weight, x_in);
  bn::check_channels(op, "mean", mean, x_in);
  bn::check_channels(op, "var", var, x_in);
  bn::check_channels(op, "sum_dz", sum_dz, x_in);
  bn::check_channels(op, "sum_dz_xhat", sum_dz_xhat, x_in);
  TORCH_CHECK(count.device().is_cpu() && (count.numel() == 1 || (count.dim() == 1 && count.size(0) == C)),
              "resfast::", op, ": count must be a CPU tensor of 1 or ", C, " values, got shape ", count.sizes());
  if (x_in.numel() == 0) return at::empty_like(x_in);

  at::Tensor x = x_in;
  const Layout layout = bn::layout_of(x);
  const at::Tensor dz = layout.conform(dz_in);
  const std::vector<float> mean_v = channel_values(mean, C, 0.f), var_v = channel_values(var, C, 0.f);
  const std::vector<float> weight_v = channel_values(weight, C, 1.f);
  const std::vector<float> s_dz = channel_values(sum_dz, C, 0.f), s_dz_xhat = channel_values(sum_dz_xhat, C, 0.f);
  const at::Tensor counts = fp32(count.reshape({-1}));
  const float* count_p = counts.const_data_ptr<float>();
  std::vector<bn::GradCoefficients> coef(C);
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = bn::inv_std(var_v[c], static_cast<float>(eps));
    coef[c] = bn::grad_coefficients(s_dz[c], s_dz_xhat[c], invstd, weight_v[c], count_p[counts.numel() == 1 ? 0 : c],
                                    /*training=*/true);
  }
  Output dx(x_in, layout);
  launch_grad_input(layout, dz, x, dx, mean_v, coef, /*training=*/true);
  return dx.finish();
}

}  // namespace resfast::cpu
