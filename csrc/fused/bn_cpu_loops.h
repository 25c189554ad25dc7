// CPU loops of the BN passes of the native fused ops, float and double: the statistics, apply,
// gradient sums and gradient apply passes of bn_act_programs.h, over the same chunks of
// positions and with the same per-chunk outputs, computed without decoding an index per
// element. channels_last sweeps each row's contiguous channels in 32-byte vectors (per-channel
// vectors loaded alongside); NCHW sweeps each channel's run of a plane in vectors, its scale and
// shift broadcast. The reductions keep their sums in registers: channels_last one vector of
// channels down the chunk's rows, NCHW one vector of positions per channel, added up in a fixed
// lane order, so results depend on the shape only, never on the thread count.
//
// Compiled twice, as the depthwise CPU loops (see depthwise/cpu_loops.h): everything here is in
// an anonymous namespace and calls nothing with external linkage but the C library's exp
// (activation.h is included for its codes only).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/activation.h"
#include "common/cpu_lanes.h"
#include "fused/bn_cpu_loops_entry.h"

namespace {

using depsep::BnCpuPass;

float exp_of(float x) { return __builtin_expf(x); }
double exp_of(double x) { return __builtin_exp(x); }

// f(lane, c) over the channels [0, C): vectors, then single lanes.
template <typename T, typename F>
void sweep_channels(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + Lanes<T>::kLanes <= C; c += Lanes<T>::kLanes) f(Lanes<T>{}, c);
  for (; c < C; ++c) f(OneLane<T>{}, c);
}

// f(lane, offset) over the elements of NCHW channel c at positions [begin, end): one contiguous
// run per image plane, vectors then single lanes.
template <typename T, typename F>
void sweep_plane_runs(const BnCpuPass<T>& a, int64_t c, int64_t begin, int64_t end, F&& f) {
  for (int64_t p = begin; p < end;) {
    const int64_t n = p / a.S, s = p - n * a.S;
    const int64_t len = end - p < a.S - s ? end - p : a.S - s;
    int64_t i = (n * a.C + c) * a.S + s;
    const int64_t run_end = i + len;
    for (; i + Lanes<T>::kLanes <= run_end; i += Lanes<T>::kLanes) f(Lanes<T>{}, i);
    for (; i < run_end; ++i) f(OneLane<T>{}, i);
    p += len;
  }
}

// A sum over vectors and single lanes (NCHW runs): lanes added in index order at the end.
template <typename T>
struct RunSum {
  // Members set by the constructor, not by default initialisers: GCC 12 at -O0 (make coverage)
  // stops with an internal error on a vector-typed default initialiser under #pragma GCC target.
  RunSum() : v(Lanes<T>::zero()), s(T(0)) {}
  typename Lanes<T>::V v;
  T s;
  void add(typename Lanes<T>::V x) { v += x; }
  void add(T x) { s += x; }
  T total() const { return Lanes<T>::sum(v) + s; }
};

template <typename L, typename V, typename F>
V each_lane(V v, F f) {
  if constexpr (L::kLanes == 1) {
    return f(v);
  } else {
    for (int l = 0; l < L::kLanes; ++l) v[l] = f(v[l]);
    return v;
  }
}

template <typename L, typename V, typename F>
V each_lane(V v, V w, F f) {
  if constexpr (L::kLanes == 1) {
    return f(v, w);
  } else {
    for (int l = 0; l < L::kLanes; ++l) v[l] = f(v[l], w[l]);
    return v;
  }
}

// bn_activate and bn_activation_grad (common/activation.h) on a pack of lanes, the same
// comparisons in the same order (so NaN and the kinks behave alike); silu per lane (exp).
template <int Act, typename L, typename T, typename V>
V activate(V z) {
  const V zero = L::zero(), six = L::splat(T(6));
  if constexpr (Act == depsep::kActRelu) {
    return z <= zero ? zero : z;
  } else if constexpr (Act == depsep::kActRelu6) {
    return z <= zero ? zero : (z >= six ? six : z);
  } else if constexpr (Act == depsep::kActSilu) {
    return each_lane<L>(z, [](T x) { return x / (T(1) + exp_of(-x)); });
  } else if constexpr (Act == depsep::kActHardswish) {
    const V t = z + L::splat(T(3));
    const V clamped = t < zero ? zero : (t > six ? six : t);
    return z * clamped / six;
  } else {
    return z;
  }
}

