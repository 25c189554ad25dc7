// CPU loops of the depthwise convolution for channels_last float/double: the fast CPU path.
//
// GPU-style per-thread programs ran 3-8x slower than oneDNN here. These loops walk one image
// row at a time with no index decoding: border pixels resolve their valid taps into a short
// list, interior pixels share one precomputed list (no per-element checks), and 3x3 interior
// pixels go four at a time with the channel vector's 9 weights in registers. The contiguous
// channel dimension is swept with explicit 32-byte vectors. Weights are tap-major, [kH*kW][C],
// so a tap's weights for a channel vector are one load.
//
// This header is compiled twice, into namespaces `cpu_base` (the build's default ISA) and
// `cpu_avx2` (with `#pragma GCC target("avx2,fma")`), and the caller picks at run time. So it
// must not include or call anything with external linkage: an inline function shared with
// other translation units could be merged by the linker into its AVX2 copy. Everything here
// lives in an anonymous namespace; the entry points are declared in cpu_loops_entry.h.
#pragma once

#include "common/cpu_lanes.h"
#include "depthwise_geometry.h"

namespace {

using depsep::DwGeometry;

// One tap that reaches a pixel: its index in [0, kH*kW) and the element offset of the source
// pixel (channel 0) it reads.
struct Tap {
  int64_t tap;
  int64_t offset;
};

// dst[c] = (bias[c]) + sum over taps of src[offset + c] * weight[tap*C + c], for all C.
// `weight` is tap-major. NV vectors per step keep several independent FMA chains in flight.
template <typename T, int NV>
void gather_channels(const Tap* taps, int ntaps, const T* src, const T* weight, const T* bias,
                     T* dst, int64_t c_begin, int64_t c_end, int64_t C) {
  using L = Lanes<T>;
  constexpr int64_t step = static_cast<int64_t>(NV) * L::kLanes;
  for (int64_t c = c_begin; c + step <= c_end; c += step) {
    typename L::V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = bias ? L::load(bias + c + v * L::kLanes) : L::zero();
    for (int t = 0; t < ntaps; ++t) {
      const T* s = src + taps[t].offset + c;
      const T* w = weight + taps[t].tap * C + c;
      for (int v = 0; v < NV; ++v)
        acc[v] += L::load(s + v * L::kLanes) * L::load(w + v * L::kLanes);
    }
    for (int v = 0; v < NV; ++v) L::store(dst + c + v * L::kLanes, acc[v]);
  }
}

// gather_channels over all C: 4-vector steps, then single vectors, then scalars.
template <typename T>
void gather_pixel(const Tap* taps, int ntaps, const T* src, const T* weight, const T* bias, T* dst,
                  int64_t C) {
  constexpr int64_t lanes = Lanes<T>::kLanes;
  const int64_t c4 = C / (4 * lanes) * (4 * lanes);
  const int64_t c1 = C / lanes * lanes;
  gather_channels<T, 4>(taps, ntaps, src, weight, bias, dst, 0, c4, C);
  gather_channels<T, 1>(taps, ntaps, src, weight, bias, dst, c4, c1, C);
  for (int64_t c = c1; c < C; ++c) {
    T acc = bias ? bias[c] : T(0);
    for (int t = 0; t < ntaps; ++t) acc += src[taps[t].offset + c] * weight[taps[t].tap * C + c];
    dst[c] = acc;
  }
}

// The taps of output pixel (n, oh, ow) that fall inside the input, with their input offsets.
int forward_taps(const DwGeometry& g, int64_t n, int64_t oh, int64_t ow, Tap* taps) {
  int count = 0;
  for (int64_t kh = 0; kh < g.kH; ++kh) {
    const int64_t ih = oh * g.sH - g.padT + kh * g.dH;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      const int64_t iw = ow * g.sW - g.padL + kw * g.dW;
      if (iw < 0 || iw >= g.W) continue;
      taps[count++] = {kh * g.kW + kw, ((n * g.H + ih) * g.W + iw) * g.C};
    }
  }
  return count;
}

