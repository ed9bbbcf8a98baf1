// The per-element optimizer updates, shared by the C++ (CPU) and CUDA kernels.
//
// Contract: the driver loads one element (CUDA: T = float) or one SIMD vector of elements (CPU:
// T = at::vec::Vectorized<float>) of each of a param's tensors into r[] as fp32, in the order param,
// grad, states... (the same order as the op's tensor lists), with the grad already unscaled (divided by
// the GradScaler's scale) and negated when maximizing. The update rewrites r[0] (param) and r[2...]
// (states); the driver stores those back rounded to the storage dtype. `c` is the tensor's row of
// coefficients, kColumns of them, as documented in resfast/kernels/optim_coef.py; every branch depends on a
// coefficient or an option, never on an element, so one code path serves scalars and vectors.
// The maths is that of resfast/kernels/reference_optim.py, the specification. N, the number of
// tensors, is a template parameter: optional states exist only when N says so (if constexpr), which
// keeps every index provably in bounds.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace resfast {

// The element functions the maths needs beyond + - * /, for T = float here; the CPU kernels
// specialise it for their SIMD vector type (csrc/cpu/optim_kernels_impl.h).
template <typename T>
struct Elementwise {
  C10_HOST_DEVICE static float sqrt(float x) { return sqrtf(x); }
  // torch.maximum propagates NaN; fmaxf would drop it.
  C10_HOST_DEVICE static float max_propagate_nan(float a, float b) { return (a != a || a > b) ? a : b; }
};

// torch.lerp's two forms: switching at weight 0.5 keeps an infinite `start` infinite (not NaN) for
// large weights, and matches torch's rounding. The weight is a coefficient, the same for every element.
template <typename T>
C10_HOST_DEVICE inline T lerp(const T& start, const T& end, float weight) {
  return weight < 0.5f ? start + T(weight) * (end - start) : end - (end - start) * T(1.0f - weight);
}

struct SgdMath {
  static constexpr int kColumns = 5;
  bool has_wd, nesterov;
  // r: param, grad[, momentum_buffer];  c: lr, weight_decay, momentum, 1 - dampening, fresh
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T g = r[1];
    if (has_wd) g = g + r[0] * T(c[1]);
    if constexpr (N == 3) {
      // A fresh buffer starts as the gradient itself, undampened, as in torch.
      const T b = c[4] != 0.f ? g : r[2] * T(c[2]) + g * T(c[3]);
      r[2] = b;
      g = nesterov ? g + b * T(c[2]) : b;
    }
    r[0] = r[0] - g * T(c[0]);
  }
};

struct RmspropMath {
  static constexpr int kColumns = 6;
  bool has_wd, centered, has_momentum;
  // r: param, grad, square_avg[, grad_avg][, momentum_buffer]
  // c: lr, alpha, 1 - alpha, eps, weight_decay, momentum
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T g = r[1];
    if (has_wd) g = g + r[0] * T(c[4]);
    const T sq = r[2] * T(c[1]) + g * g * T(c[2]);
    r[2] = sq;
    T var = sq;
    if constexpr (N >= 4) {
      if (centered) {
        const T ga = lerp(r[3], g, c[2]);
        r[3] = ga;
        var = sq - ga * ga;
      }
    }
    const T avg = Elementwise<T>::sqrt(var) + T(c[3]);
    if constexpr (N >= 4) {
      if (has_momentum) {
        const int k = N - 1;  // the momentum buffer is always the last list
        const T b = r[k] * T(c[5]) + g / avg;
        r[k] = b;
        r[0] = r[0] - b * T(c[0]);
        return;
      }
    }
    r[0] = r[0] - g / avg * T(c[0]);
  }
};

struct AdagradMath {
  static constexpr int kColumns = 3;
  bool has_wd;
  // r: param, grad, sum;  c: clr, weight_decay, eps
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T g = r[1];
    if (has_wd) g = g + r[0] * T(c[1]);
    const T s = r[2] + g * g;
    r[2] = s;
    r[0] = r[0] - g / (Elementwise<T>::sqrt(s) + T(c[2])) * T(c[0]);
  }
};

struct AdamMath {
  static constexpr int kColumns = 7;
  int wd_mode;  // 0 none, 1 added to the grad (Adam), 2 decoupled (AdamW)
  // r: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq (amsgrad)]
  // c: step_size, sqrt(bias_correction2), 1 - beta1, beta2, 1 - beta2, eps, weight decay term
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T p = r[0];
    T g = r[1];
    if (wd_mode == 1) g = g + p * T(c[6]);
    if (wd_mode == 2) p = p * T(c[6]);
    const T m = lerp(r[2], g, c[2]);
    T v = r[3] * T(c[3]) + g * g * T(c[4]);
    r[2] = m;
    r[3] = v;
    if constexpr (N == 5) {
      v = Elementwise<T>::max_propagate_nan(r[4], v);
      r[4] = v;
    }
    r[0] = p - m / (Elementwise<T>::sqrt(v) / T(c[1]) + T(c[5])) * T(c[0]);
  }
};

// The part every driver shares: unscale the grad, negate it to maximize, run the update. Returns the
// unscaled grad, which the driver writes back when scaled (as torch's fused kernels do).
template <int N, typename Math, typename T>
C10_HOST_DEVICE inline T update_element(T (&r)[N], const float* c, bool scaled, float scale, bool maximize,
                                        const Math& math) {
  if (scaled) r[1] = r[1] / T(scale);
  const T unscaled = r[1];
  if (maximize) r[1] = -r[1];
  math(r, c);
  return unscaled;
}

}  // namespace resfast
