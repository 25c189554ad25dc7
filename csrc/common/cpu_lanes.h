// Explicit 32-byte vectors for the CPU loops (GCC vector extensions): `Lanes<T>` is one vector
// of float or double, `OneLane<T>` the same interface over a single scalar, for the tails of a
// sweep. Included by headers that are compiled once per instruction set (cpu_base, cpu_avx2):
// everything here is in an anonymous namespace, so no copy built for AVX2 can be merged by the
// linker into code built for the default target.
#pragma once

namespace {

template <typename T>
struct Vec32;
template <>
struct Vec32<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec32<double> {
  typedef double type __attribute__((vector_size(32)));
};

template <typename T>
struct Lanes {
  using V = typename Vec32<T>::type;
  static constexpr int kLanes = 32 / sizeof(T);

  static V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  static V zero() { return V{}; }
  static V splat(T x) { return V{} + x; }
  static T sum(V v) {
    T s = v[0];
    for (int l = 1; l < kLanes; ++l) s += v[l];
    return s;
  }
};

template <typename T>
struct OneLane {
  using V = T;
  static constexpr int kLanes = 1;

  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V zero() { return T(0); }
  static V splat(T x) { return x; }
  static T sum(V v) { return v; }
};

}  // namespace
