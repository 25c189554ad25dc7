// The activations the fused ops apply after BatchNorm, shared by every thread program.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace depsep {

enum BnActivation : int32_t { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };

// NaN propagates, as through F.relu and F.hardtanh.
template <typename Acc>
DEPSEP_HD Acc bn_activate(Acc z, int32_t act) {
  if (act == kActRelu) return z <= Acc(0) ? Acc(0) : z;
  if (act == kActRelu6) return z <= Acc(0) ? Acc(0) : (z >= Acc(6) ? Acc(6) : z);
  return z;
}

// Where the activation passes the gradient: as PyTorch's threshold_backward (zero where
// z <= 0) and hardtanh_backward (zero where z <= 0 or z >= 6), so ties at a kink and NaN
// behave the same.
template <typename Acc>
DEPSEP_HD bool bn_activation_passes(Acc z, int32_t act) {
  if (act == kActRelu) return !(z <= Acc(0));
  if (act == kActRelu6) return !(z <= Acc(0) || z >= Acc(6));
  return true;
}

}  // namespace depsep
