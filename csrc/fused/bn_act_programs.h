// BatchNorm + activation around a convolution: the math and the single-source thread programs
// that the native fused ops run on the CPU (CpuLauncher) and on the GPU
// (CudaLauncher), so every CI run executes the GPU code's BN formulas, statistics merge and
// activation derivatives.
//
// The convolution output y is seen as [N, C, S] (S = OH*OW): channels_last keeps a position's
// C channels together, NCHW a channel's S positions. Per-channel vectors (statistics, scale,
// shift, gradient coefficients) are in Acc (float, or double for double tensors).
//
// Passes, and the bytes each moves over y (|y| = N*C*S elements):
// - statistics: partial moments per (chunk of positions, channel), then a fixed-order tree merge
//   per channel (deterministic, no atomics): reads y once.
// - apply: out = act(scale * y + shift) in place: reads and writes y once.
// - gradient sums: per (chunk, channel) sums of g_z and g_z * (y - mean), where g_z is the
//   output gradient through the activation's derivative at z recomputed from y: reads y and
//   grad_out once.
// - gradient apply: g_y = k1 * g_z + k2 * (y - mean) + k3 (eval: k1 * g_z) in place of y: reads
//   y and grad_out, writes g_y.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/activation.h"
#include "common/host_device.h"
#include "common/moments.h"

namespace depsep {

// std::sqrt of Acc on the host, as the GPU's float overload: an unqualified sqrt would be the C
// library's double one there, and 1 / (a double) rounds differently from a float division.
template <typename Acc>
DEPSEP_HD Acc bn_invstd(Acc var, Acc eps) {
  return Acc(1) / std::sqrt(var + eps);
}

// Positions per statistics chunk: from the shape only, so results never depend on the device
// or thread count. At least 64 positions a chunk, at most 1024 chunks.
inline int64_t bn_chunk_positions(int64_t positions) {
  const int64_t by_count = (positions + 1023) / 1024;
  return by_count > 64 ? by_count : 64;
}

// A (chunk of positions, channel) thread of the reduction passes: channel fastest, so that
// neighbouring threads read neighbouring channels.
struct BnChunk {
  int64_t c, chunk, begin, end;
};

DEPSEP_HD BnChunk bn_chunk_decode(int64_t idx, int64_t C, int64_t positions,
                                  int64_t chunk_positions) {
  const int64_t chunk = idx / C;
  const int64_t begin = chunk * chunk_positions;
  const int64_t end = begin + chunk_positions < positions ? begin + chunk_positions : positions;
  return {idx % C, chunk, begin, end};
}

template <bool ChannelsLast>
DEPSEP_HD int64_t bn_offset(int64_t position, int64_t c, int64_t C, int64_t S) {
  // position = n * S + s
  return ChannelsLast ? position * C + c : ((position / S) * C + c) * S + position % S;
}

// Elements per thread of the elementwise passes: a contiguous run along the inner dimension
// (channels in channels_last, positions in NCHW).
constexpr int kBnSpan = 8;

template <bool ChannelsLast>
struct BnSpan {
  int64_t begin, end;  // element offsets of the run
  int64_t c;           // channel of the first element (NCHW: of all of them)
};

template <bool ChannelsLast>
DEPSEP_HD int64_t bn_span_count(int64_t N, int64_t C, int64_t S) {
  const int64_t inner = ChannelsLast ? C : S;
  const int64_t outer = ChannelsLast ? N * S : N * C;
  return outer * ((inner + kBnSpan - 1) / kBnSpan);
}

template <bool ChannelsLast>
DEPSEP_HD BnSpan<ChannelsLast> bn_span_decode(int64_t idx, int64_t C, int64_t S) {
  const int64_t inner = ChannelsLast ? C : S;
  const int64_t spans = (inner + kBnSpan - 1) / kBnSpan;
  const int64_t outer = idx / spans;
  const int64_t first = (idx % spans) * kBnSpan;
  const int64_t last = first + kBnSpan < inner ? first + kBnSpan : inner;
  return {outer * inner + first, outer * inner + last, ChannelsLast ? first : outer % C};
}

// Per-channel vectors the passes read.
template <typename Acc>
struct BnChannelVectors {
  const Acc* mean;   // [C]
  const Acc* scale;  // [C] gamma * invstd
  const Acc* shift;  // [C] beta - mean * scale
};

template <typename T, typename Acc>
struct BnStatsArgs {
  const T* y;
  Acc* partial;  // [chunks][3][C]: count, mean, m2
  int64_t N, C, S, chunk_positions, chunks;
};

// Statistics pass 1: one thread = one (chunk, channel); neighbouring threads take neighbouring
// channels, so in channels_last their loads coalesce.
template <typename T, typename Acc, bool ChannelsLast>
struct BnStatsPartialProgram {
  using Args = BnStatsArgs<T, Acc>;

