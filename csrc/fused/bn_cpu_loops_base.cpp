// The BN CPU loops for the build's default instruction set.
#include "fused/bn_cpu_loops.h"

namespace depsep {
namespace cpu_base {
DEPSEP_DEFINE_BN_CPU_LOOPS(float)
DEPSEP_DEFINE_BN_CPU_LOOPS(double)
}  // namespace cpu_base
}  // namespace depsep
