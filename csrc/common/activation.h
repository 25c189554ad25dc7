// The activations the fused ops apply after BatchNorm, shared by every thread program, the GEMM
// epilogue and the host twins. Acc is float (half, bfloat16 and float tensors) or double.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace depsep {

// The codes of kernels/_common.py ACTIVATION_CODES.
enum BnActivation : int32_t {
  kActNone = 0,
  kActRelu = 1,
  kActRelu6 = 2,
  kActSilu = 3,
  kActHardswish = 4,
};

template <typename Acc>
DEPSEP_HD Acc bn_sigmoid(Acc z) {
  using std::exp;
  return Acc(1) / (Acc(1) + exp(-z));
}

// As PyTorch computes them: NaN propagates as through F.relu and F.hardtanh; F.silu is
// z / (1 + exp(-z)) (NaN at -inf), F.hardswish z * min(max(z + 3, 0), 6) / 6 (NaN at -inf).
template <typename Acc>
DEPSEP_HD Acc bn_activate(Acc z, int32_t act) {
  if (act == kActRelu) return z <= Acc(0) ? Acc(0) : z;
  if (act == kActRelu6) return z <= Acc(0) ? Acc(0) : (z >= Acc(6) ? Acc(6) : z);
  if (act == kActSilu) {
    using std::exp;
    return z / (Acc(1) + exp(-z));
  }
  if (act == kActHardswish) {
    const Acc t = z + Acc(3);
    // max/min written so that NaN stays NaN, as std::max(t, 0) and std::min(t, 6) keep t.
    const Acc clamped = t < Acc(0) ? Acc(0) : (t > Acc(6) ? Acc(6) : t);
    return z * clamped / Acc(6);
  }
  return z;
}

// g * act'(z), the gradient at the pre-activation z, as PyTorch's backward kernels compute it
// (ties at a kink and NaN included): threshold_backward (0 where z <= 0), hardtanh_backward (0
// where z <= 0 or z >= 6), silu_backward g * s * (1 + z * (1 - s)) with s = sigmoid(z), and
// hardswish_backward (0 where z <= -3, g * (z / 3 + 1/2) where z < 3, else g: also at NaN).
template <typename Acc>
DEPSEP_HD Acc bn_activation_grad(Acc z, Acc g, int32_t act) {
  if (act == kActRelu) return z <= Acc(0) ? Acc(0) : g;
  if (act == kActRelu6) return (z <= Acc(0) || z >= Acc(6)) ? Acc(0) : g;
  if (act == kActSilu) {
    const Acc s = bn_sigmoid(z);
    return g * s * (Acc(1) + z * (Acc(1) - s));
  }
  if (act == kActHardswish) {
    if (z <= Acc(-3)) return Acc(0);
    if (z < Acc(3)) return g * (z / Acc(3) + Acc(0.5));
    return g;
  }
  return g;
}

}  // namespace depsep
