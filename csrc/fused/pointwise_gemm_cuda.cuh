// The fused 1x1 convolution + BatchNorm + activation forward on the GPU: a tensor-core GEMM
// (WMMA, float16/bfloat16 operands, float32 accumulation) whose epilogue either applies
// act(scale * y + shift) and writes the output, or reduces per-channel moments of y and writes
// nothing else. channels_last only: x is then the row-major [M = N*H*W, C_in] matrix and the
// conv weight the row-major [C_out, C_in] one, so y = x * w^T is row-major [M, C_out], the
// output's channels_last layout.
//
// Block tile 64 x 64 of y, 4 warps of 32 x 32 (2 x 2 fragments of 16 x 16), K in steps of 32
// through shared memory, zero-filled past the edges (any C_in, C_out). The epilogue stages the
// accumulators through shared memory so that each thread knows its (row, channel).
//
// Bytes (x: input, y: output, both in elements x dtype size): eval, one pass: x + y. Training:
// the statistics pass reads x and writes [chunks, 3, C_out] float partials, the apply pass
// reads x again and writes y: 2x + y, against x + 3y for writing y and reading it back (MobileNet
// pointwise layers have y >= x). The BN math (activation, moments, merge) is the host-tested
// code of common/activation.h and common/moments.h.
#pragma once

#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "common/activation.h"
#include "common/cuda_launcher.cuh"
#include "common/moments.h"
#include "fused/bn_act_ops.h"

namespace depsep {

constexpr int kGemmTileM = 64, kGemmTileN = 64, kGemmTileK = 32, kGemmThreads = 128;
constexpr int kGemmPadK = kGemmTileK + 8;  // rows of 80 or 160 bytes: fewer bank conflicts
constexpr int kGemmPadN = kGemmTileN + 4;

template <typename T>
struct PwWmmaType;
// Per dtype: the shared-memory element type, the WMMA operand type, the K depth of one MMA, and
// the operand conversion. float runs in TF32 (10-bit mantissa, float32 accumulation), as
// cuDNN convolutions do by default. Zeros by bit pattern: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__ (no float constructor for __half).
template <>
struct PwWmmaType<c10::Half> {
  using type = __half;
  using operand = __half;
  static constexpr int kDepth = 16;
  static __device__ type zero() { return __ushort_as_half(0); }
  template <typename Fragment>
  static __device__ void convert(Fragment&) {}
};
template <>
struct PwWmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
  using operand = __nv_bfloat16;
  static constexpr int kDepth = 16;
  static __device__ type zero() { return __ushort_as_bfloat16(0); }
  template <typename Fragment>
  static __device__ void convert(Fragment&) {}
};
template <>
struct PwWmmaType<float> {
  using type = float;
  using operand = nvcuda::wmma::precision::tf32;
  static constexpr int kDepth = 8;
  static __device__ type zero() { return 0.0f; }
  template <typename Fragment>
  static __device__ void convert(Fragment& f) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
  }
};

template <typename T>
struct PwGemmArgs {
  const T* x;                 // [M, K] row-major
  const T* w;                 // [N, K] row-major
  T* out;                     // [M, N] row-major (apply pass)
  float* partial;             // [chunks][3][N] (statistics pass)
  const float* scale;         // [N]
  const float* shift;         // [N]
  int64_t M, rows_per_block;  // statistics pass: rows a block reduces, a multiple of 64
  int32_t K, N, act;
  bool vector_loads;  // K a multiple of 16 bytes' worth and both bases 16-byte aligned
};

// Loads the [64 x 32] tiles of x (rows m0..) and w (rows n0..) at column k0 into shared memory.
template <typename T, typename WT>
__device__ void pw_load_tiles(const PwGemmArgs<T>& a, int64_t m0, int n0, int k0,
                              WT (*sx)[kGemmPadK], WT (*sw)[kGemmPadK]) {
  const WT zero = PwWmmaType<T>::zero();
  if (a.vector_loads) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kChunks = kGemmTileK / kVec;  // 16-byte chunks per tile row
    for (int i = threadIdx.x; i < 2 * kGemmTileM * kChunks; i += kGemmThreads) {
      const bool is_x = i < kGemmTileM * kChunks;
      const int j = is_x ? i : i - kGemmTileM * kChunks;
      const int r = j / kChunks, c = (j % kChunks) * kVec;
      const int64_t row = is_x ? m0 + r : static_cast<int64_t>(n0) + r;
      const bool inside = row < (is_x ? a.M : a.N) && k0 + c < a.K;  // K % kVec == 0: all or none
      const T* src = (is_x ? a.x : a.w) + row * a.K + k0 + c;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (inside) v = *reinterpret_cast<const uint4*>(src);
      *reinterpret_cast<uint4*>(is_x ? &sx[r][c] : &sw[r][c]) = v;
    }
  } else {
    for (int i = threadIdx.x; i < 2 * kGemmTileM * kGemmTileK; i += kGemmThreads) {
      const bool is_x = i < kGemmTileM * kGemmTileK;
      const int j = is_x ? i : i - kGemmTileM * kGemmTileK;
      const int r = j / kGemmTileK, c = j % kGemmTileK;
      const int64_t row = is_x ? m0 + r : static_cast<int64_t>(n0) + r;
      const bool inside = row < (is_x ? a.M : a.N) && k0 + c < a.K;
      const T* src = (is_x ? a.x : a.w) + row * a.K + k0 + c;
      WT value = zero;
      if (inside) value = *reinterpret_cast<const WT*>(src);
      (is_x ? sx : sw)[r][c] = value;
    }
  }
}

