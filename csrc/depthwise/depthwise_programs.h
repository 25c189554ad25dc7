// Single-source thread programs of the depthwise convolution.
//
// Each program computes the outputs of one GPU thread from a plain argument struct and a
// linear thread index: `run(args, idx)` decodes the index into coordinates and computes a tile
// of VEC channels x STRIP positions along W. The CUDA kernels are thin __global__ loops over
// `run`; the CPU backend calls the very same `run` for every index, so every test run on the
// host executes the GPU kernels' index arithmetic, boundary handling, vector widths and
// accumulation order.
//
// Layouts: NCHW and channels_last (NHWC), chosen at compile time so channel strides are
// constants. Weights are passed tap-major, [kH*kW][C], so a vector of channels reads one
// contiguous run of weights. Accumulation is in `Acc` (float for half/bfloat16/float, double
// for double). All offsets are 64-bit.
#pragma once

#include <cstdint>

#include "common/activation.h"
#include "common/host_device.h"
#include "common/moments.h"
#include "common/vector_access.h"
#include "depthwise_geometry.h"

namespace depsep {

// The compile-time shape of a depthwise thread program: element and accumulation types, the
// layout, a kernel size fixed at compile time (0: read from the geometry), the channels and the
// output columns one thread computes. with_spatial_program / with_weight_grad_program
// (depthwise_ops.h) pick one from a call's DwPlan.
template <typename T_, typename Acc_, bool ChannelsLast_, int KH_, int KW_, int VEC_, int STRIP_>
struct DwKernelTraits {
  using T = T_;
  using Acc = Acc_;
  static constexpr bool ChannelsLast = ChannelsLast_;
  static constexpr int KH = KH_, KW = KW_, VEC = VEC_, STRIP = STRIP_;
};

// A program's traits as the names its body uses.
#define DEPSEP_DW_TRAITS(K)                             \
  using T = typename K::T;                              \
  using Acc = typename K::Acc;                          \
  static constexpr bool ChannelsLast = K::ChannelsLast; \
  static constexpr int KH = K::KH, KW = K::KW, VEC = K::VEC, STRIP = K::STRIP

template <bool ChannelsLast>
DEPSEP_HD int64_t dw_offset(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t H,
                            int64_t W) {
  return ChannelsLast ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

DEPSEP_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One tile of output (or input-gradient) elements: VEC channels from c0, one row, STRIP
// columns from col0. In channels_last the channel vector is the fastest-moving index so that
// neighbouring threads touch neighbouring bytes; in NCHW the column strip is.
struct DwTile {
  int64_t n, c0, row, col0;
};

template <bool ChannelsLast, int VEC, int STRIP>
DEPSEP_HD int64_t dw_tile_count(int64_t N, int64_t C, int64_t rows, int64_t cols) {
  return N * (C / VEC) * rows * ceil_div(cols, STRIP);
}

template <bool ChannelsLast, int VEC, int STRIP>
DEPSEP_HD DwTile dw_tile_decode(int64_t idx, int64_t C, int64_t rows, int64_t cols) {
  const int64_t cvecs = C / VEC;
  const int64_t strips = ceil_div(cols, STRIP);
  DwTile t;
  if (ChannelsLast) {
    t.c0 = (idx % cvecs) * VEC;
    idx /= cvecs;
    t.col0 = (idx % strips) * STRIP;
    idx /= strips;
    t.row = idx % rows;
    t.n = idx / rows;
  } else {
    t.col0 = (idx % strips) * STRIP;
    idx /= strips;
    t.row = idx % rows;
    idx /= rows;
    t.c0 = (idx % cvecs) * VEC;
    t.n = idx / cvecs;
  }
  return t;
}

template <typename T, typename Acc>
struct DwForwardArgs {
  const T* input;   // [N, C, H, W] in the program's layout
  const T* weight;  // [kH*kW][C], tap-major
  const T* bias;    // [C] or nullptr
  T* output;        // [N, C, OH, OW] in the program's layout
  DwGeometry g;
  // The fused ops' epilogue: out = act(bn_scale * conv + bn_shift) when bn_scale is set.
  const Acc* bn_scale = nullptr;
  const Acc* bn_shift = nullptr;
  int32_t act = kActNone;
};

// Adds the taps of one tile (VEC channels from c0 of image n, output row `row`, strip_n
// columns from col0) to acc: the forward convolution's inner loops, shared by the forward and
// the fused statistics pass.
template <typename T, typename Acc, bool ChannelsLast, int KH, int KW, int VEC, int STRIP>
DEPSEP_HD void dw_forward_taps(const T* input, const T* weight, const DwGeometry& g, int64_t n,
                               int64_t c0, int64_t row, int64_t col0, int64_t strip_n,
                               Acc (&acc)[STRIP][VEC]) {
  const int kh_n = KH > 0 ? KH : g.kH;
  const int kw_n = KW > 0 ? KW : g.kW;
  for (int kh = 0; kh < kh_n; ++kh) {
    const int64_t ih = row * g.sH - g.padT + static_cast<int64_t>(kh) * g.dH;
    if (ih < 0 || ih >= g.H) continue;
    for (int kw = 0; kw < kw_n; ++kw) {
      T wv[VEC];
      vector_load<T, VEC>(weight + static_cast<int64_t>(kh * kw_n + kw) * g.C + c0, wv);
      for (int j = 0; j < STRIP; ++j) {
        const int64_t iw = (col0 + j) * g.sW - g.padL + static_cast<int64_t>(kw) * g.dW;
        if (j >= strip_n || iw < 0 || iw >= g.W) continue;
        T x[VEC];
        vector_load<T, VEC>(input + dw_offset<ChannelsLast>(n, c0, ih, iw, g.C, g.H, g.W), x);
        for (int v = 0; v < VEC; ++v) acc[j][v] += static_cast<Acc>(x[v]) * static_cast<Acc>(wv[v]);
      }
    }
  }
}

// Forward: out[n,c,oh,ow] = bias[c] + sum_{kh,kw} in[n,c,oh*sH-padT+kh*dH, ow*sW-padL+kw*dW] * w.
// KH/KW > 0 fix the kernel size at compile time (the 3x3 fast path); 0 means read it from g.
template <typename K>
struct DwForwardProgram {
  DEPSEP_DW_TRAITS(K);
  using Args = DwForwardArgs<T, Acc>;

  static int64_t num_threads(const DwGeometry& g) {
    return dw_tile_count<ChannelsLast, VEC, STRIP>(g.N, g.C, g.OH, g.OW);
  }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const DwGeometry& g = a.g;
    const DwTile t = dw_tile_decode<ChannelsLast, VEC, STRIP>(idx, g.C, g.OH, g.OW);
    const int64_t strip_n = g.OW - t.col0 < STRIP ? g.OW - t.col0 : STRIP;

    Acc acc[STRIP][VEC];
    for (int v = 0; v < VEC; ++v) {
      const Acc b = a.bias != nullptr ? static_cast<Acc>(a.bias[t.c0 + v]) : Acc(0);
      for (int j = 0; j < STRIP; ++j) acc[j][v] = b;
    }
    dw_forward_taps<T, Acc, ChannelsLast, KH, KW, VEC, STRIP>(a.input, a.weight, g, t.n, t.c0,
                                                              t.row, t.col0, strip_n, acc);
    // The epilogue's scale and shift, loaded once for the strip: the output stores might alias
    // them for all the compiler knows, so it would reload them for every column.
    const bool bn = a.bn_scale != nullptr;
    Acc scale[VEC], shift[VEC];
    for (int v = 0; v < VEC; ++v) {
      scale[v] = bn ? a.bn_scale[t.c0 + v] : Acc(1);
      shift[v] = bn ? a.bn_shift[t.c0 + v] : Acc(0);
    }
    for (int j = 0; j < strip_n; ++j) {
      T out[VEC];
      for (int v = 0; v < VEC; ++v) {
        Acc r = acc[j][v];
        if (bn) r = bn_activate(scale[v] * r + shift[v], a.act);
        out[v] = static_cast<T>(r);
      }
      vector_store<T, VEC>(
          a.output + dw_offset<ChannelsLast>(t.n, t.c0, t.row, t.col0 + j, g.C, g.OH, g.OW), out);
    }
  }
};

template <typename T>
struct DwInputGradArgs {
  const T* grad_output;  // [N, C, OH, OW]
  const T* weight;       // [kH*kW][C], tap-major
  T* grad_input;         // [N, C, H, W]
  DwGeometry g;
};

// Input gradient as a gather (no atomics): each input position sums the outputs whose window
// covers it, grad_in[n,c,ih,iw] = sum over taps with (ih+padT-kh*dH) = oh*sH, likewise for w.
template <typename K>
struct DwInputGradProgram {
  DEPSEP_DW_TRAITS(K);
  using Args = DwInputGradArgs<T>;

