// Which build of the CPU loops (depthwise/cpu_loops.h, fused/bn_cpu_loops.h) this processor
// runs: `cpu_avx2` where it has AVX2 and FMA, else `cpu_base`.
#pragma once

namespace depsep {

inline bool cpu_loops_use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace depsep