// The output pixels whose window covers input pixel (n, ih, iw), with their grad_output offsets.
int input_grad_taps(const DwGeometry& g, int64_t n, int64_t ih, int64_t iw, Tap* taps) {
  int count = 0;
  for (int64_t kh = 0; kh < g.kH; ++kh) {
    const int64_t th = ih + g.padT - kh * g.dH;
    if (th < 0 || th % g.sH != 0 || th / g.sH >= g.OH) continue;
    for (int64_t kw = 0; kw < g.kW; ++kw) {
      const int64_t tw = iw + g.padL - kw * g.dW;
      if (tw < 0 || tw % g.sW != 0 || tw / g.sW >= g.OW) continue;
      taps[count++] = {kh * g.kW + kw, ((n * g.OH + th / g.sH) * g.OW + tw / g.sW) * g.C};
    }
  }
  return count;
}

// 3x3 interior pixels go kStrip at a time: a channel vector's 9 weights (or 9 weight-gradient
// accumulators) are loaded into registers once and serve kStrip pixels, about one load per FMA
// instead of two.
constexpr int kStrip = 4;
constexpr int kTaps3x3 = 9;

// Where the whole kernel window of an output row lies inside the input: the row's taps are
// then one fixed list of offsets relative to the window's corner, computed once per call.
struct Interior {
  int64_t ow_begin, ow_end;  // output columns whose window is inside [0, W)
  int ntaps;                 // kH*kW
  bool strips;               // 3x3: interior pixels go kStrip at a time
};

Interior forward_interior(const DwGeometry& g, Tap* taps) {
  int count = 0;
  for (int64_t kh = 0; kh < g.kH; ++kh)
    for (int64_t kw = 0; kw < g.kW; ++kw)
      taps[count++] = {kh * g.kW + kw, (kh * g.dH * g.W + kw * g.dW) * g.C};
  const int64_t span = static_cast<int64_t>(g.kW - 1) * g.dW;
  const int64_t begin = (g.padL + g.sW - 1) / g.sW;
  int64_t end = g.W - 1 - span + g.padL >= 0 ? (g.W - 1 - span + g.padL) / g.sW + 1 : 0;
  if (end > g.OW) end = g.OW;
  return {begin, end > begin ? end : begin, count, count == kTaps3x3};
}

bool row_inside(const DwGeometry& g, int64_t oh) {
  const int64_t top = oh * g.sH - g.padT;
  return top >= 0 && top + static_cast<int64_t>(g.kH - 1) * g.dH < g.H;
}

// Calls single(taps, ntaps, source_base, ow) for each output pixel of row (n, oh), or
// strip(source_base, ow) for kStrip interior pixels at once where the kernel is 3x3. Interior
// pixels share the precomputed tap list, border pixels get their own.
template <typename Single, typename Strip>
void for_each_output_pixel(const DwGeometry& g, int64_t n, int64_t oh, const Tap* interior_taps,
                           const Interior& in, Tap* border_taps, Single&& single, Strip&& strip) {
  const bool inside = row_inside(g, oh);
  const int64_t row_corner = (n * g.H + oh * g.sH - g.padT) * g.W - g.padL;
  for (int64_t ow = 0; ow < g.OW;) {
    if (inside && ow >= in.ow_begin && ow < in.ow_end) {
      const int64_t corner = (row_corner + ow * g.sW) * g.C;
      if (in.strips && ow + kStrip <= in.ow_end) {
        strip(corner, ow);
        ow += kStrip;
        continue;
      }
      single(interior_taps, in.ntaps, corner, ow);
    } else {
      single(border_taps, forward_taps(g, n, oh, ow, border_taps), int64_t(0), ow);
    }
    ++ow;
  }
}