template <int Act, typename L, typename T, typename V>
V activation_grad(V z, V g) {
  const V zero = L::zero();
  if constexpr (Act == depsep::kActRelu) {
    return z <= zero ? zero : g;
  } else if constexpr (Act == depsep::kActRelu6) {
    return ((z <= zero) | (z >= L::splat(T(6)))) ? zero : g;
  } else if constexpr (Act == depsep::kActSilu) {
    return each_lane<L>(z, g, [](T x, T dy) {
      const T s = T(1) / (T(1) + exp_of(-x));
      return dy * s * (T(1) + x * (T(1) - s));
    });
  } else if constexpr (Act == depsep::kActHardswish) {
    const V three = L::splat(T(3));
    return z <= -three ? zero : (z < three ? g * (z / three + L::splat(T(0.5))) : g);
  } else {
    return g;
  }
}

// f(std::integral_constant<int, act>) for the run-time activation code.
template <typename F>
void with_activation(int32_t act, F&& f) {
  switch (act) {
    case depsep::kActRelu:
      return f(std::integral_constant<int, depsep::kActRelu>{});
    case depsep::kActRelu6:
      return f(std::integral_constant<int, depsep::kActRelu6>{});
    case depsep::kActSilu:
      return f(std::integral_constant<int, depsep::kActSilu>{});
    case depsep::kActHardswish:
      return f(std::integral_constant<int, depsep::kActHardswish>{});
    default:
      return f(std::integral_constant<int, depsep::kActNone>{});
  }
}

struct ChunkRange {
  int64_t begin, end;  // positions
};

template <typename T>
ChunkRange chunk_range(const BnCpuPass<T>& a, int64_t chunk) {
  const int64_t positions = a.N * a.S;
  const int64_t begin = chunk * a.chunk_positions;
  const int64_t end = begin + a.chunk_positions < positions ? begin + a.chunk_positions : positions;
  return {begin, end};
}

template <typename T>
void shifted_sums(const BnCpuPass<T>& a, int64_t chunk) {
  const ChunkRange r = chunk_range(a, chunk);
  const int64_t C = a.C;
  T* out = a.sums + chunk * 3 * C;
  if (a.channels_last) {
    sweep_channels<T>(C, [&](auto lane, int64_t c) {
      using L = decltype(lane);
      const T* column = a.y + c;
      const auto shift = L::load(column + r.begin * C);
      auto s1 = L::zero(), s2 = L::zero();
      for (int64_t p = r.begin; p < r.end; ++p) {
        const auto d = L::load(column + p * C) - shift;
        s1 += d;
        s2 += d * d;
      }
      L::store(out + c, shift);
      L::store(out + C + c, s1);
      L::store(out + 2 * C + c, s2);
    });
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = r.begin / a.S;
      const T shift = a.y[(n * C + c) * a.S + (r.begin - n * a.S)];
      RunSum<T> s1, s2;
      sweep_plane_runs(a, c, r.begin, r.end, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        const auto d = L::load(a.y + i) - L::splat(shift);
        s1.add(d);
        s2.add(d * d);
      });
      out[c] = shift;
      out[C + c] = s1.total();
      out[2 * C + c] = s2.total();
    }
  }
}

template <int Act, typename T>
void apply(const BnCpuPass<T>& a, int64_t chunk) {
  const ChunkRange r = chunk_range(a, chunk);
  const int64_t C = a.C;
  if (a.channels_last) {
    for (int64_t p = r.begin; p < r.end; ++p) {
      T* row = a.y + p * C;
      sweep_channels<T>(C, [&](auto lane, int64_t c) {
        using L = decltype(lane);
        const auto z = L::load(a.scale + c) * L::load(row + c) + L::load(a.shift + c);
        L::store(row + c, activate<Act, L, T>(z));
      });
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      sweep_plane_runs(a, c, r.begin, r.end, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        const auto z = L::splat(a.scale[c]) * L::load(a.y + i) + L::splat(a.shift[c]);
        L::store(a.y + i, activate<Act, L, T>(z));
      });
    }
  }
}

// The gradient at the pre-activation for a pack: g_z = act'(scale * y + shift) * grad_out.
template <int Act, typename L, typename T, typename V>
V grad_z(V y, V g, V scale, V shift) {
  return activation_grad<Act, L, T>(scale * y + shift, g);
}

