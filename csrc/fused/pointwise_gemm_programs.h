// The fused 1x1 convolution + BatchNorm + activation forward as block programs
// (common/block_programs.h): a tensor-core GEMM (WMMA on the GPU: float16/bfloat16 operands,
// or float32 operands rounded to TF32, a 10-bit mantissa; float32 accumulation always) whose
// epilogue either applies act(scale * y + shift) and writes the output, or reduces
// per-channel moments of y and writes nothing else. channels_last only: x is then the
// row-major [M = N*H*W, C_in] matrix and the conv weight the row-major [C_out, C_in] one, so
// y = x * w^T is row-major [M, C_out], the output's channels_last layout.
//
// Block tile 64 x 64 of y, 4 warps of 32 x 32 (2 x 2 fragments of 16 x 16), K in steps of 32
// through shared memory, zero-filled past the edges (any M, C_in, C_out), with 16-byte loads
// when C_in and both base pointers allow. The epilogue stages the accumulators through shared
// memory so that each thread knows its (row, channel).
//
// Bytes (x: input, y: output, both in elements x dtype size), counting each element once: a
// block reads its 64 rows of x and of w whole, so x is fetched once per 64 output channels
// and w once per 64 rows, the repeats served by L2 while a row of blocks fits there. Eval, one
// pass: x + y. Training: the statistics pass reads x and writes [chunks, 3, C_out] float
// partials, the apply pass reads x again and writes y: 2x + y, against x + 3y for writing y and
// reading it back (MobileNet pointwise layers have y >= x). The BN math (activation, moments,
// merge) is the host-tested code of common/activation.h and common/moments.h.
#pragma once

#include <cstdint>

#include "common/activation.h"
#include "common/block_programs.h"
#include "common/host_device.h"
#include "common/moments.h"
#include "common/vector_access.h"

namespace depsep {

constexpr int kGemmTileM = 64, kGemmTileN = 64, kGemmTileK = 32, kGemmThreads = 128;
constexpr int kGemmPadK = kGemmTileK + 8;  // rows of 80 or 160 bytes: fewer bank conflicts
constexpr int kGemmPadN = kGemmTileN + 4;

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

template <typename T>
struct PwGemmShared {
  alignas(32) T x[kGemmTileM][kGemmPadK];  // x[m0 + r][k0 + c]
  alignas(32) T w[kGemmTileN][kGemmPadK];  // w[n0 + r][k0 + c]
  alignas(32) float y[kGemmTileM][kGemmPadN];
};

// Thread t's share of loading the [64 x 32] tiles of x (rows m0..) and w (rows n0..) at column
// k0 into shared memory.
template <typename T>
DEPSEP_HD void pw_load_tiles(const PwGemmArgs<T>& a, int t, int64_t m0, int n0, int k0,
                             PwGemmShared<T>& s) {
  if (a.vector_loads) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kChunks = kGemmTileK / kVec;  // 16-byte chunks per tile row
    for (int i = t; i < 2 * kGemmTileM * kChunks; i += kGemmThreads) {
      const bool is_x = i < kGemmTileM * kChunks;
      const int j = is_x ? i : i - kGemmTileM * kChunks;
      const int r = j / kChunks, c = (j % kChunks) * kVec;
      const int64_t row = is_x ? m0 + r : static_cast<int64_t>(n0) + r;
      T v[kVec] = {};
      if (row < (is_x ? a.M : a.N) && k0 + c < a.K)  // K % kVec == 0: all or none
        vector_load<T, kVec>((is_x ? a.x : a.w) + row * a.K + k0 + c, v);
      vector_store<T, kVec>(is_x ? &s.x[r][c] : &s.w[r][c], v);
    }
  } else {
    for (int i = t; i < 2 * kGemmTileM * kGemmTileK; i += kGemmThreads) {
      const bool is_x = i < kGemmTileM * kGemmTileK;
      const int j = is_x ? i : i - kGemmTileM * kGemmTileK;
      const int r = j / kGemmTileK, c = j % kGemmTileK;
      const int64_t row = is_x ? m0 + r : static_cast<int64_t>(n0) + r;
      T value{};
      if (row < (is_x ? a.M : a.N) && k0 + c < a.K) value = (is_x ? a.x : a.w)[row * a.K + k0 + c];
      (is_x ? s.x : s.w)[r][c] = value;
    }
  }
}

// One warp's 32 x 32 of the block tile.
template <typename WarpMatrix>
struct PwWarpTile {
  typename WarpMatrix::Accumulator acc[2][2];
};

// y[m0:m0+64, n0:n0+64] in float, into s.y; ends with a barrier.
template <typename T, typename Block>
DEPSEP_HD void pw_gemm_tile(Block& block, const PwGemmArgs<T>& a, int64_t m0, int n0,
                            PwGemmShared<T>& s) {
  using M = typename Block::template WarpMatrix<T>;
  typename Block::template PerWarp<PwWarpTile<M>> tiles;
  block.warps([&](int warp) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) M::fill(tiles[warp].acc[i][j], 0.0f);
  });
  for (int k0 = 0; k0 < a.K; k0 += kGemmTileK) {
    block.threads([&](int t) { pw_load_tiles(a, t, m0, n0, k0, s); });
    block.sync();
    block.warps([&](int warp) {
      const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
      for (int kk = 0; kk < kGemmTileK; kk += M::kDepth) {
        typename M::FragmentA fa[2];
        // B = w^T: element (k, n) sits at s.w[n][k], a column-major [K x 64] tile.
        typename M::FragmentB fb[2];
        for (int i = 0; i < 2; ++i) M::load_a(fa[i], &s.x[wm + 16 * i][kk], kGemmPadK);
        for (int j = 0; j < 2; ++j) M::load_b(fb[j], &s.w[wn + 16 * j][kk], kGemmPadK);
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) M::mma(tiles[warp].acc[i][j], fa[i], fb[j]);
      }
    });
    block.sync();
  }
  block.warps([&](int warp) {
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        M::store(&s.y[wm + 16 * i][wn + 16 * j], tiles[warp].acc[i][j], kGemmPadN);
  });
  block.sync();
}

