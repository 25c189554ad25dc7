// Block programs: the single-source form of a kernel whose threads cooperate, through shared
// memory and warp-level matrix operations, where a thread program (depthwise_programs.h) cannot.
//
// A program is `Program::run(block, args, block_index, shared)`, written against a `Block`
// that stands for the hardware:
//   block.threads([&](int t) {...});  the work of thread t up to the next barrier
//   block.warps([&](int w) {...});    the work of warp w: its warp-collective matrix steps
//   block.sync();                     the barrier, __syncthreads() on the GPU
//   Block::PerThread<V>, PerWarp<V>   values a thread or warp keeps across a barrier
//   Block::WarpMatrix<T>              the warp-level matrix operations (below)
// and `shared` is a plain struct, the block's shared memory. On the GPU (DeviceBlock,
// cuda_block_launcher.cuh) every thread runs each call with its own index and PerThread/PerWarp
// storage is one register variable. On the host (HostBlock, host_block_launcher.h) each call
// runs its body for every thread (warp) index of the block in turn and the storage is an array
// over the indices; for a program with no race between two barriers that computes what the GPU
// computes, so the tests run the kernel's tiling, edge masking, vector accesses and epilogues.
//
// WarpMatrix<T> (T: the operand element type in shared memory; float runs as TF32):
//   kDepth                     K of one step: 16 for float16/bfloat16, 8 for TF32
//   FragmentA                  a 16 x kDepth tile of A, row-major in shared memory
//   FragmentB                  a kDepth x 16 tile of B, column-major: (k, n) at p[n * ld + k]
//   Accumulator                a 16 x 16 float tile
//   fill(acc, value), load_a(a, p, ld), load_b(b, p, ld), mma(acc, a, b): acc += a * b,
//   store(p, acc, ld): acc to a row-major float tile. Fragment pointers must be 32-byte
//   aligned and ld a multiple of 16 bytes (WMMA's rules; the host checks both).
#pragma once

#include <cstdint>

namespace depsep {

constexpr int kWarpSize = 32;

// A block's index in a 2-D grid, or the grid's size.
struct BlockXY {
  int64_t x, y;
};

}  // namespace depsep
