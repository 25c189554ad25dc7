// CPU kernels of the native fused ops: ATen's GEMM (pointwise) or the depthwise CPU loops for
// the convolution, the BN thread programs on the host for the rest; and the test-only
// depsep_host::{depthwise,pointwise}_bn_act_*, which run the CUDA ops' code paths (the fused
// depthwise thread programs; the GEMM block programs or the GEMM fallback) on the host so that
// tests execute them.
#include <torch/library.h>

#include "common/cpu_launcher.h"
#include "common/host_block_launcher.h"
#include "depthwise/depthwise_cpu.h"
#include "fused/bn_act_ops.h"
#include "fused/pointwise_gemm_ops.h"

TORCH_LIBRARY_IMPL(depsep, CPU, m) {
  using depsep::CpuLauncher;
  using Loops = depsep::DepthwiseConv<depsep::CpuLoopsCompute>;
  using Gemm = depsep::PointwiseConv;
  m.impl("pointwise_bn_act_fwd", &depsep::pointwise_bn_act_fwd<CpuLauncher, Gemm>);
  m.impl("pointwise_bn_act_bwd", &depsep::pointwise_bn_act_bwd<CpuLauncher, Gemm>);
  m.impl("depthwise_bn_act_fwd", &depsep::depthwise_bn_act_fwd<CpuLauncher, Loops>);
  m.impl("depthwise_bn_act_bwd", &depsep::depthwise_bn_act_bwd<CpuLauncher, Loops>);
}

TORCH_LIBRARY_IMPL(depsep_host, CPU, m) {
  using depsep::CpuLauncher;
  using Programs = depsep::DepthwiseFusedConv<CpuLauncher>;
  using GemmPrograms = depsep::PointwiseFusedConv<CpuLauncher, depsep::HostBlockLauncher>;
  m.impl("depthwise_bn_act_fwd", &depsep::depthwise_bn_act_fwd<CpuLauncher, Programs>);
  m.impl("depthwise_bn_act_bwd", &depsep::depthwise_bn_act_bwd<CpuLauncher, Programs>);
  m.impl("pointwise_bn_act_fwd", &depsep::pointwise_bn_act_fwd<CpuLauncher, GemmPrograms>);
  m.impl("pointwise_bn_act_bwd", &depsep::pointwise_bn_act_bwd<CpuLauncher, GemmPrograms>);
}
