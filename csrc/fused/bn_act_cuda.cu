// CUDA kernels of the native fused ops: cuBLAS GEMM (pointwise) or the depthwise thread
// programs for the convolution, the BN thread programs for the rest.
#include <torch/library.h>

#include "common/cuda_launcher.cuh"
#include "fused/bn_act_ops.h"

TORCH_LIBRARY_IMPL(depsep, CUDA, m) {
  using depsep::CudaLauncher;
  using Compute = depsep::ProgramCompute<CudaLauncher>;
  m.impl("pointwise_bn_act_fwd", &depsep::pointwise_bn_act_fwd<CudaLauncher>);
  m.impl("pointwise_bn_act_bwd", &depsep::pointwise_bn_act_bwd<CudaLauncher>);
  m.impl("depthwise_bn_act_fwd", &depsep::depthwise_bn_act_fwd<CudaLauncher, Compute>);
  m.impl("depthwise_bn_act_bwd", &depsep::depthwise_bn_act_bwd<CudaLauncher, Compute>);
}