// y[m0:m0+64, n0:n0+64] in float, into sc.
template <typename T>
__device__ void pw_gemm_tile(const PwGemmArgs<T>& a, int64_t m0, int n0,
                             typename PwWmmaType<T>::type (*sx)[kGemmPadK],
                             typename PwWmmaType<T>::type (*sw)[kGemmPadK],
                             float (*sc)[kGemmPadN]) {
  using namespace nvcuda;
  using WT = typename PwWmmaType<T>::type;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  using Operand = typename PwWmmaType<T>::operand;
  constexpr int kDepth = PwWmmaType<T>::kDepth;
  wmma::fragment<wmma::accumulator, 16, 16, kDepth, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  for (int k0 = 0; k0 < a.K; k0 += kGemmTileK) {
    pw_load_tiles<T, WT>(a, m0, n0, k0, sx, sw);
    __syncthreads();
    for (int kk = 0; kk < kGemmTileK; kk += kDepth) {
      wmma::fragment<wmma::matrix_a, 16, 16, kDepth, Operand, wmma::row_major> fa[2];
      // B = w^T: element (k, n) sits at sw[n][k], a column-major [K x 64] tile.
      wmma::fragment<wmma::matrix_b, 16, 16, kDepth, Operand, wmma::col_major> fb[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], &sx[wm + 16 * i][kk], kGemmPadK);
        PwWmmaType<T>::convert(fa[i]);
      }
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], &sw[wn + 16 * j][kk], kGemmPadK);
        PwWmmaType<T>::convert(fb[j]);
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sc[wm + 16 * i][wn + 16 * j], acc[i][j], kGemmPadN,
                              wmma::mem_row_major);
  __syncthreads();
}

// Apply pass: grid (ceil(M / 64), ceil(N / 64)); out = act(scale * y + shift).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads) pointwise_gemm_apply_kernel(PwGemmArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using WT = typename PwWmmaType<T>::type;
  __shared__ __align__(32) WT sx[kGemmTileM][kGemmPadK];
  __shared__ __align__(32) WT sw[kGemmTileN][kGemmPadK];
  __shared__ __align__(32) float sc[kGemmTileM][kGemmPadN];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kGemmTileM;
  const int n0 = blockIdx.y * kGemmTileN;
  pw_gemm_tile<T>(a, m0, n0, sx, sw, sc);
  for (int i = threadIdx.x; i < kGemmTileM * kGemmTileN; i += kGemmThreads) {
    const int r = i / kGemmTileN, c = i % kGemmTileN;
    const int64_t m = m0 + r;
    const int n = n0 + c;
    if (m < a.M && n < a.N)
      a.out[m * a.N + n] = static_cast<T>(bn_activate(a.scale[n] * sc[r][c] + a.shift[n], a.act));
  }
#endif
}

// Statistics pass: grid (chunks, ceil(N / 64)); a block reduces rows_per_block rows, 64 at a
// time, into one BnMoments per channel (tile moments from shifted sums, merged in row order),
// written as partial[chunk][0..2][n].
// One block per SM at least: lets ptxas keep the per-channel moments in registers (capped at
// 128 it spilled a few bytes on sm_80).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads, 1) pointwise_gemm_stats_kernel(PwGemmArgs<T> a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using WT = typename PwWmmaType<T>::type;
  __shared__ __align__(32) WT sx[kGemmTileM][kGemmPadK];
  __shared__ __align__(32) WT sw[kGemmTileN][kGemmPadK];
  __shared__ __align__(32) float sc[kGemmTileM][kGemmPadN];
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t row_end = row_begin + a.rows_per_block < a.M ? row_begin + a.rows_per_block : a.M;
  const int n0 = blockIdx.y * kGemmTileN;
  const int c = threadIdx.x;  // the first 64 threads own one channel each
  BnMoments<float> total{0.0f, 0.0f, 0.0f};
  for (int64_t m0 = row_begin; m0 < row_end; m0 += kGemmTileM) {
    pw_gemm_tile<T>(a, m0, n0, sx, sw, sc);
    if (c < kGemmTileN) {
      const int rows = row_end - m0 < kGemmTileM ? static_cast<int>(row_end - m0) : kGemmTileM;
      const float shift = sc[0][c];
      float s1 = 0.0f, s2 = 0.0f;
      for (int r = 0; r < rows; ++r) {
        const float d = sc[r][c] - shift;
        s1 += d;
        s2 += d * d;
      }
      total =
          bn_merge(total, bn_moments_from_shifted_sums(static_cast<float>(rows), shift, s1, s2));
    }
    __syncthreads();  // sc is rewritten by the next tile
  }
  const int n = n0 + c;
  if (c < kGemmTileN && n < a.N) {
    float* out = a.partial + static_cast<int64_t>(blockIdx.x) * 3 * a.N + n;
    out[0] = total.count;
    out[a.N] = total.mean;
    out[2 * a.N] = total.m2;
  }
