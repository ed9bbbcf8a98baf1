// The per-element optimizer updates, shared by the C++ (CPU) and CUDA kernels.
//
// Contract: the driver loads one element of each of a param's tensors into r[] as fp32, in the
// order param, grad, states... (the same order as the op's tensor lists), with the grad already
// unscaled (divided by the GradScaler's scale) and negated when maximizing. The update rewrites
// r[0] (param) and r[2...] (states); the driver stores those back rounded to the storage dtype.
// `c` is the tensor's row of coefficients, columns as documented in resfast/kernels/optim_coef.py.
// The maths is that of resfast/kernels/reference_optim.py, the specification. N, the number of
// tensors, is a template parameter: optional states exist only when N says so (if constexpr), which
// keeps every index provably in bounds.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace resfast {

// torch.maximum propagates NaN; fmaxf would drop it.
C10_HOST_DEVICE inline float max_propagate_nan(float a, float b) {
  return (a != a || a > b) ? a : b;
}

// torch.lerp's two forms: switching at weight 0.5 keeps an infinite `start` infinite (not NaN) for
// large weights, and matches torch's rounding.
C10_HOST_DEVICE inline float lerp(float start, float end, float weight) {
  return weight < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

struct SgdMath {
  bool has_wd, nesterov;
  // r: param, grad[, momentum_buffer];  c: lr, weight_decay, momentum, 1 - dampening, fresh
  template <int N>
  C10_HOST_DEVICE void operator()(float (&r)[N], const float* c) const {
    float g = r[1];
    if (has_wd) g += r[0] * c[1];
    if constexpr (N == 3) {
      // A fresh buffer starts as the gradient itself, undampened, as in torch.
      const float b = c[4] != 0.f ? g : r[2] * c[2] + g * c[3];
      r[2] = b;
      g = nesterov ? g + b * c[2] : b;
    }
    r[0] -= g * c[0];
  }
};

struct RmspropMath {
  bool has_wd, centered, has_momentum;
  // r: param, grad, square_avg[, grad_avg][, momentum_buffer]
  // c: lr, alpha, 1 - alpha, eps, weight_decay, momentum
  template <int N>
  C10_HOST_DEVICE void operator()(float (&r)[N], const float* c) const {
    float g = r[1];
    if (has_wd) g += r[0] * c[4];
    const float sq = r[2] * c[1] + g * g * c[2];
    r[2] = sq;
    float var = sq;
    if constexpr (N >= 4) {
      if (centered) {
        const float ga = lerp(r[3], g, c[2]);
        r[3] = ga;
        var = sq - ga * ga;
      }
    }
    const float avg = sqrtf(var) + c[3];
    if constexpr (N >= 4) {
      if (has_momentum) {
        const int k = N - 1;  // the momentum buffer is always the last list
        const float b = r[k] * c[5] + g / avg;
        r[k] = b;
        r[0] -= b * c[0];
        return;
      }
    }
    r[0] -= g / avg * c[0];
  }
};

struct AdagradMath {
  bool has_wd;
  // r: param, grad, sum;  c: clr, weight_decay, eps
  template <int N>
  C10_HOST_DEVICE void operator()(float (&r)[N], const float* c) const {
    float g = r[1];
    if (has_wd) g += r[0] * c[1];
    const float s = r[2] + g * g;
    r[2] = s;
    r[0] -= g / (sqrtf(s) + c[2]) * c[0];
  }
};

struct AdamMath {
  int wd_mode;  // 0 none, 1 added to the grad (Adam), 2 decoupled (AdamW)
  // r: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq (amsgrad)]
  // c: step_size, sqrt(bias_correction2), 1 - beta1, beta2, 1 - beta2, eps, weight decay term
  template <int N>
  C10_HOST_DEVICE void operator()(float (&r)[N], const float* c) const {
    float p = r[0];
    float g = r[1];
    if (wd_mode == 1) g += p * c[6];
    if (wd_mode == 2) p *= c[6];
    const float m = lerp(r[2], g, c[2]);
    float v = r[3] * c[3] + g * g * c[4];
    r[2] = m;
    r[3] = v;
    if constexpr (N == 5) {
      v = max_propagate_nan(r[4], v);
      r[4] = v;
    }
    r[0] = p - m / (sqrtf(v) / c[1] + c[5]) * c[0];
  }
};

// The part every driver shares: unscale the grad, negate it to maximize, run the update. Returns the
// unscaled grad, which the driver writes back when scaled (as torch's fused kernels do).
template <int N, typename Math>
C10_HOST_DEVICE inline float update_element(float (&r)[N], const float* c, bool scaled, float scale, bool maximize,
                                            const Math& math) {
  if (scaled) r[1] /= scale;
  const float unscaled = r[1];
  if (maximize) r[1] = -r[1];
  math(r, c);
  return unscaled;
}

}  // namespace resfast
