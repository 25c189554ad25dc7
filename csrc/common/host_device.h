// DEPSEP_HD marks the single-source functions that run both in CUDA kernels and on the host:
// the thread programs and the math they share.
#pragma once

#if defined(__CUDACC__)
#define DEPSEP_HD __host__ __device__ __forceinline__
#else
#define DEPSEP_HD inline
#endif
