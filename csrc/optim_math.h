// The per-element optimizer updates, shared by the C++ (CPU) and CUDA kernels.
//
// Contract: the driver loads one element (CUDA: T = float) or one SIMD vector of elements (CPU:
// T = at::vec::Vectorized<float>) of each of a param's tensors into r[] as fp32, in the order param,
// grad, states... (the same order as the op's tensor lists), with the grad already unscaled (divided by
// the GradScaler's scale), clipped (multiplied by max_grad_norm's factor) and negated when maximizing. The update rewrites r[0] (param) and r[2...]
// (states); the driver stores those back rounded to the storage dtype. `c` is the tensor's row of
// coefficients, kColumns of them, named in each maths' Column enum; every branch depends on a
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

// Each maths names its coefficient columns, in the order of resfast/kernels/optim_spec.py's SPECS
// (exported as resfast._C.COEF_COLUMNS and checked against it by tests/test_optim_spec.py).

struct SgdMath {
  enum Column : int { kLr, kWeightDecay, kMomentum, kOneMinusDampening, kFresh, kColumns };
  static constexpr const char* kColumnNames[kColumns] = {"lr", "weight_decay", "momentum",
                                                         "one_minus_dampening", "fresh"};
  bool has_wd, nesterov;
  // r: param, grad[, momentum_buffer]
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T g = r[1];
    if (has_wd) g = g + r[0] * T(c[kWeightDecay]);
    if constexpr (N == 3) {
      // A fresh buffer starts as the gradient itself, undampened, as in torch.
      const T b = c[kFresh] != 0.f ? g : r[2] * T(c[kMomentum]) + g * T(c[kOneMinusDampening]);
      r[2] = b;
      g = nesterov ? g + b * T(c[kMomentum]) : b;
    }
    r[0] = r[0] - g * T(c[kLr]);
  }
};

struct RmspropMath {
  enum Column : int { kLr, kAlpha, kOneMinusAlpha, kEps, kWeightDecay, kMomentum, kColumns };
  static constexpr const char* kColumnNames[kColumns] = {"lr",  "alpha",        "one_minus_alpha",
                                                         "eps", "weight_decay", "momentum"};
  bool has_wd, centered, has_momentum;
  // r: param, grad, square_avg[, grad_avg][, momentum_buffer]
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T g = r[1];
    if (has_wd) g = g + r[0] * T(c[kWeightDecay]);
    const T sq = r[2] * T(c[kAlpha]) + g * g * T(c[kOneMinusAlpha]);
    r[2] = sq;
    T var = sq;
    if constexpr (N >= 4) {
      if (centered) {
        const T ga = lerp(r[3], g, c[kOneMinusAlpha]);
        r[3] = ga;
        var = sq - ga * ga;
      }
    }
    const T avg = Elementwise<T>::sqrt(var) + T(c[kEps]);
    if constexpr (N >= 4) {
      if (has_momentum) {
        const int k = N - 1;  // the momentum buffer is always the last list
        const T b = r[k] * T(c[kMomentum]) + g / avg;
        r[k] = b;
        r[0] = r[0] - b * T(c[kLr]);
        return;
      }
    }
    r[0] = r[0] - g / avg * T(c[kLr]);
  }
};

struct AdagradMath {
  enum Column : int { kClr, kWeightDecay, kEps, kColumns };  // clr = lr / (1 + (step - 1) * lr_decay)
  static constexpr const char* kColumnNames[kColumns] = {"clr", "weight_decay", "eps"};
  bool has_wd;
  // r: param, grad, sum
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T g = r[1];
    if (has_wd) g = g + r[0] * T(c[kWeightDecay]);
    const T s = r[2] + g * g;
    r[2] = s;
    r[0] = r[0] - g / (Elementwise<T>::sqrt(s) + T(c[kEps])) * T(c[kClr]);
  }
};

