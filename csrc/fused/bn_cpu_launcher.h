// The launcher of the native CPU fused ops: CpuLauncher, except that the four BN passes over the
// convolution output (statistics, apply, gradient sums, gradient apply of bn_act_programs.h)
// run as the BN CPU loops (bn_cpu_loops.h) for float and double. Same chunks, same per-chunk
// outputs, so BnActPasses, the statistics merge and every per-channel program are shared with
// the GPU; the loops only sweep memory the way a CPU wants (vectors along the contiguous
// dimension, no index decoded per element). float16/bfloat16 run the thread programs.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_isa.h"
#include "common/cpu_launcher.h"
#include "common/moments.h"
#include "fused/bn_act_programs.h"
#include "fused/bn_cpu_loops_entry.h"

namespace depsep {

namespace bn_cpu {

template <typename T>
using Entry = void (*)(const BnCpuPass<T>&, int64_t, int64_t);

template <typename T>
void run_chunks(const BnCpuPass<T>& pass, int64_t chunks, Entry<T> base, Entry<T> avx2) {
  const Entry<T> entry = cpu_loops_use_avx2() ? avx2 : base;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) { entry(pass, begin, end); });
}

template <typename T, bool ChannelsLast>
BnCpuPass<T> pass_of(int64_t N, int64_t C, int64_t S, int64_t chunk_positions, T* y) {
  BnCpuPass<T> p{};
  p.N = N;
  p.C = C;
  p.S = S;
  p.chunk_positions = chunk_positions;
  p.channels_last = ChannelsLast;
  p.y = y;
  return p;
}

template <typename T, bool ChannelsLast>
void gradient_pass(const BnGradArgs<T, T>& a, Entry<T> base, Entry<T> avx2) {
  BnCpuPass<T> p = pass_of<T, ChannelsLast>(a.N, a.C, a.S, a.chunk_positions, a.y);
  p.grad_out = a.grad_out;
  p.mean = a.v.mean;
  p.scale = a.v.scale;
  p.shift = a.v.shift;
  p.coef = a.coef;
  p.sums = a.partial;
  p.act = a.act;
  p.training = a.training;
  run_chunks(p, a.chunks, base, avx2);
}

// Loops<Program>::kRuns: whether the loops replace Program; run(args) runs them.
template <typename Program>
struct Loops {
  static constexpr bool kRuns = false;
};

template <typename T, bool CL>
struct Loops<BnStatsPartialProgram<T, T, CL>> {
  static constexpr bool kRuns = std::is_same_v<T, float> || std::is_same_v<T, double>;
  // The loops leave (shift, s1, s2) per channel in each chunk's slot; the slot then becomes
  // the program's (count, mean, m2).
  static void run(const BnStatsArgs<T, T>& a) {
    BnCpuPass<T> p =
        pass_of<T, CL>(a.N, a.C, a.S, a.chunk_positions, const_cast<T*>(a.y));  // read only
    p.sums = a.partial;
    run_chunks<T>(p, a.chunks, cpu_base::bn_shifted_sums, cpu_avx2::bn_shifted_sums);
    const int64_t positions = a.N * a.S;
    at::parallel_for(0, a.chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t first = k * a.chunk_positions;
        const int64_t last = first + a.chunk_positions;
        const T count = static_cast<T>((last < positions ? last : positions) - first);
        T* slot = a.partial + k * 3 * a.C;
        for (int64_t c = 0; c < a.C; ++c) {
          const BnMoments<T> m =
              bn_moments_from_shifted_sums(count, slot[c], slot[a.C + c], slot[2 * a.C + c]);
          slot[c] = m.count;
          slot[a.C + c] = m.mean;
          slot[2 * a.C + c] = m.m2;
        }
      }
    });
  }
};

template <typename T, bool CL>
struct Loops<BnApplyProgram<T, T, CL>> {
  static constexpr bool kRuns = std::is_same_v<T, float> || std::is_same_v<T, double>;
  static void run(const BnApplyArgs<T, T>& a) {
    const int64_t positions = a.N * a.S;
    const int64_t chunk = bn_chunk_positions(positions);
    BnCpuPass<T> p = pass_of<T, CL>(a.N, a.C, a.S, chunk, a.y);
    p.scale = a.v.scale;
    p.shift = a.v.shift;
    p.act = a.act;
    run_chunks<T>(p, (positions + chunk - 1) / chunk, cpu_base::bn_apply, cpu_avx2::bn_apply);
  }
};

template <typename T, bool CL>
struct Loops<BnGradSumsProgram<T, T, CL>> {
  static constexpr bool kRuns = std::is_same_v<T, float> || std::is_same_v<T, double>;
  static void run(const BnGradArgs<T, T>& a) {
    gradient_pass<T, CL>(a, cpu_base::bn_grad_sums, cpu_avx2::bn_grad_sums);
  }
};

template <typename T, bool CL>
struct Loops<BnGradApplyProgram<T, T, CL>> {
  static constexpr bool kRuns = std::is_same_v<T, float> || std::is_same_v<T, double>;
  static void run(const BnGradArgs<T, T>& a) {
    gradient_pass<T, CL>(a, cpu_base::bn_grad_apply, cpu_avx2::bn_grad_apply);
  }
};

}  // namespace bn_cpu

struct BnCpuLauncher : CpuLauncher {
  template <typename Program>
  static void launch(const typename Program::Args& args, int64_t num_threads) {
    if constexpr (bn_cpu::Loops<Program>::kRuns) {
      if (num_threads > 0) bn_cpu::Loops<Program>::run(args);
    } else {
      CpuLauncher::launch<Program>(args, num_threads);
    }
  }
};

}  // namespace depsep