  static int64_t num_threads(const DwGeometry& g) {
    return dw_tile_count<ChannelsLast, VEC, STRIP>(g.N, g.C, g.H, g.W);
  }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const DwGeometry& g = a.g;
    const DwTile t = dw_tile_decode<ChannelsLast, VEC, STRIP>(idx, g.C, g.H, g.W);
    const int kh_n = KH > 0 ? KH : g.kH;
    const int kw_n = KW > 0 ? KW : g.kW;
    const int64_t strip_n = g.W - t.col0 < STRIP ? g.W - t.col0 : STRIP;

    Acc acc[STRIP][VEC];
    for (int j = 0; j < STRIP; ++j)
      for (int v = 0; v < VEC; ++v) acc[j][v] = Acc(0);
    for (int kh = 0; kh < kh_n; ++kh) {
      const int64_t th = t.row + g.padT - static_cast<int64_t>(kh) * g.dH;
      if (th < 0 || th % g.sH != 0 || th / g.sH >= g.OH) continue;
      const int64_t oh = th / g.sH;
      for (int kw = 0; kw < kw_n; ++kw) {
        T wv[VEC];
        vector_load<T, VEC>(a.weight + static_cast<int64_t>(kh * kw_n + kw) * g.C + t.c0, wv);
        for (int j = 0; j < STRIP; ++j) {
          const int64_t tw = t.col0 + j + g.padL - static_cast<int64_t>(kw) * g.dW;
          if (j >= strip_n || tw < 0 || tw % g.sW != 0 || tw / g.sW >= g.OW) continue;
          const int64_t ow = tw / g.sW;
          T go[VEC];
          vector_load<T, VEC>(
              a.grad_output + dw_offset<ChannelsLast>(t.n, t.c0, oh, ow, g.C, g.OH, g.OW), go);
          for (int v = 0; v < VEC; ++v)
            acc[j][v] += static_cast<Acc>(go[v]) * static_cast<Acc>(wv[v]);
        }
      }
    }
    for (int j = 0; j < strip_n; ++j) {
      T out[VEC];
      for (int v = 0; v < VEC; ++v) out[v] = static_cast<T>(acc[j][v]);
      vector_store<T, VEC>(
          a.grad_input + dw_offset<ChannelsLast>(t.n, t.c0, t.row, t.col0 + j, g.C, g.H, g.W), out);
    }
  }
};