// Rows per statistics block: a multiple of the tile, at most 1024 blocks down M (as
// bn_chunk_positions), so the fixed-order merge stays short.
inline int64_t pw_stats_rows_per_block(int64_t M) {
  const int64_t tiles = (M + kGemmTileM - 1) / kGemmTileM;
  return kGemmTileM * ((tiles + 1023) / 1024);
}

// Apply pass: block (x, y) computes rows 64x.. and channels 64y.. of y and writes
// out = act(scale * y + shift).
template <typename T, typename Block>
DEPSEP_HD void pw_apply_block(Block& block, const PwGemmArgs<T>& a, BlockXY b, PwGemmShared<T>& s) {
  const int64_t m0 = b.x * kGemmTileM;
  const int n0 = static_cast<int>(b.y) * kGemmTileN;
  pw_gemm_tile<T>(block, a, m0, n0, s);
  static_assert(kGemmThreads % kGemmTileN == 0, "a thread keeps one channel of the tile");
  block.threads([&](int t) {
    // Thread t writes channel n0 + t % 64 of every row it takes: its scale and shift, loaded
    // once (the output stores might alias them for all the compiler knows).
    const int c = t % kGemmTileN;
    const int n = n0 + c;
    if (n >= a.N) return;
    const float scale = a.scale[n], shift = a.shift[n];
    for (int r = t / kGemmTileN; r < kGemmTileM; r += kGemmThreads / kGemmTileN) {
      const int64_t m = m0 + r;
      if (m < a.M)
        a.out[m * a.N + n] = static_cast<T>(bn_activate(scale * s.y[r][c] + shift, a.act));
    }
  });
}

// Statistics pass: block (x, y) reduces rows_per_block rows from x * rows_per_block, 64 at a
// time, into one BnMoments per channel of 64y.. (tile moments from shifted sums, merged in row
// order), written as partial[x][0..2][n]. The first 64 threads own one channel each.
template <typename T, typename Block>
DEPSEP_HD void pw_statistics_block(Block& block, const PwGemmArgs<T>& a, BlockXY b,
                                   PwGemmShared<T>& s) {
  const int64_t row_begin = b.x * a.rows_per_block;
  const int64_t row_end = row_begin + a.rows_per_block < a.M ? row_begin + a.rows_per_block : a.M;
  const int n0 = static_cast<int>(b.y) * kGemmTileN;
  typename Block::template PerThread<BnMoments<float>> total;
  block.threads([&](int c) { total[c] = {0.0f, 0.0f, 0.0f}; });
  for (int64_t m0 = row_begin; m0 < row_end; m0 += kGemmTileM) {
    pw_gemm_tile<T>(block, a, m0, n0, s);
    block.threads([&](int c) {
      if (c >= kGemmTileN) return;
      const int rows = row_end - m0 < kGemmTileM ? static_cast<int>(row_end - m0) : kGemmTileM;
      const float shift = s.y[0][c];
      float s1 = 0.0f, s2 = 0.0f;
      for (int r = 0; r < rows; ++r) {
        const float d = s.y[r][c] - shift;
        s1 += d;
        s2 += d * d;
      }
      total[c] =
          bn_merge(total[c], bn_moments_from_shifted_sums(static_cast<float>(rows), shift, s1, s2));
    });
    block.sync();  // s.y is rewritten by the next tile
  }
  block.threads([&](int c) {
    const int n = n0 + c;
    if (c < kGemmTileN && n < a.N) {
      float* out = a.partial + b.x * 3 * a.N + n;
      out[0] = total[c].count;
      out[a.N] = total[c].mean;
      out[2 * a.N] = total[c].m2;
    }
  });
}

// The statistics pass (kStatistics) or the apply pass, as a block program. 128 threads and at
// least one block per SM: ptxas may use up to 255 registers, which keeps the accumulators and
// the per-channel moments out of local memory.
template <typename T, bool kStatistics>
struct PwGemmProgram {
  using Args = PwGemmArgs<T>;
  using Shared = PwGemmShared<T>;
  static constexpr int kThreads = kGemmThreads, kMinBlocksPerSm = 1;

  // Statistics: (chunks, ceil(N / 64)); apply: (ceil(M / 64), ceil(N / 64)).
  static BlockXY grid(const Args& a) {
    const int64_t rows = kStatistics ? a.rows_per_block : kGemmTileM;
    return {(a.M + rows - 1) / rows, (a.N + kGemmTileN - 1) / kGemmTileN};
  }

  template <typename Block>
  DEPSEP_HD static void run(Block& block, const Args& a, BlockXY b, Shared& s) {
    if constexpr (kStatistics)
      pw_statistics_block<T>(block, a, b, s);
    else
      pw_apply_block<T>(block, a, b, s);
  }
};

}  // namespace depsep
