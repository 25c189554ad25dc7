// Runs a block program (block_programs.h) on the host: every block of the grid, spread over
// the intra-op thread pool, each block's threads and warps one after another through HostBlock.
// Blocks own their outputs, so the result does not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "common/block_programs.h"

namespace depsep {

// float32 to TF32 as the GPU's cvt.rna.tf32.f32 (wmma::__float_to_tf32) does it: round to
// nearest, ties away from zero, to a 10-bit mantissa (the low 13 bits cleared); infinities and
// NaN pass unchanged, and a value past TF32's largest finite one rounds to infinity.
inline float round_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

// The host's warp-level matrix operations: each fragment holds the whole tile of its warp in
// float (operands converted exactly; float32 rounded to TF32 as on the GPU), and mma adds the
// products in K order with float32 accumulation. The products of float16, bfloat16 and TF32
// operands are exact in float32, so only the additions (their order and rounding inside the
// tensor cores) can differ from the GPU's.
template <typename T>
struct HostWarpMatrix {
  static constexpr int kDepth = sizeof(T) == 2 ? 16 : 8;
  struct FragmentA {
    float v[16][kDepth];  // [m][k]
  };
  struct FragmentB {
    float v[kDepth][16];  // [k][n]
  };
  struct Accumulator {
    float v[16][16];  // [m][n]
  };

  static void fill(Accumulator& acc, float value) {
    for (auto& row : acc.v)
      for (float& x : row) x = value;
  }

  // A: 16 rows of kDepth at p, row stride ld; B: 16 columns of kDepth at p, column stride ld.
  static void load_a(FragmentA& a, const T* p, int ld) {
    check_fragment(p, ld * sizeof(T));
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < kDepth; ++k) a.v[m][k] = operand(p[m * ld + k]);
  }
  static void load_b(FragmentB& b, const T* p, int ld) {
    check_fragment(p, ld * sizeof(T));
    for (int n = 0; n < 16; ++n)
      for (int k = 0; k < kDepth; ++k) b.v[k][n] = operand(p[n * ld + k]);
  }

  // Each acc[m][n] adds its kDepth products in k order; the loop over n vectorises.
  static void mma(Accumulator& acc, const FragmentA& a, const FragmentB& b) {
    for (int m = 0; m < 16; ++m)
      for (int k = 0; k < kDepth; ++k)
        for (int n = 0; n < 16; ++n) acc.v[m][n] += a.v[m][k] * b.v[k][n];
  }

  static void store(float* p, const Accumulator& acc, int ld) {
    check_fragment(p, ld * sizeof(float));
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) p[static_cast<int64_t>(m) * ld + n] = acc.v[m][n];
  }

 private:
  static float operand(T value) {
    if constexpr (sizeof(T) == 4)
      return round_to_tf32(value);
    else
      return static_cast<float>(value);
  }

  static void check_fragment(const void* p, size_t ld_bytes) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ld_bytes % 16 != 0)
      throw std::runtime_error("depsep: misaligned warp matrix access in a block program");
  }
};

template <int kThreads>
class HostBlock {
 public:
  static constexpr int kWarps = kThreads / kWarpSize;
  static_assert(kThreads % kWarpSize == 0, "a block is whole warps");

  template <typename V, int kCount>
  class Storage {
   public:
    V& operator[](int i) {
      if (i < 0 || i >= kCount) throw std::runtime_error("depsep: block program storage index");
      return v_[i];
    }

   private:
    V v_[kCount];
  };
  template <typename V>
  using PerThread = Storage<V, kThreads>;
  template <typename V>
  using PerWarp = Storage<V, kWarps>;
  template <typename T>
  using WarpMatrix = HostWarpMatrix<T>;

  template <typename Fn>
  void threads(Fn&& fn) const {
    for (int t = 0; t < kThreads; ++t) fn(t);
  }
  template <typename Fn>
  void warps(Fn&& fn) const {
    for (int w = 0; w < kWarps; ++w) fn(w);
  }
  void sync() const {}
};

struct HostBlockLauncher {
  template <typename Program>
  static void launch(const typename Program::Args& args, BlockXY grid) {
    using Shared = typename Program::Shared;
    if (grid.x <= 0 || grid.y <= 0) return;  // as CudaBlockLauncher: an empty grid runs nothing
    at::parallel_for(0, grid.x * grid.y, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
      const auto shared = std::make_unique<Shared>();
      HostBlock<Program::kThreads> block;
      for (int64_t i = begin; i < end; ++i) {
        // The GPU gives shared memory no initial contents: NaN bytes make a read before the
        // first write show in the results.
        std::memset(static_cast<void*>(shared.get()), 0xff, sizeof(Shared));
        Program::run(block, args, BlockXY{i % grid.x, i / grid.x}, *shared);
      }
    });
  }
};

}  // namespace depsep