// dst[j*dst_step + c] = bias[c] + sum_t src[j*src_step + taps[t].offset + c] * w[t][c] for
// kStrip pixels j and all C, with the NT taps' weights held in registers.
template <typename T, int NT>
void gather_strip(const Tap* taps, const T* src, int64_t src_step, const T* weight, const T* bias,
                  T* dst, int64_t dst_step, int64_t C) {
  using L = Lanes<T>;
  const int64_t c_vec = C / L::kLanes * L::kLanes;
  for (int64_t c = 0; c < c_vec; c += L::kLanes) {
    typename L::V w[NT], acc[kStrip];
    for (int t = 0; t < NT; ++t) w[t] = L::load(weight + taps[t].tap * C + c);
    const typename L::V b = bias ? L::load(bias + c) : L::zero();
    for (int j = 0; j < kStrip; ++j) acc[j] = b;
    for (int t = 0; t < NT; ++t)
      for (int j = 0; j < kStrip; ++j)
        acc[j] += L::load(src + j * src_step + taps[t].offset + c) * w[t];
    for (int j = 0; j < kStrip; ++j) L::store(dst + j * dst_step + c, acc[j]);
  }
  for (int64_t c = c_vec; c < C; ++c)
    for (int j = 0; j < kStrip; ++j) {
      T acc = bias ? bias[c] : T(0);
      for (int t = 0; t < NT; ++t)
        acc += src[j * src_step + taps[t].offset + c] * weight[taps[t].tap * C + c];
      dst[j * dst_step + c] = acc;
    }
}

// Channels_last output rows [row_begin, row_end) into `rows_out`, row row_begin at its start.
template <typename T>
void forward_rows(const DwGeometry& g, const T* input, const T* weight, const T* bias, T* rows_out,
                  int64_t row_begin, int64_t row_end, Tap* scratch) {
  Tap* interior_taps = scratch;
  Tap* border_taps = scratch + static_cast<int64_t>(g.kH) * g.kW;
  const Interior in = forward_interior(g, interior_taps);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t n = r / g.OH, oh = r % g.OH;
    T* out_row = rows_out + (r - row_begin) * g.OW * g.C;
    for_each_output_pixel(
        g, n, oh, interior_taps, in, border_taps,
        [&](const Tap* taps, int ntaps, int64_t base, int64_t ow) {
          gather_pixel(taps, ntaps, input + base, weight, bias, out_row + ow * g.C, g.C);
        },
        [&](int64_t base, int64_t ow) {
          gather_strip<T, kTaps3x3>(interior_taps, input + base, g.sW * g.C, weight, bias,
                                    out_row + ow * g.C, g.C, g.C);
        });
  }
}

template <typename T>
void input_grad_rows(const DwGeometry& g, const T* grad_output, const T* weight, T* grad_input,
                     int64_t row_begin, int64_t row_end, Tap* scratch) {
  // With stride 1 every tap of an interior pixel hits an output pixel, at a fixed offset
  // from (ih + padT, iw + padL); with larger strides the valid taps vary pixel by pixel.
  Tap* interior_taps = scratch;
  Tap* border_taps = scratch + static_cast<int64_t>(g.kH) * g.kW;
  const bool unit_stride = g.sH == 1 && g.sW == 1;
  int ntaps_interior = 0;
  for (int64_t kh = 0; kh < g.kH; ++kh)
    for (int64_t kw = 0; kw < g.kW; ++kw)
      interior_taps[ntaps_interior++] = {kh * g.kW + kw, -(kh * g.dH * g.OW + kw * g.dW) * g.C};
  const bool strips = ntaps_interior == kTaps3x3;
  const int64_t h_span = static_cast<int64_t>(g.kH - 1) * g.dH;
  const int64_t w_span = static_cast<int64_t>(g.kW - 1) * g.dW;
  // Interior columns: iw + padL - w_span >= 0 and iw + padL < OW.
  const int64_t iw_begin = w_span - g.padL > 0 ? w_span - g.padL : 0;
  const int64_t iw_end = g.OW - g.padL < g.W ? g.OW - g.padL : g.W;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t n = r / g.H, ih = r % g.H;
    const bool row_in = unit_stride && ih + g.padT - h_span >= 0 && ih + g.padT < g.OH;
    const int64_t go_row = (n * g.OH + ih + g.padT) * g.OW + g.padL;
    for (int64_t iw = 0; iw < g.W;) {
      T* dst = grad_input + (r * g.W + iw) * g.C;
      if (row_in && iw >= iw_begin && iw < iw_end) {
        const T* src = grad_output + (go_row + iw) * g.C;
        if (strips && iw + kStrip <= iw_end) {
          gather_strip<T, kTaps3x3>(interior_taps, src, g.C, weight, nullptr, dst, g.C, g.C);
          iw += kStrip;
          continue;
        }
        gather_pixel<T>(interior_taps, ntaps_interior, src, weight, nullptr, dst, g.C);
      } else {
        const int ntaps = input_grad_taps(g, n, ih, iw, border_taps);
        gather_pixel<T>(border_taps, ntaps, grad_output, weight, nullptr, dst, g.C);
      }
      ++iw;
    }
  }
}

