// CPU kernel of depsep::depthwise_conv2d_bwd_input: the thread programs run on the host (cpu_launcher.h).
#include <torch/library.h>

#include "common/cpu_launcher.h"
#include "depthwise/depthwise_ops.h"

TORCH_LIBRARY_IMPL(depsep, CPU, m) {
  m.impl("depthwise_conv2d_bwd_input", &depsep::depthwise_conv2d_bwd_input<depsep::CpuLauncher>);
}
