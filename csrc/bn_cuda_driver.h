// The host side of the CUDA BN driver, written once over a Launcher that runs the kernels of
// csrc/bn_cuda_kernels.h either on the GPU (csrc/cuda/bn.cu) or, every block and thread in turn, on
// the host (csrc/cpu/bn_cuda_on_host.cpp, for the CPU tests). A Launcher supplies
//   static constexpr c10::DeviceType kDevice;                 // the device its tensors are on
//   struct Guard { explicit Guard(const at::Device&); };      // makes x's device current
//   template <typename Kernel> static void launch(const Kernel&, int64_t blocks, const at::Device&);
//   static void zero(at::Tensor& counters);                   // int32 counters, on the current stream
//
// The ops have the CPU driver's semantics exactly (csrc/cpu/bn.cpp: same checks and messages, same
// outputs, dtypes and layouts, same maths from csrc/bn_math.h). Launches per op (plus a memset of
// the few per-group ticket counters before each reducing kernel, and a cast for per-channel inputs
// that are not contiguous fp32):
//   native_bn_stats_: 1 (statistics, merged and the running statistics updated by the last block
//                     of each group).
//   native_bn_forward: 1. native_bn_backward: 2 (dz and the sums; dx). native_bn_grad_input: 1.
// Nothing reads a device value on the host and all scratch comes from the caching allocator on the
// current stream, so the ops can be captured in a CUDA graph. Tensors that the kernels cannot walk in
// place are copied first, as by the CPU driver (csrc/bn_host.h).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "bn_cuda_kernels.h"
#include "bn_host.h"

namespace resfast::bn {

// The compile-time configuration of a launch: storage type, elements per access, layout.
template <typename T, int V, bool kLast>
struct Config {
  using type = T;
  static constexpr int vec = V;
  static constexpr bool last = kLast;
};

// f(Config<...>{}) for the storage dtype, vector width (1 or 16 bytes' worth) and layout of a call.
template <typename F>
void dispatch(at::ScalarType dtype, int vec, bool channels_last, F&& f) {
  auto with = [&](auto value) {
    using T = decltype(value);
    constexpr int kV = 16 / sizeof(T);
    if (vec == 1 && channels_last) return f(Config<T, 1, true>{});
    if (vec == 1) return f(Config<T, 1, false>{});
    if (channels_last) return f(Config<T, kV, true>{});
    return f(Config<T, kV, false>{});
  };
  switch (dtype) {  // check_activation admits only these three
    case at::kBFloat16: return with(c10::BFloat16{});
    case at::kHalf: return with(c10::Half{});
    default: return with(float{});
  }
}

// 16 / element size when every operand can be read in whole aligned 16-byte vectors along the
// layout's inner axis (the axis's length and the other strides multiples of it, 16-byte aligned
// addresses), else 1. Strides of single-element axes are never used and not looked at.
inline int vector_width(const Layout& layout, at::ScalarType dtype, std::initializer_list<Operand> operands) {
  const int64_t V = 16 / static_cast<int64_t>(c10::elementSize(dtype));
  bool ok = (layout.channels_last ? layout.C : layout.S) % V == 0;
  for (const Operand& o : operands) {
    if (o.data == nullptr) continue;
    ok = ok && reinterpret_cast<uintptr_t>(o.data) % 16 == 0 && (layout.N == 1 || o.stride_n % V == 0);
    if (layout.channels_last) {
      ok = ok && (layout.S == 1 || o.stride_s % V == 0);
    } else {
      ok = ok && (layout.C == 1 || o.stride_c % V == 0);
    }
  }
  return ok ? static_cast<int>(V) : 1;
}

// A running statistic as the kernels update it (any floating dtype, any stride).
inline ChannelRef channel_ref(const char* op, const char* name, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return ChannelRef{nullptr, 0, ChannelDtype::Float};
  ChannelDtype dtype = ChannelDtype::Float;
  switch (t->scalar_type()) {
    case at::kFloat: break;
    case at::kDouble: dtype = ChannelDtype::Double; break;
    case at::kHalf: dtype = ChannelDtype::Half; break;
    case at::kBFloat16: dtype = ChannelDtype::BFloat16; break;
    default:
      TORCH_CHECK(false, "resfast::", op, ": ", name, " must be float64, float32, bfloat16 or float16, got ",
                  t->scalar_type());
  }
  return ChannelRef{t->data_ptr(), t->stride(0), dtype};
}

inline const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

template <typename Launcher>
struct CudaDriver {
  static constexpr c10::DeviceType kDevice = Launcher::kDevice;