// partial[t][c] += sum_j go[j*go_step + c] * src[j*src_step + taps[t].offset + c] for kStrip
// pixels, and the bias row += go; the NT accumulators of a channel vector stay in registers.
template <typename T, int NT>
void accumulate_strip(const Tap* taps, const T* src, int64_t src_step, const T* go, int64_t go_step,
                      T* partial, T* bias_partial, int64_t C) {
  using L = Lanes<T>;
  const int64_t c_vec = C / L::kLanes * L::kLanes;
  for (int64_t c = 0; c < c_vec; c += L::kLanes) {
    typename L::V acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = L::load(partial + taps[t].tap * C + c);
    typename L::V bias_acc = L::load(bias_partial + c);
    for (int j = 0; j < kStrip; ++j) {
      const typename L::V gv = L::load(go + j * go_step + c);
      bias_acc += gv;
      for (int t = 0; t < NT; ++t) acc[t] += gv * L::load(src + j * src_step + taps[t].offset + c);
    }
    for (int t = 0; t < NT; ++t) L::store(partial + taps[t].tap * C + c, acc[t]);
    L::store(bias_partial + c, bias_acc);
  }
  for (int64_t c = c_vec; c < C; ++c)
    for (int j = 0; j < kStrip; ++j) {
      for (int t = 0; t < NT; ++t)
        partial[taps[t].tap * C + c] +=
            go[j * go_step + c] * src[j * src_step + taps[t].offset + c];
      bias_partial[c] += go[j * go_step + c];
    }
}

// partial[tap*C + c] += grad_output[pixel, c] * input[tap's source, c] for every output pixel
// of output rows [row_begin, row_end); partial[kH*kW*C + c] += grad_output (the bias).
template <typename T>
void weight_grad_rows(const DwGeometry& g, const T* grad_output, const T* input, T* partial,
                      int64_t row_begin, int64_t row_end, Tap* scratch) {
  using L = Lanes<T>;
  const int64_t C = g.C, c_vec = C / L::kLanes * L::kLanes;
  T* bias_partial = partial + static_cast<int64_t>(g.kH) * g.kW * C;
  Tap* interior_taps = scratch;
  Tap* border_taps = scratch + static_cast<int64_t>(g.kH) * g.kW;
  const Interior in = forward_interior(g, interior_taps);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t n = r / g.OH, oh = r % g.OH;
    for_each_output_pixel(
        g, n, oh, interior_taps, in, border_taps,
        [&](const Tap* taps, int ntaps, int64_t base, int64_t ow) {
          const T* go = grad_output + (r * g.OW + ow) * C;
          const T* src = input + base;
          for (int64_t c = 0; c < c_vec; c += L::kLanes) {
            const typename L::V gv = L::load(go + c);
            for (int t = 0; t < ntaps; ++t) {
              T* p = partial + taps[t].tap * C + c;
              L::store(p, L::load(p) + gv * L::load(src + taps[t].offset + c));
            }
            L::store(bias_partial + c, L::load(bias_partial + c) + gv);
          }
          for (int64_t c = c_vec; c < C; ++c) {
            for (int t = 0; t < ntaps; ++t)
              partial[taps[t].tap * C + c] += go[c] * src[taps[t].offset + c];
            bias_partial[c] += go[c];
          }
        },
        [&](int64_t base, int64_t ow) {
          accumulate_strip<T, kTaps3x3>(interior_taps, input + base, g.sW * C,
                                        grad_output + (r * g.OW + ow) * C, C, partial, bias_partial,
                                        C);
        });
  }
}

