// CUDA kernels of the native fused ops. Depthwise: BN and the activation inside the depthwise
// thread programs (a statistics pass, then the forward with the BN epilogue). Pointwise: the
// WMMA GEMM block programs with a BN epilogue (pointwise_gemm_programs.h) for float16,
// bfloat16 and float32 as TF32 in channels_last, cuBLAS and the BN thread programs otherwise.
#include <torch/library.h>

#include "common/cuda_block_launcher.cuh"
#include "common/cuda_launcher.cuh"
#include "fused/bn_act_ops.h"
#include "fused/pointwise_gemm_ops.h"

TORCH_LIBRARY_IMPL(depsep, CUDA, m) {
  using depsep::CudaLauncher;
  using Depthwise = depsep::DepthwiseFusedConv<CudaLauncher>;
  using Pointwise = depsep::PointwiseFusedConv<CudaLauncher, depsep::CudaBlockLauncher>;
  m.impl("pointwise_bn_act_fwd", &depsep::pointwise_bn_act_fwd<CudaLauncher, Pointwise>);
  m.impl("pointwise_bn_act_bwd", &depsep::pointwise_bn_act_bwd<CudaLauncher, Pointwise>);
  m.impl("depthwise_bn_act_fwd", &depsep::depthwise_bn_act_fwd<CudaLauncher, Depthwise>);
  m.impl("depthwise_bn_act_bwd", &depsep::depthwise_bn_act_bwd<CudaLauncher, Depthwise>);
}
