// The BN CPU loops compiled for AVX2 + FMA (used only where the processor has them). The pragma
// comes first so every function of this file gets the target.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#endif

#include "fused/bn_cpu_loops.h"

namespace depsep {
namespace cpu_avx2 {
DEPSEP_DEFINE_BN_CPU_LOOPS(float)
DEPSEP_DEFINE_BN_CPU_LOOPS(double)
}  // namespace cpu_avx2
}  // namespace depsep