// NCHW: one (n, c) plane at a time, one output row at a time, one tap at a time: each tap
// adds w * (a shifted input row) to the output row, which stays in L1. With stride 1 the
// shifted row is contiguous and the compiler vectorises the loop over columns.

// Output columns [lo, hi) whose source column ow*stride + offset lies in [0, size).
void valid_columns(int64_t offset, int64_t stride, int64_t size, int64_t count, int64_t* lo,
                   int64_t* hi) {
  *lo = offset < 0 ? (-offset + stride - 1) / stride : 0;
  *hi = size - 1 - offset >= 0 ? (size - 1 - offset) / stride + 1 : 0;
  if (*hi > count) *hi = count;
  if (*hi < *lo) *hi = *lo;
}

template <typename T>
void forward_planes(const DwGeometry& g, const T* input, const T* weight, const T* bias, T* output,
                    int64_t plane_begin, int64_t plane_end) {
  for (int64_t p = plane_begin; p < plane_end; ++p) {
    const int64_t c = p % g.C;
    const T* in = input + p * g.H * g.W;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      T* __restrict__ out = output + (p * g.OH + oh) * g.OW;
      const T b = bias ? bias[c] : T(0);
      for (int64_t ow = 0; ow < g.OW; ++ow) out[ow] = b;
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        const int64_t ih = oh * g.sH - g.padT + kh * g.dH;
        if (ih < 0 || ih >= g.H) continue;
        const T* __restrict__ row = in + ih * g.W;
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          const T w = weight[(kh * g.kW + kw) * g.C + c];
          const int64_t offset = kw * g.dW - g.padL;
          int64_t lo, hi;
          valid_columns(offset, g.sW, g.W, g.OW, &lo, &hi);
          if (g.sW == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] += w * row[ow + offset];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow] += w * row[ow * g.sW + offset];
          }
        }
      }
    }
  }
}

// The transpose: each output row scatters w * grad_output into the input rows its taps read.
// Every grad_input element receives its terms in the same (oh, kh, kw) order: deterministic.
template <typename T>
void input_grad_planes(const DwGeometry& g, const T* grad_output, const T* weight, T* grad_input,
                       int64_t plane_begin, int64_t plane_end) {
  for (int64_t p = plane_begin; p < plane_end; ++p) {
    const int64_t c = p % g.C;
    T* gin = grad_input + p * g.H * g.W;
    for (int64_t i = 0; i < g.H * g.W; ++i) gin[i] = T(0);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const T* __restrict__ go = grad_output + (p * g.OH + oh) * g.OW;
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        const int64_t ih = oh * g.sH - g.padT + kh * g.dH;
        if (ih < 0 || ih >= g.H) continue;
        T* __restrict__ row = gin + ih * g.W;
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          const T w = weight[(kh * g.kW + kw) * g.C + c];
          const int64_t offset = kw * g.dW - g.padL;
          int64_t lo, hi;
          valid_columns(offset, g.sW, g.W, g.OW, &lo, &hi);
          if (g.sW == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) row[ow + offset] += w * go[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) row[ow * g.sW + offset] += w * go[ow];
          }
        }
      }
    }
  }
}