// The weight gradient reduces over N*OH*OW positions. For determinism it runs in two passes
// with no atomics: pass 1 writes one partial sum per (chunk of output rows, tap, channel),
// pass 2 adds the chunks in a fixed order. The chunking depends on the shape only.
struct DwWeightGradPlan {
  int64_t rows_per_chunk;  // output rows (n*OH + oh) reduced by one pass-1 thread
  int64_t chunks;
};

// About 4096 output positions per pass-1 thread: long enough to amortise the partial write,
// short enough to leave (chunks x taps x channel vectors) threads for a GPU.
DEPSEP_HD DwWeightGradPlan dw_weight_grad_plan(const DwGeometry& g) {
  const int64_t rows = g.N * g.OH;
  const int64_t per_chunk_target = 4096;
  int64_t rows_per_chunk = g.OW > 0 ? ceil_div(per_chunk_target, g.OW) : 1;
  if (rows_per_chunk > rows) rows_per_chunk = rows > 0 ? rows : 1;
  return {rows_per_chunk, ceil_div(rows, rows_per_chunk)};
}

template <typename T, typename Acc>
struct DwWeightGradArgs {
  const T* grad_output;  // [N, C, OH, OW]
  const T* input;        // [N, C, H, W]
  Acc* partial;          // [chunks][kH*kW + 1][C]; tap kH*kW holds the bias gradient
  DwGeometry g;
  DwWeightGradPlan plan;
  bool with_bias;
};