  static int64_t num_threads(const Args& a) { return a.chunks * a.C; }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const BnChunk k = bn_chunk_decode(idx, a.C, a.N * a.S, a.chunk_positions);
    const int64_t c = k.c, chunk = k.chunk, begin = k.begin, end = k.end;
    const Acc shift = static_cast<Acc>(a.y[bn_offset<ChannelsLast>(begin, c, a.C, a.S)]);
    Acc s1 = Acc(0), s2 = Acc(0);
    for (int64_t p = begin; p < end; ++p) {
      const Acc d = static_cast<Acc>(a.y[bn_offset<ChannelsLast>(p, c, a.C, a.S)]) - shift;
      s1 += d;
      s2 += d * d;
    }
    const BnMoments<Acc> m =
        bn_moments_from_shifted_sums(static_cast<Acc>(end - begin), shift, s1, s2);
    Acc* out = a.partial + chunk * 3 * a.C + c;
    out[0] = m.count;
    out[a.C] = m.mean;
    out[2 * a.C] = m.m2;
  }
};

// Statistics pass 1b, while more than kBnMergeGroup chunks are left: one thread = one (group of
// kBnMergeGroup consecutive chunks, channel) merges its group in index order. The levels form a
// tree fixed by the chunk count (deterministic), and every channel's chunks merge in parallel
// instead of one after another in pass 2.
constexpr int64_t kBnMergeGroup = 32;

template <typename Acc>
struct BnMomentsMergeArgs {
  const Acc* partial;  // [chunks][3][C]
  Acc* merged;         // [ceil(chunks / kBnMergeGroup)][3][C]
  int64_t chunks, C;
};

template <typename Acc>
struct BnMomentsMergeProgram {
  using Args = BnMomentsMergeArgs<Acc>;

  static int64_t groups(int64_t chunks) { return (chunks + kBnMergeGroup - 1) / kBnMergeGroup; }
  static int64_t num_threads(const Args& a) { return groups(a.chunks) * a.C; }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const int64_t c = idx % a.C, group = idx / a.C;
    const int64_t begin = group * kBnMergeGroup;
    const int64_t end = begin + kBnMergeGroup < a.chunks ? begin + kBnMergeGroup : a.chunks;
    BnMoments<Acc> m{Acc(0), Acc(0), Acc(0)};
    for (int64_t k = begin; k < end; ++k) {
      const Acc* p = a.partial + k * 3 * a.C + c;
      m = bn_merge(m, BnMoments<Acc>{p[0], p[a.C], p[2 * a.C]});
    }
    Acc* out = a.merged + group * 3 * a.C + c;
    out[0] = m.count;
    out[a.C] = m.mean;
    out[2 * a.C] = m.m2;
  }
};

template <typename Acc>
struct BnStatsReduceArgs {
  const Acc* partial;     // [chunks][3][C], or nullptr: take given_mean and given_var
  const Acc* given_mean;  // [C]
  const Acc* given_var;   // [C] biased
  const Acc* gamma;       // [C] or nullptr (1)
  const Acc* beta;        // [C] or nullptr (0)
  Acc* mean;              // [C]
  Acc* var;               // [C] biased
  Acc* scale;             // [C]
  Acc* shift;             // [C]
  Acc eps;
  int64_t chunks, C;
};

template <typename Acc>
DEPSEP_HD void bn_affine(Acc mean, Acc var, Acc eps, const Acc* gamma, const Acc* beta, int64_t c,
                         Acc* scale, Acc* shift) {
  const Acc s = (gamma ? gamma[c] : Acc(1)) * bn_invstd(var, eps);
  scale[c] = s;
  shift[c] = (beta ? beta[c] : Acc(0)) - mean * s;
}

