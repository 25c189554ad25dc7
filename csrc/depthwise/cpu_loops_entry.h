// Entry points of the CPU loops (cpu_loops.h), compiled once per ISA: `cpu_base` for the
// build's default target and `cpu_avx2` with AVX2+FMA; cpu_loops_use_avx2() picks at run time.
#pragma once

#include <cstdint>

#include "depthwise_geometry.h"

namespace depsep {

// Bytes of scratch per kernel tap that every *_rows call needs (two lists of taps).
constexpr int64_t kCpuLoopTapBytes = 4 * sizeof(int64_t);

// [begin, end) counts output rows (n, oh) in channels_last, or (n, c) planes in NCHW; the
// weight gradient adds into `partial`: [kH*kW + 1][C] for the rows' chunk in channels_last,
// [N][kH*kW + 1][C] (one slice per image) in NCHW. depthwise_forward_rows writes channels_last
// output rows [begin, end) into a buffer of their own (a tile that stays in cache).
#define DEPSEP_DECLARE_CPU_LOOPS(T)                                                                \
  void depthwise_forward(const DwGeometry& g, bool channels_last, const T* input, const T* weight, \
                         const T* bias, T* output, int64_t begin, int64_t end, void* scratch);     \
  void depthwise_forward_rows(const DwGeometry& g, const T* input, const T* weight, const T* bias, \
                              T* rows_out, int64_t begin, int64_t end, void* scratch);             \
  void depthwise_input_grad(const DwGeometry& g, bool channels_last, const T* grad_output,         \
                            const T* weight, T* grad_input, int64_t begin, int64_t end,            \
                            void* scratch);                                                        \
  void depthwise_weight_grad(const DwGeometry& g, bool channels_last, const T* grad_output,        \
                             const T* input, T* partial, int64_t begin, int64_t end,               \
                             void* scratch);

namespace cpu_base {
DEPSEP_DECLARE_CPU_LOOPS(float)
DEPSEP_DECLARE_CPU_LOOPS(double)
}  // namespace cpu_base

namespace cpu_avx2 {
DEPSEP_DECLARE_CPU_LOOPS(float)
DEPSEP_DECLARE_CPU_LOOPS(double)
}  // namespace cpu_avx2

#undef DEPSEP_DECLARE_CPU_LOOPS

}  // namespace depsep
