// CPU kernels of depsep::depthwise_conv2d_bwd_weight: the vectorised CPU loops (float, double) or
// the thread programs (float16, bfloat16); and the test-only
// depsep_host::depthwise_conv2d_bwd_weight, which runs the CUDA kernels' thread programs on the
// host for every dtype so that tests execute them.
#include <torch/library.h>

#include "depthwise/depthwise_cpu.h"

TORCH_LIBRARY_IMPL(depsep, CPU, m) {
  m.impl("depthwise_conv2d_bwd_weight",
         &depsep::depthwise_conv2d_bwd_weight<depsep::CpuLoopsCompute>);
}

TORCH_LIBRARY_IMPL(depsep_host, CPU, m) {
  m.impl("depthwise_conv2d_bwd_weight",
         &depsep::depthwise_conv2d_bwd_weight<depsep::ProgramCompute<depsep::CpuLauncher>>);
}