// Statistics pass 2: one thread = one channel; merges the (at most kBnMergeGroup, after pass 1b)
// chunks in index order, then derives the channel's scale and shift. With chunks == 0 it takes
// the given mean and var (eval, the backward's saved statistics).
template <typename Acc>
struct BnStatsReduceProgram {
  using Args = BnStatsReduceArgs<Acc>;

  static int64_t num_threads(const Args& a) { return a.C; }

  DEPSEP_HD static void run(const Args& a, int64_t c) {
    if (a.chunks > 0) {
      BnMoments<Acc> m{Acc(0), Acc(0), Acc(0)};
      for (int64_t k = 0; k < a.chunks; ++k) {
        const Acc* p = a.partial + k * 3 * a.C + c;
        m = bn_merge(m, BnMoments<Acc>{p[0], p[a.C], p[2 * a.C]});
      }
      a.mean[c] = m.mean;
      a.var[c] = m.m2 / m.count;
    } else {
      a.mean[c] = a.given_mean[c];
      a.var[c] = a.given_var[c];
    }
    bn_affine(a.mean[c], a.var[c], a.eps, a.gamma, a.beta, c, a.scale, a.shift);
  }
};

template <typename Acc, typename R>
struct BnRunningStatsArgs {
  const Acc* stats;                    // [2][C]: the batch mean and biased variance
  R* running_mean;                     // [C]
  R* running_var;                      // [C]
  const int64_t* num_batches_tracked;  // counted already; nullptr when momentum is set
  Acc momentum;
  Acc unbias;  // count / (count - 1): the unbiased variance's factor
  int64_t C;
};

// The running statistics' step, one thread per channel, as F.batch_norm computes it:
// running = (1 - factor) * running + factor * batch, with factor = momentum, or 1 /
// num_batches_tracked (a cumulative average) when num_batches_tracked is given.
template <typename Acc, typename R>
struct BnRunningStatsProgram {
  using Args = BnRunningStatsArgs<Acc, R>;

  static int64_t num_threads(const Args& a) { return a.C; }

  DEPSEP_HD static void run(const Args& a, int64_t c) {
    const Acc factor = a.num_batches_tracked != nullptr
                           ? Acc(1) / static_cast<Acc>(*a.num_batches_tracked)
                           : a.momentum;
    const Acc keep = Acc(1) - factor;
    a.running_mean[c] =
        static_cast<R>(factor * a.stats[c] + keep * static_cast<Acc>(a.running_mean[c]));
    a.running_var[c] = static_cast<R>(factor * a.stats[a.C + c] * a.unbias +
                                      keep * static_cast<Acc>(a.running_var[c]));
  }
};

template <typename T, typename Acc>
struct BnApplyArgs {
  T* y;  // in: the convolution output; out: act(scale * y + shift)
  BnChannelVectors<Acc> v;
  int64_t N, C, S;
  int32_t act;
};

template <typename T, typename Acc, bool ChannelsLast>
struct BnApplyProgram {
  using Args = BnApplyArgs<T, Acc>;

  static int64_t num_threads(const Args& a) { return bn_span_count<ChannelsLast>(a.N, a.C, a.S); }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const BnSpan<ChannelsLast> span = bn_span_decode<ChannelsLast>(idx, a.C, a.S);
    for (int64_t i = span.begin; i < span.end; ++i) {
      const int64_t c = ChannelsLast ? span.c + (i - span.begin) : span.c;
      const Acc z = a.v.scale[c] * static_cast<Acc>(a.y[i]) + a.v.shift[c];
      a.y[i] = static_cast<T>(bn_activate(z, a.act));
    }
  }
};

template <typename T, typename Acc>
struct BnGradArgs {
  T* y;  // the recomputed convolution output; the gradient apply pass overwrites it with g_y
  const T* grad_out;
  BnChannelVectors<Acc> v;
  Acc* partial;     // [chunks][2][C]: sum g_z, sum g_z * (y - mean)
  const Acc* coef;  // [3][C]: k1, k2, k3 of the gradient apply pass
  int64_t N, C, S, chunk_positions, chunks;
  int32_t act;
  bool training;  // eval: g_y = k1 * g_z alone, finite where y is not (as PyTorch's)
};

// g_z, the output gradient at the pre-activation z = scale * y + shift.
template <typename T, typename Acc, bool ChannelsLast>
DEPSEP_HD Acc bn_grad_z(const BnGradArgs<T, Acc>& a, int64_t offset, int64_t c, Acc y) {
  const Acc z = a.v.scale[c] * y + a.v.shift[c];
  return bn_activation_grad(z, static_cast<Acc>(a.grad_out[offset]), a.act);
}