template <int Act, typename T>
void grad_sums(const BnCpuPass<T>& a, int64_t chunk) {
  const ChunkRange r = chunk_range(a, chunk);
  const int64_t C = a.C;
  T* out = a.sums + chunk * 2 * C;
  if (a.channels_last) {
    sweep_channels<T>(C, [&](auto lane, int64_t c) {
      using L = decltype(lane);
      const auto mean = L::load(a.mean + c), scale = L::load(a.scale + c);
      const auto shift = L::load(a.shift + c);
      auto sum_g = L::zero(), sum_gy = L::zero();
      for (int64_t p = r.begin; p < r.end; ++p) {
        const auto y = L::load(a.y + p * C + c);
        const auto g = grad_z<Act, L, T>(y, L::load(a.grad_out + p * C + c), scale, shift);
        sum_g += g;
        sum_gy += g * (y - mean);
      }
      L::store(out + c, sum_g);
      L::store(out + C + c, sum_gy);
    });
  } else {
    for (int64_t c = 0; c < C; ++c) {
      RunSum<T> sum_g, sum_gy;
      sweep_plane_runs(a, c, r.begin, r.end, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        const auto y = L::load(a.y + i);
        const auto g = grad_z<Act, L, T>(y, L::load(a.grad_out + i), L::splat(a.scale[c]),
                                         L::splat(a.shift[c]));
        sum_g.add(g);
        sum_gy.add(g * (y - L::splat(a.mean[c])));
      });
      out[c] = sum_g.total();
      out[C + c] = sum_gy.total();
    }
  }
}

// g_y for a pack: k1 * g_z, plus k2 * (y - mean) + k3 in training.
template <int Act, typename L, typename T, typename V>
V grad_y(const BnCpuPass<T>& a, V y, V g, V mean, V scale, V shift, V k1, V k2, V k3) {
  const V g_z = grad_z<Act, L, T>(y, g, scale, shift);
  return a.training ? k1 * g_z + k2 * (y - mean) + k3 : k1 * g_z;
}

template <int Act, typename T>
void grad_apply(const BnCpuPass<T>& a, int64_t chunk) {
  const ChunkRange r = chunk_range(a, chunk);
  const int64_t C = a.C;
  const T *k1 = a.coef, *k2 = a.coef + C, *k3 = a.coef + 2 * C;
  if (a.channels_last) {
    for (int64_t p = r.begin; p < r.end; ++p) {
      T* row = a.y + p * C;
      const T* g_row = a.grad_out + p * C;
      sweep_channels<T>(C, [&](auto lane, int64_t c) {
        using L = decltype(lane);
        L::store(row + c,
                 grad_y<Act, L, T>(a, L::load(row + c), L::load(g_row + c), L::load(a.mean + c),
                                   L::load(a.scale + c), L::load(a.shift + c), L::load(k1 + c),
                                   L::load(k2 + c), L::load(k3 + c)));
      });
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      sweep_plane_runs(a, c, r.begin, r.end, [&](auto lane, int64_t i) {
        using L = decltype(lane);
        L::store(a.y + i,
                 grad_y<Act, L, T>(a, L::load(a.y + i), L::load(a.grad_out + i),
                                   L::splat(a.mean[c]), L::splat(a.scale[c]), L::splat(a.shift[c]),
                                   L::splat(k1[c]), L::splat(k2[c]), L::splat(k3[c])));
      });
    }
  }
}

}  // namespace

// Defines the entry points of bn_cpu_loops_entry.h in the enclosing ISA namespace.
#define DEPSEP_DEFINE_BN_CPU_LOOPS(T)                                                  \
  void bn_shifted_sums(const BnCpuPass<T>& a, int64_t begin, int64_t end) {            \
    for (int64_t k = begin; k < end; ++k) shifted_sums<T>(a, k);                       \
  }                                                                                    \
  void bn_apply(const BnCpuPass<T>& a, int64_t begin, int64_t end) {                   \
    with_activation(a.act, [&](auto act) {                                             \
      for (int64_t k = begin; k < end; ++k) apply<decltype(act)::value, T>(a, k);      \
    });                                                                                \
  }                                                                                    \
  void bn_grad_sums(const BnCpuPass<T>& a, int64_t begin, int64_t end) {               \
    with_activation(a.act, [&](auto act) {                                             \
      for (int64_t k = begin; k < end; ++k) grad_sums<decltype(act)::value, T>(a, k);  \
    });                                                                                \
  }                                                                                    \
  void bn_grad_apply(const BnCpuPass<T>& a, int64_t begin, int64_t end) {              \
    with_activation(a.act, [&](auto act) {                                             \
      for (int64_t k = begin; k < end; ++k) grad_apply<decltype(act)::value, T>(a, k); \
    });                                                                                \
  }