#endif
}

// Rows per statistics block: a multiple of the tile, at most 1024 blocks down M (as
// bn_chunk_positions), so the fixed-order merge stays short.
inline int64_t pw_stats_rows_per_block(int64_t M) {
  const int64_t tiles = (M + kGemmTileM - 1) / kGemmTileM;
  return kGemmTileM * ((tiles + 1023) / 1024);
}

template <typename T>
void launch_pointwise_gemm(const PwGemmArgs<T>& a, bool stats) {
  const unsigned n_blocks = static_cast<unsigned>((a.N + kGemmTileN - 1) / kGemmTileN);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (stats) {
    const dim3 grid(static_cast<unsigned>((a.M + a.rows_per_block - 1) / a.rows_per_block),
                    n_blocks);
    pointwise_gemm_stats_kernel<T><<<grid, kGemmThreads, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>((a.M + kGemmTileM - 1) / kGemmTileM), n_blocks);
    pointwise_gemm_apply_kernel<T><<<grid, kGemmThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The 1x1 convolution policy of the CUDA fused ops: the WMMA kernels above in channels_last for
// float16, bfloat16, and float32 when TF32 is allowed for convolutions
// (torch.backends.cudnn.allow_tf32, on by default, as for the cuDNN reference); cuBLAS and the
// BN thread programs otherwise (float64, NCHW, float32 without TF32). Backward as PointwiseConv.
struct PointwiseFusedConv : PointwiseConv {
  static constexpr bool kFusesBn = true;

  std::tuple<at::Tensor, at::Tensor> forward_bn_act(
      const at::Tensor& input, const at::Tensor& weight, const at::Tensor& gamma,
      const at::Tensor& beta, const at::Tensor& running_mean, const at::Tensor& running_var,
      bool training, double eps, int32_t act) const {
    const auto dtype = input.scalar_type();
    const bool tensor_cores = dtype == at::kHalf || dtype == at::kBFloat16 ||
                              (dtype == at::kFloat && at::globalContext().allowTF32CuDNN());
    if (!tensor_cores || !channels_last(input)) {
      at::Tensor y = forward(input, weight);
      TORCH_CHECK(y.numel() > 0, "depsep: the fused ops need a non-empty input");
      at::Tensor stats = BnActPasses<CudaLauncher>::forward(y, gamma, beta, running_mean,
                                                            running_var, training, eps, act);
      return {y, stats};
    }
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).contiguous();
    at::Tensor out = output_like(x, w.size(0));
    const int64_t M = x.size(0) * x.size(2) * x.size(3);
    TORCH_CHECK(M > 0, "depsep: the fused ops need a non-empty input");
    const int64_t rows_per_block = pw_stats_rows_per_block(M);
    const int64_t chunks = training ? (M + rows_per_block - 1) / rows_per_block : 0;
    BnVectors bn(w.size(0), x, training, running_mean, running_var);
    at::Tensor partial = at::empty({chunks, 3, w.size(0)}, bn.mean.options());
    const bool aligned = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16 == 0;
    const auto run = [&](auto type_tag) {
      using scalar_t = decltype(type_tag);
      PwGemmArgs<scalar_t> args{x.const_data_ptr<scalar_t>(),
                                w.const_data_ptr<scalar_t>(),
                                out.mutable_data_ptr<scalar_t>(),
                                chunks > 0 ? partial.mutable_data_ptr<float>() : nullptr,
                                nullptr,
                                nullptr,
                                M,
                                rows_per_block,
                                static_cast<int32_t>(x.size(1)),
                                static_cast<int32_t>(w.size(0)),
                                act,
                                x.size(1) % (16 / x.element_size()) == 0 && aligned};
      if (training) launch_pointwise_gemm(args, /*stats=*/true);
      bn_reduce<CudaLauncher>(bn, partial, gamma, beta, eps);
      args.scale = bn.scale.const_data_ptr<float>();
      args.shift = bn.shift.const_data_ptr<float>();
      launch_pointwise_gemm(args, /*stats=*/false);
    };
    if (dtype == at::kHalf)
      run(c10::Half());
    else if (dtype == at::kBFloat16)
      run(c10::BFloat16());
    else
      run(float());
    return {out, bn.stats};
  }
};

}  // namespace depsep
