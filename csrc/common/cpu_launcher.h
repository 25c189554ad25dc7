// Runs a thread program (see csrc/depthwise/depthwise_programs.h) on the host: every thread
// index of the GPU launch, spread over the intra-op thread pool. Each index owns its outputs,
// so the result does not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/Device.h>

namespace depsep {

struct CpuLauncher {
  // Host code needs no device selection.
  struct DeviceGuard {
    explicit DeviceGuard(c10::Device) {}
  };

  template <typename Program>
  static void launch(const typename Program::Args& args, int64_t num_threads) {
    if (num_threads <= 0) return;  // as CudaLauncher: an empty launch runs nothing
    at::parallel_for(0, num_threads, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) Program::run(args, i);
    });
  }
};

}  // namespace depsep