// Gradient pass 1: one thread = one (chunk, channel), like the statistics pass.
template <typename T, typename Acc, bool ChannelsLast>
struct BnGradSumsProgram {
  using Args = BnGradArgs<T, Acc>;

  static int64_t num_threads(const Args& a) { return a.chunks * a.C; }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const BnChunk k = bn_chunk_decode(idx, a.C, a.N * a.S, a.chunk_positions);
    const int64_t c = k.c, chunk = k.chunk, begin = k.begin, end = k.end;
    const Acc mean = a.v.mean[c];
    Acc sum_g = Acc(0), sum_gy = Acc(0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t offset = bn_offset<ChannelsLast>(p, c, a.C, a.S);
      const Acc y = static_cast<Acc>(a.y[offset]);
      const Acc g = bn_grad_z<T, Acc, ChannelsLast>(a, offset, c, y);
      sum_g += g;
      sum_gy += g * (y - mean);
    }
    a.partial[chunk * 2 * a.C + c] = sum_g;
    a.partial[(chunk * 2 + 1) * a.C + c] = sum_gy;
  }
};

template <typename Acc>
struct BnGradReduceArgs {
  const Acc* partial;  // [chunks][2][C]
  const Acc* gamma;    // [C] or nullptr
  const Acc* var;      // [C]
  Acc* grad_gamma;     // [C]
  Acc* grad_beta;      // [C]
  Acc* coef;           // [3][C]
  Acc eps, count;      // count: values per channel
  int64_t chunks, C;
  bool training;
};

// Gradient pass 2: one thread = one channel; sums the chunks in index order. With xhat =
// (y - mean) * invstd, grad_gamma = sum(g_z * xhat) and grad_beta = sum(g_z). In training the
// batch statistics depend on y too:
//   g_y = gamma * invstd * (g_z - sum(g_z)/M - xhat * sum(g_z * xhat)/M)
//       = k1 * g_z + k2 * (y - mean) + k3;
// in eval g_y = gamma * invstd * g_z.
template <typename Acc>
struct BnGradReduceProgram {
  using Args = BnGradReduceArgs<Acc>;

  static int64_t num_threads(const Args& a) { return a.C; }

  DEPSEP_HD static void run(const Args& a, int64_t c) {
    Acc sum_g = Acc(0), sum_gy = Acc(0);
    for (int64_t k = 0; k < a.chunks; ++k) {
      sum_g += a.partial[k * 2 * a.C + c];
      sum_gy += a.partial[(k * 2 + 1) * a.C + c];
    }
    const Acc invstd = bn_invstd(a.var[c], a.eps);
    const Acc k1 = (a.gamma ? a.gamma[c] : Acc(1)) * invstd;
    a.grad_gamma[c] = sum_gy * invstd;
    a.grad_beta[c] = sum_g;
    a.coef[c] = k1;
    a.coef[a.C + c] = a.training ? -k1 * invstd * invstd * sum_gy / a.count : Acc(0);
    a.coef[2 * a.C + c] = a.training ? -k1 * sum_g / a.count : Acc(0);
  }
};

// Gradient pass 3: g_y in place of y, elementwise.
template <typename T, typename Acc, bool ChannelsLast>
struct BnGradApplyProgram {
  using Args = BnGradArgs<T, Acc>;

  static int64_t num_threads(const Args& a) { return bn_span_count<ChannelsLast>(a.N, a.C, a.S); }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const BnSpan<ChannelsLast> span = bn_span_decode<ChannelsLast>(idx, a.C, a.S);
    for (int64_t i = span.begin; i < span.end; ++i) {
      const int64_t c = ChannelsLast ? span.c + (i - span.begin) : span.c;
      const Acc y = static_cast<Acc>(a.y[i]);
      const Acc g = bn_grad_z<T, Acc, ChannelsLast>(a, i, c, y);
      Acc g_y = a.coef[c] * g;
      if (a.training) g_y += a.coef[a.C + c] * (y - a.v.mean[c]) + a.coef[2 * a.C + c];
      a.y[i] = static_cast<T>(g_y);
    }
  }
};

}  // namespace depsep