struct AdamMath {
  // step_size = lr / (1 - beta1^step), sqrt_bias_correction2 = sqrt(1 - beta2^step),
  // weight_decay_term: the decay (kL2) or 1 - lr * decay (kDecoupled)
  enum Column : int {
    kStepSize, kSqrtBiasCorrection2, kOneMinusBeta1, kBeta2, kOneMinusBeta2, kEps, kWeightDecayTerm, kColumns
  };
  static constexpr const char* kColumnNames[kColumns] = {
      "step_size", "sqrt_bias_correction2", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
      "weight_decay_term"};
  // How weight decay applies: the values of optim_spec.py's ADAM_WEIGHT_DECAY.
  enum WeightDecay : int { kNone = 0, kL2 = 1, kDecoupled = 2 };
  int wd_mode;
  // r: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq (amsgrad)]
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    T p = r[0];
    T g = r[1];
    if (wd_mode == kL2) g = g + p * T(c[kWeightDecayTerm]);
    if (wd_mode == kDecoupled) p = p * T(c[kWeightDecayTerm]);
    const T m = lerp(r[2], g, c[kOneMinusBeta1]);
    T v = r[3] * T(c[kBeta2]) + g * g * T(c[kOneMinusBeta2]);
    r[2] = m;
    r[3] = v;
    if constexpr (N == 5) {
      v = Elementwise<T>::max_propagate_nan(r[4], v);
      r[4] = v;
    }
    r[0] = p - m / (Elementwise<T>::sqrt(v) / T(c[kSqrtBiasCorrection2]) + T(c[kEps])) * T(c[kStepSize]);
  }
};

// LARS with the learning rate inside the momentum buffer (the MLPerf rule). Its learning rate is scaled
// per tensor by a trust ratio that depends on the whole tensor's norms, so the drivers first reduce
// every tensor's sums of squares, then set `scaled_lr` (lr * trust, from scaled_lr_of below) in their
// copy of this maths for each tensor before updating its elements; the element update reads no lr column.
struct LarsMath {
  enum Column : int { kLr, kMomentum, kWeightDecay, kTrustCoefficient, kEps, kColumns };
  static constexpr const char* kColumnNames[kColumns] = {"lr", "momentum", "weight_decay", "trust_coefficient",
                                                         "eps"};
  bool has_wd, nesterov;
  float scaled_lr;  // this tensor's lr * trust

  // lr * trust for a tensor whose param has sum of squares w_sq and whose unscaled grad has g_sq, the grad
  // then multiplied by max_grad_norm's `clip` (1: none), so |g| = clip * sqrt(g_sq):
  // trust = trust_coefficient * |w| / (|g| + weight_decay * |w| + eps), or 1 where |w| or |g| is 0
  // (a NaN norm fails the test too, as in the reference, and leaves the plain lr).
  C10_HOST_DEVICE static float scaled_lr_of(const float* c, float w_sq, float g_sq, float clip) {
    const float w_norm = sqrtf(w_sq), g_norm = sqrtf(g_sq) * clip;
    if (!(w_norm > 0.f && g_norm > 0.f)) return c[kLr];
    return c[kLr] * (c[kTrustCoefficient] * w_norm / (g_norm + c[kWeightDecay] * w_norm + c[kEps]));
  }

  // r: param, grad, momentum_buffer
  template <int N, typename T>
  C10_HOST_DEVICE void operator()(T (&r)[N], const float* c) const {
    static_assert(N == 3, "LARS updates param, grad and momentum_buffer");
    T d = r[1];
    if (has_wd) d = d + r[0] * T(c[kWeightDecay]);
    const T step = d * T(scaled_lr);
    const T b = r[2] * T(c[kMomentum]) + step;
    r[2] = b;
    r[0] = r[0] - (nesterov ? b * T(c[kMomentum]) + step : b);
  }
};

// What every update does to the stored grad first, read once per call (CUDA: per chunk).
struct GradTransform {
  bool scaled;  // divide by GradScaler's `scale`, and write the unscaled grad back
  float scale;
  bool clipped;  // multiply by max_grad_norm's factor `clip` (not written back)
  float clip;
  bool maximize;  // negate
};

// The part every driver shares: transform the grad, run the update. Returns the unscaled grad, which the
// driver writes back when scaled (as torch's fused kernels do).
template <int N, typename Math, typename T>
C10_HOST_DEVICE inline T update_element(T (&r)[N], const float* c, const GradTransform& grad, const Math& math) {
  if (grad.scaled) r[1] = r[1] / T(grad.scale);
  const T unscaled = r[1];
  if (grad.clipped) r[1] = r[1] * T(grad.clip);
  if (grad.maximize) r[1] = -r[1];
  math(r, c);
  return unscaled;
}

}  // namespace resfast