// sum_j a[j] * b[j * stride], vectorised for stride 1 (explicit lanes: no reassociation
// flags needed), in a fixed order.
template <typename T>
T dot(const T* a, const T* b, int64_t stride, int64_t n) {
  using L = Lanes<T>;
  int64_t j = 0;
  typename L::V acc = L::zero();
  if (stride == 1)
    for (; j + L::kLanes <= n; j += L::kLanes) acc += L::load(a + j) * L::load(b + j);
  T sum = L::sum(acc);
  for (; j < n; ++j) sum += a[j] * b[j * stride];
  return sum;
}

// Plane (n, c) adds its terms to partial[n][tap][c] (and partial[n][kH*kW][c], the bias):
// per image partials, reduced over n in order by the caller.
template <typename T>
void weight_grad_planes(const DwGeometry& g, const T* grad_output, const T* input, T* partial,
                        int64_t plane_begin, int64_t plane_end) {
  const int64_t taps = static_cast<int64_t>(g.kH) * g.kW;
  for (int64_t p = plane_begin; p < plane_end; ++p) {
    const int64_t n = p / g.C, c = p % g.C;
    const T* in = input + p * g.H * g.W;
    T* part = partial + n * (taps + 1) * g.C + c;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const T* go = grad_output + (p * g.OH + oh) * g.OW;
      T row_sum = T(0);
      for (int64_t ow = 0; ow < g.OW; ++ow) row_sum += go[ow];
      part[taps * g.C] += row_sum;
      for (int64_t kh = 0; kh < g.kH; ++kh) {
        const int64_t ih = oh * g.sH - g.padT + kh * g.dH;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t kw = 0; kw < g.kW; ++kw) {
          const int64_t offset = kw * g.dW - g.padL;
          int64_t lo, hi;
          valid_columns(offset, g.sW, g.W, g.OW, &lo, &hi);
          part[(kh * g.kW + kw) * g.C] +=
              dot(go + lo, in + ih * g.W + lo * g.sW + offset, g.sW, hi - lo);
        }
      }
    }
  }
}

}  // namespace

// Defines the entry points of cpu_loops_entry.h in the enclosing ISA namespace.
#define DEPSEP_DEFINE_CPU_LOOPS(T)                                                                 \
  void depthwise_forward(const DwGeometry& g, bool channels_last, const T* input, const T* weight, \
                         const T* bias, T* output, int64_t begin, int64_t end, void* scratch) {    \
    if (channels_last)                                                                             \
      forward_rows<T>(g, input, weight, bias, output + begin * g.OW * g.C, begin, end,             \
                      static_cast<Tap*>(scratch));                                                 \
    else                                                                                           \
      forward_planes<T>(g, input, weight, bias, output, begin, end);                               \
  }                                                                                                \
  void depthwise_forward_rows(const DwGeometry& g, const T* input, const T* weight, const T* bias, \
                              T* rows_out, int64_t begin, int64_t end, void* scratch) {            \
    forward_rows<T>(g, input, weight, bias, rows_out, begin, end, static_cast<Tap*>(scratch));     \
  }                                                                                                \
  void depthwise_input_grad(const DwGeometry& g, bool channels_last, const T* grad_output,         \
                            const T* weight, T* grad_input, int64_t begin, int64_t end,            \
                            void* scratch) {                                                       \
    if (channels_last)                                                                             \
      input_grad_rows<T>(g, grad_output, weight, grad_input, begin, end,                           \
                         static_cast<Tap*>(scratch));                                              \
    else                                                                                           \
      input_grad_planes<T>(g, grad_output, weight, grad_input, begin, end);                        \
  }                                                                                                \
  void depthwise_weight_grad(const DwGeometry& g, bool channels_last, const T* grad_output,        \
                             const T* input, T* partial, int64_t begin, int64_t end,               \
                             void* scratch) {                                                      \
    if (channels_last)                                                                             \
      weight_grad_rows<T>(g, grad_output, input, partial, begin, end, static_cast<Tap*>(scratch)); \
    else                                                                                           \
      weight_grad_planes<T>(g, grad_output, input, partial, begin, end);                           \
  }
