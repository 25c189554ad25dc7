// The shapes of one depthwise convolution: plain data, shared by the thread programs and the
// CPU loops (which include nothing else, see cpu_loops.h).
#pragma once

#include <cstdint>

namespace depsep {

// padT/padL are the leading paddings; the trailing ones are implied by OH/OW, which lets
// asymmetric ("same" with even kernels) padding through.
struct DwGeometry {
  int64_t N, C, H, W, OH, OW;
  int32_t kH, kW, sH, sW, padT, padL, dH, dW;
};

}  // namespace depsep
