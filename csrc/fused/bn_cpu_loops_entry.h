// Entry points of the BN CPU loops (bn_cpu_loops.h), compiled once per instruction set as the
// depthwise CPU loops are (`cpu_base`, `cpu_avx2`; cpu_loops_use_avx2() picks at run time).
#pragma once

#include <cstdint>

namespace depsep {

// One BN pass over a convolution output y seen as [N, C, S], contiguous in channels_last
// (position-major rows of C channels) or NCHW (planes of S positions), in chunks of
// `chunk_positions` positions (bn_chunk_positions: the chunks of the thread programs).
template <typename T>
struct BnCpuPass {
  int64_t N, C, S, chunk_positions;
  bool channels_last;
  T* y;               // apply passes: rewritten in place
  const T* grad_out;  // gradient passes
  const T* mean;      // [C]
  const T* scale;     // [C]
  const T* shift;     // [C]
  const T* coef;      // [3][C]: k1, k2, k3 of the gradient apply pass
  T* sums;            // per chunk: [3][C] shift, s1, s2 (statistics), [2][C] (gradient sums)
  int32_t act;
  bool training;
};

// Each runs chunks [begin, end): bn_shifted_sums writes a chunk's per-channel value at its first
// position (the shift) and the sums of y - shift and of its square; bn_apply leaves act(scale *
// y + shift) in y; bn_grad_sums writes sum(g_z) and sum(g_z * (y - mean)); bn_grad_apply
// leaves g_y = k1 * g_z (+ k2 * (y - mean) + k3 in training) in y.
#define DEPSEP_DECLARE_BN_CPU_LOOPS(T)                                     \
  void bn_shifted_sums(const BnCpuPass<T>& a, int64_t begin, int64_t end); \
  void bn_apply(const BnCpuPass<T>& a, int64_t begin, int64_t end);        \
  void bn_grad_sums(const BnCpuPass<T>& a, int64_t begin, int64_t end);    \
  void bn_grad_apply(const BnCpuPass<T>& a, int64_t begin, int64_t end);

namespace cpu_base {
DEPSEP_DECLARE_BN_CPU_LOOPS(float)
DEPSEP_DECLARE_BN_CPU_LOOPS(double)
}  // namespace cpu_base

namespace cpu_avx2 {
DEPSEP_DECLARE_BN_CPU_LOOPS(float)
DEPSEP_DECLARE_BN_CPU_LOOPS(double)
}  // namespace cpu_avx2

#undef DEPSEP_DECLARE_BN_CPU_LOOPS

}  // namespace depsep
