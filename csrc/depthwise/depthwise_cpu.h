// The CPU compute policy of the depthwise ops: the CPU loops (cpu_loops.h) for float and
// double in both layouts (narrow NCHW planes transposed to channels_last); the thread programs
// for float16/bfloat16.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_launcher.h"
#include "depthwise/cpu_loops_entry.h"
#include "depthwise/depthwise_ops.h"

namespace depsep {

// The CPU loops of the best instruction set this processor has.
template <typename T>
void forward_loops(const DwGeometry& g, bool channels_last, const T* input, const T* weight,
                   const T* bias, T* output, int64_t begin, int64_t end, void* scratch) {
  if (cpu_loops_use_avx2())
    cpu_avx2::depthwise_forward(g, channels_last, input, weight, bias, output, begin, end, scratch);
  else
    cpu_base::depthwise_forward(g, channels_last, input, weight, bias, output, begin, end, scratch);
}

template <typename T>
void forward_rows_loops(const DwGeometry& g, const T* input, const T* weight, const T* bias,
                        T* rows_out, int64_t begin, int64_t end, void* scratch) {
  if (cpu_loops_use_avx2())
    cpu_avx2::depthwise_forward_rows(g, input, weight, bias, rows_out, begin, end, scratch);
  else
    cpu_base::depthwise_forward_rows(g, input, weight, bias, rows_out, begin, end, scratch);
}

template <typename T>
void input_grad_loops(const DwGeometry& g, bool channels_last, const T* grad_output,
                      const T* weight, T* grad_input, int64_t begin, int64_t end, void* scratch) {
  if (cpu_loops_use_avx2())
    cpu_avx2::depthwise_input_grad(g, channels_last, grad_output, weight, grad_input, begin, end,
                                   scratch);
  else
    cpu_base::depthwise_input_grad(g, channels_last, grad_output, weight, grad_input, begin, end,
                                   scratch);
}

template <typename T>
void weight_grad_loops(const DwGeometry& g, bool channels_last, const T* grad_output,
                       const T* input, T* partial, int64_t begin, int64_t end, void* scratch) {
  if (cpu_loops_use_avx2())
    cpu_avx2::depthwise_weight_grad(g, channels_last, grad_output, input, partial, begin, end,
                                    scratch);
  else
    cpu_base::depthwise_weight_grad(g, channels_last, grad_output, input, partial, begin, end,
                                    scratch);
}

// fn(begin, end, scratch) over [0, count) on the intra-op pool; each task gets its own
// tap-list scratch. Every index owns its outputs, so the thread count never changes results.
template <typename Fn>
void cpu_parallel(int64_t count, const DwGeometry& g, Fn&& fn) {
  const int64_t scratch_words =
      static_cast<int64_t>(g.kH) * g.kW * kCpuLoopTapBytes / static_cast<int64_t>(sizeof(int64_t));
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(scratch_words);
    fn(begin, end, static_cast<void*>(scratch.data()));
  });
}

struct CpuLoopsCompute {
  using DeviceGuard = CpuLauncher::DeviceGuard;
  using Programs = ProgramCompute<CpuLauncher>;

  static bool has_loops(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

  // NCHW planes narrower than this run faster transposed to channels_last and back than
  // through the plane loops, whose per-row overhead then outweighs the work (measured on
  // the MobileNet layers: 14 and 7 wide).
  static constexpr int64_t kMinPlaneWidth = 28;

  static at::MemoryFormat compute_format(const DwGeometry& g, at::MemoryFormat suggested,
                                         at::ScalarType t) {
    const bool narrow = g.W < kMinPlaneWidth;
    return has_loops(t) && narrow ? at::MemoryFormat::ChannelsLast : suggested;
  }

  // The loops' unit of work: an output (forward, weight gradient) or input (input gradient)
  // row in channels_last, an (n, c) plane in NCHW.
  static int64_t work_items(const DwGeometry& g, bool channels_last, int64_t rows) {
    return channels_last ? g.N * rows : g.N * g.C;
  }

  static void forward(const DwGeometry& g, bool channels_last, const at::Tensor& x,
                      const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
    if (!has_loops(x.scalar_type())) return Programs::forward(g, channels_last, x, w, b, out);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_fwd_cpu", [&] {
      const scalar_t* bias = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
      cpu_parallel(work_items(g, channels_last, g.OH), g,
                   [&](int64_t begin, int64_t end, void* scratch) {
                     forward_loops<scalar_t>(g, channels_last, x.const_data_ptr<scalar_t>(),
                                             w.const_data_ptr<scalar_t>(), bias,
                                             out.mutable_data_ptr<scalar_t>(), begin, end, scratch);
                   });
    });
  }

  static void input_grad(const DwGeometry& g, bool channels_last, const at::Tensor& go,
                         const at::Tensor& w, at::Tensor& grad_input) {
    if (!has_loops(go.scalar_type()))
      return Programs::input_grad(g, channels_last, go, w, grad_input);
    AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "dw_bwd_in_cpu", [&] {
      cpu_parallel(
          work_items(g, channels_last, g.H), g, [&](int64_t begin, int64_t end, void* scratch) {
            input_grad_loops<scalar_t>(
                g, channels_last, go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                grad_input.mutable_data_ptr<scalar_t>(), begin, end, scratch);
          });
    });
  }

  // Two passes as in the programs: partial sums, then the fixed-order reduction. Partials are
  // per chunk of output rows in channels_last (chunking from the shape only), per image in
  // NCHW; each is written by one task, so the thread count never changes the result.
  static void weight_grad(const DwGeometry& g, bool channels_last, const at::Tensor& go,
                          const at::Tensor& x, at::Tensor& grad_weight, at::Tensor& grad_bias) {
    if (!has_loops(x.scalar_type()))
      return Programs::weight_grad(g, channels_last, go, x, grad_weight, grad_bias);
    const DwWeightGradPlan plan = dw_weight_grad_plan(g);
    const int64_t taps = static_cast<int64_t>(g.kH) * g.kW;
    const int64_t rows = g.N * g.OH;
    at::Tensor partial = at::zeros({channels_last ? plan.chunks : g.N, taps + 1, g.C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dw_bwd_w_cpu", [&] {
      const scalar_t* go_data = go.const_data_ptr<scalar_t>();
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      scalar_t* partial_data = partial.mutable_data_ptr<scalar_t>();
      if (channels_last) {
        cpu_parallel(plan.chunks, g, [&](int64_t begin, int64_t end, void* scratch) {
          for (int64_t chunk = begin; chunk < end; ++chunk) {
            const int64_t row_begin = chunk * plan.rows_per_chunk;
            const int64_t row_end = std::min(row_begin + plan.rows_per_chunk, rows);
            weight_grad_loops<scalar_t>(g, true, go_data, x_data,
                                        partial_data + chunk * (taps + 1) * g.C, row_begin, row_end,
                                        scratch);
          }
        });
      } else {
        cpu_parallel(g.N * g.C, g, [&](int64_t begin, int64_t end, void* scratch) {
          weight_grad_loops<scalar_t>(g, false, go_data, x_data, partial_data, begin, end, scratch);
        });
      }
      dw_reduce_weight_grad<CpuLauncher, scalar_t, scalar_t>(partial, taps, g.C, grad_weight,
                                                             grad_bias);
    });
  }
};

}  // namespace depsep
