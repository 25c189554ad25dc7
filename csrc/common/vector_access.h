// VEC consecutive elements moved as one access: 16 bytes (one LDG.128/STG.128/STS.128) when
// the vector fills them. A vector access needs an address aligned to its size; the host plans
// only pick vector accesses when every base pointer is aligned and the row length is a
// multiple of VEC, and the host run of a program checks each address (it throws on a
// misaligned one), so a test run proves the GPU's vector accesses are aligned.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common/host_device.h"

namespace depsep {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) AlignedVector {
  T v[VEC];
};

template <int BYTES>
DEPSEP_HD void check_vector_aligned(const void* p) {
#if !defined(__CUDA_ARCH__)
  if (reinterpret_cast<uintptr_t>(p) % BYTES != 0)
    throw std::runtime_error("depsep: misaligned vector access in a thread program");
#else
  (void)p;
#endif
}

template <typename T, int VEC>
DEPSEP_HD void vector_load(const T* p, T (&out)[VEC]) {
  if constexpr (VEC > 1) {
    check_vector_aligned<sizeof(T) * VEC>(p);
    const AlignedVector<T, VEC> r = *reinterpret_cast<const AlignedVector<T, VEC>*>(p);
    for (int v = 0; v < VEC; ++v) out[v] = r.v[v];
  } else {
    out[0] = p[0];
  }
}

template <typename T, int VEC>
DEPSEP_HD void vector_store(T* p, const T (&in)[VEC]) {
  if constexpr (VEC > 1) {
    check_vector_aligned<sizeof(T) * VEC>(p);
    AlignedVector<T, VEC> r;
    for (int v = 0; v < VEC; ++v) r.v[v] = in[v];
    *reinterpret_cast<AlignedVector<T, VEC>*>(p) = r;
  } else {
    p[0] = in[0];
  }
}

}  // namespace depsep
