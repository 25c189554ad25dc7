// The CPU loops compiled for AVX2 + FMA (used only where the processor has them; see
// cpu_loops_use_avx2). The pragma comes first so every function of this file gets the target.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#endif

#include "depthwise/cpu_loops.h"
#include "depthwise/cpu_loops_entry.h"

namespace depsep {
namespace cpu_avx2 {
DEPSEP_DEFINE_CPU_LOOPS(float)
DEPSEP_DEFINE_CPU_LOOPS(double)
}  // namespace cpu_avx2
}  // namespace depsep
