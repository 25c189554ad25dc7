// CUDA kernel of depsep::depthwise_conv2d_bwd_weight: the same thread programs as the CPU kernel,
// launched as a grid-stride loop (cuda_launcher.cuh).
#include <torch/library.h>

#include "common/cuda_launcher.cuh"
#include "depthwise/depthwise_ops.h"

TORCH_LIBRARY_IMPL(depsep, CUDA, m) {
  m.impl("depthwise_conv2d_bwd_weight",
         &depsep::depthwise_conv2d_bwd_weight<depsep::ProgramCompute<depsep::CudaLauncher>>);
}