// Pass 1: one thread = VEC channels x one tap (or the bias) x one chunk of output rows.
template <typename K>
struct DwWeightGradPartialProgram {
  DEPSEP_DW_TRAITS(K);
  using Args = DwWeightGradArgs<T, Acc>;

  static int64_t num_threads(const DwGeometry& g, const DwWeightGradPlan& plan) {
    return plan.chunks * (static_cast<int64_t>(g.kH) * g.kW + 1) * (g.C / VEC);
  }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const DwGeometry& g = a.g;
    const int64_t taps = static_cast<int64_t>(g.kH) * g.kW;
    const int64_t cvecs = g.C / VEC;
    const int64_t c0 = (idx % cvecs) * VEC;
    idx /= cvecs;
    const int64_t tap = idx % (taps + 1);
    const int64_t chunk = idx / (taps + 1);
    const int64_t row_begin = chunk * a.plan.rows_per_chunk;
    const int64_t row_total = g.N * g.OH;
    const int64_t row_end = row_begin + a.plan.rows_per_chunk < row_total
                                ? row_begin + a.plan.rows_per_chunk
                                : row_total;

    Acc acc[VEC];
    for (int v = 0; v < VEC; ++v) acc[v] = Acc(0);
    const bool is_bias = tap == taps;
    if (!is_bias || a.with_bias) {
      const int64_t kh = is_bias ? 0 : tap / g.kW;
      const int64_t kw = is_bias ? 0 : tap % g.kW;
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t n = r / g.OH;
        const int64_t oh = r % g.OH;
        const int64_t ih = oh * g.sH - g.padT + kh * g.dH;
        if (!is_bias && (ih < 0 || ih >= g.H)) continue;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t iw = ow * g.sW - g.padL + kw * g.dW;
          if (!is_bias && (iw < 0 || iw >= g.W)) continue;
          T go[VEC];
          vector_load<T, VEC>(
              a.grad_output + dw_offset<ChannelsLast>(n, c0, oh, ow, g.C, g.OH, g.OW), go);
          if (is_bias) {
            for (int v = 0; v < VEC; ++v) acc[v] += static_cast<Acc>(go[v]);
          } else {
            T x[VEC];
            vector_load<T, VEC>(a.input + dw_offset<ChannelsLast>(n, c0, ih, iw, g.C, g.H, g.W), x);
            for (int v = 0; v < VEC; ++v)
              acc[v] += static_cast<Acc>(go[v]) * static_cast<Acc>(x[v]);
          }
        }
      }
    }
    Acc* out = a.partial + (chunk * (taps + 1) + tap) * g.C + c0;
    for (int v = 0; v < VEC; ++v) out[v] = acc[v];
  }
};

template <typename T, typename Acc>
struct DwWeightGradReduceArgs {
  const Acc* partial;  // [chunks][kH*kW + 1][C]
  T* grad_weight;      // [C][kH*kW]
  T* grad_bias;        // [C] or nullptr
  int64_t chunks, taps, C;
};

// Pass 2: one thread = one (tap, channel); sums the chunks in index order.
template <typename T, typename Acc>
struct DwWeightGradReduceProgram {
  using Args = DwWeightGradReduceArgs<T, Acc>;

  static int64_t num_threads(int64_t taps, int64_t C) { return (taps + 1) * C; }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const int64_t tap = idx / a.C;
    const int64_t c = idx % a.C;
    if (tap == a.taps && a.grad_bias == nullptr) return;
    Acc sum = Acc(0);
    for (int64_t k = 0; k < a.chunks; ++k) sum += a.partial[(k * (a.taps + 1) + tap) * a.C + c];
    if (tap == a.taps)
      a.grad_bias[c] = static_cast<T>(sum);
    else
      a.grad_weight[c * a.taps + tap] = static_cast<T>(sum);
  }
};