  template <typename Kernel>
  static void launch(const Kernel& kernel, const at::Device& device) {
    const int64_t blocks = kernel.g.p.items;
    TORCH_CHECK(blocks < (int64_t(1) << 31), "resfast: too many blocks for one BN launch: ", blocks);
    if (blocks > 0) Launcher::launch(kernel, blocks, device);
  }

  // Scratch of a reducing kernel: two fp32 partial results per (chunk, channel), and a zeroed ticket
  // counter per group.
  struct Scratch {
    at::Tensor partials, counters;
    Scratch(const CudaPlan& g, const at::Tensor& x)
        : partials(at::empty({2, g.p.C * g.p.chunks}, x.options().dtype(at::kFloat))),
          counters(at::empty({g.groups}, x.options().dtype(at::kInt))) {
      Launcher::zero(counters);
    }
    float* first() { return partials.data_ptr<float>(); }
    float* second() { return partials.data_ptr<float>() + partials.size(1); }
    int* tickets() { return counters.data_ptr<int>(); }
  };

  static std::tuple<at::Tensor, at::Tensor> stats_(const at::Tensor& x_in,
                                                   const std::optional<at::Tensor>& running_mean,
                                                   const std::optional<at::Tensor>& running_var, double momentum) {
    constexpr const char* op = "native_bn_stats_";
    check_activation(op, "x", x_in, kDevice);
    const int64_t C = x_in.size(1);
    TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "resfast::", op,
                ": running_mean and running_var must both be given or both be None");
    if (running_mean.has_value()) {
      check_channels(op, "running_mean", *running_mean, x_in);
      check_channels(op, "running_var", *running_var, x_in);
    }
    const ChannelRef rm = channel_ref(op, "running_mean", running_mean);
    const ChannelRef rv = channel_ref(op, "running_var", running_var);
    const int64_t M = C == 0 ? 0 : x_in.numel() / C;
    check_values_per_channel(x_in, M);
    const typename Launcher::Guard guard(x_in.device());
    const at::TensorOptions f32 = x_in.options().dtype(at::kFloat);
    at::Tensor mean = at::empty({C}, f32), var = at::empty({C}, f32);
    if (M == 0) {
      // No values: undefined statistics, and the running ones are left as they are (as torch does).
      mean.fill_(NAN);
      var.fill_(NAN);
      return {mean, var};
    }
    at::Tensor x = x_in;
    const Layout layout = layout_of(x);
    const Operand xo = layout.operand(x);
    const CudaPlan g =
        make_cuda_plan(layout.N, C, layout.S, layout.channels_last, vector_width(layout, x.scalar_type(), {xo}));
    Scratch scratch(g, x);
    const float unbias = static_cast<float>(double(M) / double(M - 1));
    dispatch(x.scalar_type(), g.vec, g.p.channels_last, [&](auto cfg) {
      using Cfg = decltype(cfg);
      const StatsKernel<typename Cfg::type, Cfg::vec, Cfg::last> kernel{
          g,  xo, scratch.first(), scratch.second(), scratch.tickets(), mean.data_ptr<float>(),
          var.data_ptr<float>(), rm, rv, static_cast<float>(momentum), unbias};
      launch(kernel, x.device());
    });
    return {mean, var};
  }

