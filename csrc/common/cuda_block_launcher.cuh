// Launches a block program (block_programs.h) on the current CUDA stream: one thin __global__
// wrapper that gives `Program::run` a DeviceBlock and its shared memory. The only GPU-only code
// of a block program is here: the barrier, register storage and WMMA.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "common/block_programs.h"

namespace depsep {

template <typename T>
struct WmmaOperand;
template <>
struct WmmaOperand<c10::Half> {
  using stored = __half;
  using type = __half;
  static constexpr int kDepth = 16;
};
template <>
struct WmmaOperand<c10::BFloat16> {
  using stored = __nv_bfloat16;
  using type = __nv_bfloat16;
  static constexpr int kDepth = 16;
};
// float runs in TF32 (10-bit mantissa, float32 accumulation), as cuDNN convolutions do by
// default.
template <>
struct WmmaOperand<float> {
  using stored = float;
  using type = nvcuda::wmma::precision::tf32;
  static constexpr int kDepth = 8;
};

// The warp-level matrix operations as WMMA; the host's HostWarpMatrix computes the same tiles.
template <typename T>
struct WmmaWarpMatrix {
  using Stored = typename WmmaOperand<T>::stored;
  using Operand = typename WmmaOperand<T>::type;
  static constexpr int kDepth = WmmaOperand<T>::kDepth;
  using FragmentA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kDepth, Operand,
                                           nvcuda::wmma::row_major>;
  using FragmentB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kDepth, Operand,
                                           nvcuda::wmma::col_major>;
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kDepth, float>;

  static __device__ void fill(Accumulator& acc, float value) {
    nvcuda::wmma::fill_fragment(acc, value);
  }
  static __device__ void load_a(FragmentA& a, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(a, reinterpret_cast<const Stored*>(p), ld);
    to_operand(a);
  }
  static __device__ void load_b(FragmentB& b, const T* p, int ld) {
    nvcuda::wmma::load_matrix_sync(b, reinterpret_cast<const Stored*>(p), ld);
    to_operand(b);
  }
  static __device__ void mma(Accumulator& acc, const FragmentA& a, const FragmentB& b) {
    nvcuda::wmma::mma_sync(acc, a, b, acc);
  }
  static __device__ void store(float* p, const Accumulator& acc, int ld) {
    nvcuda::wmma::store_matrix_sync(p, acc, ld, nvcuda::wmma::mem_row_major);
  }

 private:
  template <typename Fragment>
  static __device__ void to_operand(Fragment& f) {
    if constexpr (sizeof(T) == 4)
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
  }
};

struct DeviceBlock {
  template <typename V>
  struct Registers {
    V value;
    __device__ V& operator[](int) { return value; }
  };
  template <typename V>
  using PerThread = Registers<V>;
  template <typename V>
  using PerWarp = Registers<V>;
  template <typename T>
  using WarpMatrix = WmmaWarpMatrix<T>;

  template <typename Fn>
  __device__ void threads(Fn&& fn) const {
    fn(static_cast<int>(threadIdx.x));
  }
  template <typename Fn>
  __device__ void warps(Fn&& fn) const {
    fn(static_cast<int>(threadIdx.x) / kWarpSize);
  }
  __device__ void sync() const { __syncthreads(); }
};

template <typename Program>
__global__ void __launch_bounds__(Program::kThreads, Program::kMinBlocksPerSm)
    block_program_kernel(const typename Program::Args args) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ typename Program::Shared shared;
  DeviceBlock block;
  Program::run(block, args, BlockXY{blockIdx.x, blockIdx.y}, shared);
#else
  __trap();  // WMMA in bfloat16 and TF32 needs sm_80
#endif
}

struct CudaBlockLauncher {
  template <typename Program>
  static void launch(const typename Program::Args& args, BlockXY grid) {
    // A grid of 0 blocks is an invalid launch configuration.
    if (grid.x <= 0 || grid.y <= 0) return;
    const dim3 blocks(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y));
    block_program_kernel<Program>
        <<<blocks, Program::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace depsep