// Output rows per thread of the fused statistics pass, from the shape only (so results do not
// depend on the device): enough chunks that chunks x C reaches 2^20, i.e. 2^17 threads of 8
// bfloat16 channels (512 blocks of 256, a large GPU several times over, for the 32-channel
// MobileNet layers at batch 128 as for the 1024-channel 7x7 ones), but no chunk shorter than
// one row or 16 positions. The tree merge of bn_reduce keeps many chunks cheap to merge.
DEPSEP_HD DwWeightGradPlan dw_bn_stats_plan(const DwGeometry& g) {
  const int64_t rows = g.N * g.OH;
  const int64_t wanted = g.C > 0 ? ceil_div(int64_t(1) << 20, g.C) : 1;
  const int64_t min_rows = g.OW > 0 ? ceil_div(16, g.OW) : 1;
  int64_t rows_per_chunk = ceil_div(rows, wanted);
  if (rows_per_chunk < min_rows) rows_per_chunk = min_rows;
  if (rows_per_chunk > rows) rows_per_chunk = rows > 0 ? rows : 1;
  return {rows_per_chunk, ceil_div(rows, rows_per_chunk)};
}

template <typename T, typename Acc>
struct DwBnStatsArgs {
  const T* input;   // [N, C, H, W]
  const T* weight;  // [kH*kW][C], tap-major
  Acc* partial;     // [chunks][3][C]: count, mean, m2 of the convolution output (BnMoments)
  DwGeometry g;
  DwWeightGradPlan plan;  // chunks of output rows
};

// The fused ops' training statistics without writing the convolution output: one thread =
// VEC channels x one chunk of output rows; it recomputes the convolution tile by tile and
// keeps shifted sums (shifted by the first output, see bn_moments_from_shifted_sums). Moves
// the input once; bn_reduce then merges the chunks (a tree fixed by their count).
template <typename K>
struct DwBnStatsProgram {
  DEPSEP_DW_TRAITS(K);
  using Args = DwBnStatsArgs<T, Acc>;

  static int64_t num_threads(const DwGeometry& g, const DwWeightGradPlan& plan) {
    return plan.chunks * (g.C / VEC);
  }

  DEPSEP_HD static void run(const Args& a, int64_t idx) {
    const DwGeometry& g = a.g;
    const int64_t cvecs = g.C / VEC;
    const int64_t c0 = (idx % cvecs) * VEC;
    const int64_t chunk = idx / cvecs;
    const int64_t row_begin = chunk * a.plan.rows_per_chunk;
    const int64_t row_total = g.N * g.OH;
    const int64_t row_end = row_begin + a.plan.rows_per_chunk < row_total
                                ? row_begin + a.plan.rows_per_chunk
                                : row_total;
    Acc shift[VEC], s1[VEC], s2[VEC];
    for (int v = 0; v < VEC; ++v)
      shift[v] = s1[v] = s2[v] = Acc(0);  // shift: set by the first tile
    bool first = true;
    for (int64_t r = row_begin; r < row_end; ++r) {
      for (int64_t col0 = 0; col0 < g.OW; col0 += STRIP) {
        const int64_t strip_n = g.OW - col0 < STRIP ? g.OW - col0 : STRIP;
        Acc acc[STRIP][VEC];
        for (int j = 0; j < STRIP; ++j)
          for (int v = 0; v < VEC; ++v) acc[j][v] = Acc(0);
        dw_forward_taps<T, Acc, ChannelsLast, KH, KW, VEC, STRIP>(a.input, a.weight, g, r / g.OH,
                                                                  c0, r % g.OH, col0, strip_n, acc);
        if (first) {
          for (int v = 0; v < VEC; ++v) shift[v] = acc[0][v];
          first = false;
        }
        for (int j = 0; j < strip_n; ++j)
          for (int v = 0; v < VEC; ++v) {
            const Acc d = acc[j][v] - shift[v];
            s1[v] += d;
            s2[v] += d * d;
          }
      }
    }
    const Acc count = static_cast<Acc>((row_end - row_begin) * g.OW);
    for (int v = 0; v < VEC; ++v) {
      const BnMoments<Acc> m = bn_moments_from_shifted_sums(count, shift[v], s1[v], s2[v]);
      Acc* out = a.partial + chunk * 3 * g.C + c0 + v;
      out[0] = m.count;
      out[g.C] = m.mean;
      out[2 * g.C] = m.m2;
    }
  }
};

}  // namespace depsep