  static at::Tensor forward(const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& mean, const at::Tensor& var, double eps) {
    constexpr const char* op = "native_bn_forward";
    check_activation(op, "x", x_in, kDevice);
    if (residual.has_value()) check_like(op, "residual", *residual, x_in);
    if (weight.has_value()) check_channels(op, "weight", *weight, x_in);
    if (bias.has_value()) check_channels(op, "bias", *bias, x_in);
    check_channels(op, "mean", mean, x_in);
    check_channels(op, "var", var, x_in);
    if (x_in.numel() == 0) return at::empty_like(x_in);

    const typename Launcher::Guard guard(x_in.device());
    at::Tensor x = x_in;
    const Layout layout = layout_of(x);
    const at::Tensor mean_f = fp32(mean), var_f = fp32(var);
    const at::Tensor weight_f = weight.has_value() ? fp32(*weight) : at::Tensor();
    const at::Tensor bias_f = bias.has_value() ? fp32(*bias) : at::Tensor();
    const at::Tensor res = residual.has_value() ? layout.conform(*residual) : at::Tensor();
    Output y(x_in, layout);
    const Operand none{nullptr, 0, 0, 0};
    const Operand xo = layout.operand(x), ro = res.defined() ? layout.operand(res) : none;
    const Operand yo = layout.operand(y.target);
    const CudaPlan g = make_cuda_plan(layout.N, layout.C, layout.S, layout.channels_last,
                                      vector_width(layout, x.scalar_type(), {xo, ro, yo}));
    dispatch(x.scalar_type(), g.vec, g.p.channels_last, [&](auto cfg) {
      using Cfg = decltype(cfg);
      using T = typename Cfg::type;
      if (res.defined()) {
        launch(ApplyKernel<T, Cfg::vec, Cfg::last, true>{g, xo, ro, yo, mean_f.const_data_ptr<float>(),
                                                          var_f.const_data_ptr<float>(), data_or_null(weight_f),
                                                          data_or_null(bias_f), static_cast<float>(eps)},
               x.device());
      } else {
        launch(ApplyKernel<T, Cfg::vec, Cfg::last, false>{g, xo, none, yo, mean_f.const_data_ptr<float>(),
                                                           var_f.const_data_ptr<float>(), data_or_null(weight_f),
                                                           data_or_null(bias_f), static_cast<float>(eps)},
               x.device());
      }
    });
    return y.finish();
  }

  // Backward pass 2 (and the whole of native_bn_grad_input) over checked, conforming tensors: the
  // coefficients from the channel sums over `count` values (a device array, or count_value).
  static void launch_grad_input(const Layout& layout, const at::Tensor& dz, const at::Tensor& x, Output& dx,
                                const at::Tensor& mean_f, const at::Tensor& var_f, const at::Tensor& weight_f,
                                const float* sum_dz, const float* sum_dz_xhat, const float* count,
                                int64_t count_stride, float count_value, double eps, bool training) {
    const Operand dzo = layout.operand(dz), xo = layout.operand(x), dxo = layout.operand(dx.target);
    const int vec = training ? vector_width(layout, x.scalar_type(), {dzo, xo, dxo})
                             : vector_width(layout, x.scalar_type(), {dzo, dxo});
    const CudaPlan g = make_cuda_plan(layout.N, layout.C, layout.S, layout.channels_last, vec);
    dispatch(x.scalar_type(), g.vec, g.p.channels_last, [&](auto cfg) {
      using Cfg = decltype(cfg);
      using T = typename Cfg::type;
      auto run = [&](auto kernel) {
        kernel.g = g;
        kernel.dz = dzo;
        kernel.x = xo;
        kernel.dx = dxo;
        kernel.mean = mean_f.const_data_ptr<float>();
        kernel.var = var_f.const_data_ptr<float>();
        kernel.weight = data_or_null(weight_f);
        kernel.sum_dz = sum_dz;
        kernel.sum_dz_xhat = sum_dz_xhat;
        kernel.count = count;
        kernel.count_stride = count_stride;
        kernel.count_value = count_value;
        kernel.eps = static_cast<float>(eps);
        launch(kernel, x.device());
      };
      if (training) {
        run(GradInputKernel<T, Cfg::vec, Cfg::last, true>{});
      } else {
        run(GradInputKernel<T, Cfg::vec, Cfg::last, false>{});
      }
    });
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& y_in,
      const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, double eps,
      bool training, bool need_dx) {
    constexpr const char* op = "native_bn_backward";
    check_activation(op, "x", x_in, kDevice);
    check_like(op, "dy", dy_in, x_in);
    check_like(op, "y", y_in, x_in);
    if (weight.has_value()) check_channels(op, "weight", *weight, x_in);
    check_channels(op, "mean", mean, x_in);
    check_channels(op, "var", var, x_in);
    const typename Launcher::Guard guard(x_in.device());
    const int64_t C = x_in.size(1);
    const at::TensorOptions f32 = x_in.options().dtype(at::kFloat);
    at::Tensor dweight = at::empty({C}, f32), dbias = at::empty({C}, f32);
    if (x_in.numel() == 0) {
      dweight.zero_();
      dbias.zero_();
      return {need_dx ? at::empty_like(x_in) : at::empty({0}, x_in.options()), at::empty_like(x_in), dweight, dbias};
    }

    at::Tensor x = x_in;
    const Layout layout = layout_of(x);
    const at::Tensor dy = layout.conform(dy_in), y = layout.conform(y_in);
    const at::Tensor mean_f = fp32(mean), var_f = fp32(var);
    const at::Tensor weight_f = weight.has_value() ? fp32(*weight) : at::Tensor();

    // Pass 1: dz, and per channel dweight and dbias (the sums dx's coefficients are made of).
    Output dz(x_in, layout);
    const Operand dyo = layout.operand(dy), yo = layout.operand(y), xo = layout.operand(x);
    const Operand dzo = layout.operand(dz.target);
    const CudaPlan g = make_cuda_plan(layout.N, C, layout.S, layout.channels_last,
                                      vector_width(layout, x.scalar_type(), {dyo, yo, xo, dzo}));
    Scratch scratch(g, x);
    dispatch(x.scalar_type(), g.vec, g.p.channels_last, [&](auto cfg) {
      using Cfg = decltype(cfg);
      const GradReduceKernel<typename Cfg::type, Cfg::vec, Cfg::last> kernel{
          g,        dyo,       yo,      xo,      dzo, mean_f.const_data_ptr<float>(), var_f.const_data_ptr<float>(),
          data_or_null(weight_f),      static_cast<float>(eps), training, scratch.first(), scratch.second(),
          scratch.tickets(),           dweight.data_ptr<float>(), dbias.data_ptr<float>()};
      launch(kernel, x.device());
    });

    at::Tensor dx_out = at::empty({0}, x_in.options());
    if (need_dx) {
      Output dx(x_in, layout);
      launch_grad_input(layout, dz.target, x, dx, mean_f, var_f, weight_f, dbias.const_data_ptr<float>(),
                        dweight.const_data_ptr<float>(), nullptr, 0, static_cast<float>(g.p.M), eps, training);
      dx_out = dx.finish();
    }
    return {dx_out, dz.finish(), dweight, dbias};
  }

