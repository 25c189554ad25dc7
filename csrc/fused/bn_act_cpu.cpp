// CPU kernels of the native fused ops: ATen's GEMM (pointwise) or the depthwise CPU loops for
// the convolution, the BN thread programs on the host for the rest.
#include <torch/library.h>

#include "common/cpu_launcher.h"
#include "depthwise/depthwise_cpu.h"
#include "fused/bn_act_ops.h"

TORCH_LIBRARY_IMPL(depsep, CPU, m) {
  using depsep::CpuLauncher;
  using depsep::CpuLoopsCompute;
  m.impl("pointwise_bn_act_fwd", &depsep::pointwise_bn_act_fwd<CpuLauncher>);
  m.impl("pointwise_bn_act_bwd", &depsep::pointwise_bn_act_bwd<CpuLauncher>);
  m.impl("depthwise_bn_act_fwd", &depsep::depthwise_bn_act_fwd<CpuLauncher, CpuLoopsCompute>);
  m.impl("depthwise_bn_act_bwd", &depsep::depthwise_bn_act_bwd<CpuLauncher, CpuLoopsCompute>);
}
