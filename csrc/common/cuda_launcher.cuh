// Launches a thread program on the current CUDA stream: a grid-stride loop over the same
// `Program::run` that CpuLauncher runs on the host.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace depsep {

template <typename Program>
__global__ void program_kernel(const typename Program::Args args, int64_t num_threads) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_threads;
       i += step)
    Program::run(args, i);
}

inline int multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

struct CudaLauncher {
  // Launches go to the tensors' device, whatever the current one is.
  using DeviceGuard = c10::cuda::CUDAGuard;

  template <typename Program>
  static void launch(const typename Program::Args& args, int64_t num_threads) {
    // A grid of 0 blocks is an invalid launch configuration.
    if (num_threads <= 0) return;
    constexpr int64_t kThreads = 256;
    // Enough blocks to fill every SM several times over; the grid-stride loop covers the
    // rest, so huge tensors never overflow the grid dimension.
    const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 16;
    const int64_t blocks = std::min((num_threads + kThreads - 1) / kThreads, max_blocks);
    program_kernel<Program>
        <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            args, num_threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace depsep