  static at::Tensor grad_input(const at::Tensor& dz_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                               const at::Tensor& mean, const at::Tensor& var, double eps, const at::Tensor& sum_dz,
                               const at::Tensor& sum_dz_xhat, const at::Tensor& count) {
    constexpr const char* op = "native_bn_grad_input";
    check_activation(op, "x", x_in, kDevice);
    const int64_t C = x_in.size(1);
    check_like(op, "dz", dz_in, x_in);
    if (weight.has_value()) check_channels(op, "weight", *weight, x_in);
    check_channels(op, "mean", mean, x_in);
    check_channels(op, "var", var, x_in);
    check_channels(op, "sum_dz", sum_dz, x_in);
    check_channels(op, "sum_dz_xhat", sum_dz_xhat, x_in);
    // A count on the CPU is read there (no device value is read on the host); one on x's device is
    // read by the kernel.
    TORCH_CHECK((count.device().is_cpu() || on_device_of(count, x_in)) &&
                    (count.numel() == 1 || (count.dim() == 1 && count.size(0) == C)),
                "resfast::", op, ": count must be a CPU tensor", x_in.is_cpu() ? "" : " or one on x's device",
                " of 1 or ", C, " values, got shape ", count.sizes(),
                x_in.is_cpu() ? "" : " on " + count.device().str());
    if (x_in.numel() == 0) return at::empty_like(x_in);

    const typename Launcher::Guard guard(x_in.device());
    at::Tensor x = x_in;
    const Layout layout = layout_of(x);
    const at::Tensor dz = layout.conform(dz_in);
    const at::Tensor mean_f = fp32(mean), var_f = fp32(var);
    const at::Tensor weight_f = weight.has_value() ? fp32(*weight) : at::Tensor();
    const at::Tensor sum_dz_f = fp32(sum_dz), sum_dz_xhat_f = fp32(sum_dz_xhat);
    at::Tensor counts;
    float count_value = 0.f;
    if (count.numel() == 1 && count.device().is_cpu()) {
      count_value = fp32(count.reshape({-1})).const_data_ptr<float>()[0];
    } else {
      // Per-channel counts from the CPU are copied to the device (synchronous from pageable memory;
      // resfast's synchronised BN passes a count that is already on the device).
      counts = fp32(count.reshape({-1})).to(x.device());
    }
    Output dx(x_in, layout);
    launch_grad_input(layout, dz, x, dx, mean_f, var_f, weight_f, sum_dz_f.const_data_ptr<float>(),
                      sum_dz_xhat_f.const_data_ptr<float>(), data_or_null(counts),
                      counts.defined() && counts.numel() > 1 ? 1 : 0, count_value, eps, /*training=*/true);
    return dx.finish();
  }
};

}  // namespace resfast::bn
