// CPU kernels of the native fused ops: the direct BLAS GEMMs (pointwise, cpu_gemm.h) or the
// depthwise CPU loops for the convolution, BnActPasses for the rest on BnCpuLauncher (its BN
// passes as CPU loops); and the test-only depsep_host::{depthwise,pointwise}_bn_act_*, which
// run the CUDA ops' code paths (the fused depthwise thread programs; the GEMM block programs or
// the GEMM fallback) on the host so that tests execute them.
#include <torch/library.h>

#include "common/cpu_launcher.h"
#include "common/host_block_launcher.h"
#include "depthwise/depthwise_cpu.h"
#include "fused/bn_act_ops.h"
#include "fused/bn_cpu_launcher.h"
#include "fused/cpu_gemm.h"
#include "fused/pointwise_gemm_ops.h"

TORCH_LIBRARY_IMPL(depsep, CPU, m) {
  using Launcher = depsep::BnCpuLauncher;
  using Loops = depsep::DepthwiseConv<depsep::CpuLoopsCompute>;
  using Gemm = depsep::PointwiseCpuConv;
  m.impl("pointwise_bn_act_fwd", &depsep::pointwise_bn_act_fwd<Launcher, Gemm>);
  m.impl("pointwise_bn_act_bwd", &depsep::pointwise_bn_act_bwd<Launcher, Gemm>);
  m.impl("depthwise_bn_act_fwd", &depsep::depthwise_bn_act_fwd<Launcher, Loops>);
  m.impl("depthwise_bn_act_bwd", &depsep::depthwise_bn_act_bwd<Launcher, Loops>);
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
