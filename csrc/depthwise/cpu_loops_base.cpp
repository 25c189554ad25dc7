// The CPU loops for the build's default instruction set.
#include "depthwise/cpu_loops.h"
#include "depthwise/cpu_loops_entry.h"

namespace depsep {
namespace cpu_base {
DEPSEP_DEFINE_CPU_LOOPS(float)
DEPSEP_DEFINE_CPU_LOOPS(double)
}  // namespace cpu_base
}  // namespace depsep

static_assert(2 * sizeof(Tap) == depsep::kCpuLoopTapBytes, "scratch size in cpu_loops_entry.h");
