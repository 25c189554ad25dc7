// The convolution policies of the fused ops, one interface: `kFusesBn` says whether the policy
// applies BN and the activation itself (forward_bn_act) or leaves them to BnActPasses over its
// output (forward); every policy offers forward(input, weight) and backward(...), the
// convolution's gradients from g_y. PointwiseConv: ATen's GEMM; DepthwiseConv: the depthwise op
// bodies of a Compute; DepthwiseFusedConv: the depthwise thread programs with the BN epilogue.
// The 1x1 GEMM with the BN epilogue (PointwiseFusedConv) is in pointwise_gemm_ops.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#include "depthwise/depthwise_ops.h"
#include "fused/bn_passes.h"

namespace depsep {

// The 1x1 convolution as ATen GEMMs on the tensors' device, in the input's memory format:
// channels_last is [N*H*W, C_in] x [C_in, C_out], NCHW is [C_out, C_in] x [C_in, H*W] per image.
struct PointwiseConv {
  static constexpr bool kFusesBn = false;  // BN runs as passes over the GEMM's output
  static at::Tensor output_like(const at::Tensor& x, int64_t channels) {
    return at::empty({x.size(0), channels, x.size(2), x.size(3)},
                     x.options().memory_format(x.suggest_memory_format()));
  }

  static bool channels_last(const at::Tensor& t) {
    return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  }

  // [N*H*W, C] rows of a channels_last tensor (a view).
  static at::Tensor rows(const at::Tensor& t) {
    return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)});
  }

  // [N, C, H*W] planes of an NCHW tensor (a view).
  static at::Tensor planes(const at::Tensor& t) { return t.reshape({t.size(0), t.size(1), -1}); }

  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight) const {
    const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)});
    const at::Tensor x = input.contiguous(input.suggest_memory_format());
    at::Tensor y = output_like(x, w.size(0));
    at::Tensor y_view = channels_last(x) ? rows(y) : planes(y);  // writes through to y
    if (channels_last(x))
      at::mm_out(y_view, rows(x), w.t());
    else
      at::matmul_out(y_view, w, planes(x));
    return y;
  }

  void backward(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                bool need_input, bool need_weight, at::Tensor& grad_input,
                at::Tensor& grad_weight) const {
    const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)});
    const at::Tensor x = input.contiguous(input.suggest_memory_format());
    const bool cl = channels_last(x);
    if (need_input) {
      grad_input = output_like(x, x.size(1));
      at::Tensor view = cl ? rows(grad_input) : planes(grad_input);  // writes through
      if (cl)
        at::mm_out(view, rows(grad_y), w);
      else
        at::matmul_out(view, w.t(), planes(grad_y));
    }
    if (need_weight) {
      at::Tensor gw;
      if (cl) {
        gw = at::mm(rows(grad_y).t(), rows(x));
      } else {
        // One GEMM per image, summed in image order: no [N, C_out, C_in] temporary.
        gw = at::zeros_like(w);
        const at::Tensor gy_planes = planes(grad_y), x_planes = planes(x);
        for (int64_t n = 0; n < x.size(0); ++n) gw.addmm_(gy_planes[n], x_planes[n].t());
      }
      grad_weight = gw.reshape(weight.sizes());
    }
  }
};

// The depthwise convolution through the depthwise op bodies of `Compute`.
template <typename Compute>
struct DepthwiseConv {
  static constexpr bool kFusesBn = false;
  at::IntArrayRef stride, padding, dilation;

  DepthwiseConv(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation)
      : stride(stride), padding(padding), dilation(dilation) {}

  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight) const {
    return depthwise_conv2d_fwd<Compute>(input, weight, std::nullopt, stride, padding, dilation);
  }

  void backward(const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& weight,
                bool need_input, bool need_weight, at::Tensor& grad_input,
                at::Tensor& grad_weight) const {
    if (need_input)
      grad_input = depthwise_conv2d_bwd_input<Compute>(grad_y, weight, input.sizes(), stride,
                                                       padding, dilation);
    if (need_weight)
      grad_weight = std::get<0>(depthwise_conv2d_bwd_weight<Compute>(
          grad_y, input, {weight.size(2), weight.size(3)}, stride, padding, dilation, false));
  }
};

// The depthwise convolution with BatchNorm and the activation inside its thread programs
// (the CUDA kernels; on the host, the test-only depsep_host ops). Training: a statistics
// pass that recomputes the convolution and writes nothing (reads x), then the forward with the
// act(scale * y + shift) epilogue (reads x, writes out): 2 reads of the input + 1 write, where
// writing y and reading it back would add 2 passes over the output. Eval: the epilogue pass
// alone, one read and one write. Backward as DepthwiseConv.
template <typename Launcher>
struct DepthwiseFusedConv : DepthwiseConv<ProgramCompute<Launcher>> {
  using DepthwiseConv<ProgramCompute<Launcher>>::DepthwiseConv;
  static constexpr bool kFusesBn = true;

  std::tuple<at::Tensor, at::Tensor> forward_bn_act(const at::Tensor& input,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& gamma, const at::Tensor& beta,
                                                    const at::Tensor& running_mean,
                                                    const at::Tensor& running_var, bool training,
                                                    double eps, int32_t act) const {
    const DwGeometry g = dw_geometry(input.sizes(), {weight.size(-2), weight.size(-1)},
                                     this->stride, this->padding, this->dilation);
    dw_check_weight(weight, input, g.C);
    const auto format = input.suggest_memory_format();
    const bool cl = format == at::MemoryFormat::ChannelsLast;
    const at::Tensor x = input.contiguous(format);
    const at::Tensor w = dw_tap_major(weight);
    at::Tensor out = at::empty({g.N, g.C, g.OH, g.OW}, input.options().memory_format(format));
    TORCH_CHECK(out.numel() > 0, "depsep: the fused ops need a non-empty input");
    const DwPlan plan = dw_plan(g, cl, {&x, &w, &out});
    const DwWeightGradPlan chunks = dw_bn_stats_plan(g);
    BnVectors bn(g.C, input);
    const at::Tensor partial =
        training ? at::empty({chunks.chunks, 3, g.C}, bn.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dw_bn_fwd", [&] {
      using Acc = at::opmath_type<scalar_t>;
      if (training) {
        with_spatial_program<DwBnStatsProgram, scalar_t>(plan, [&](auto program) {
          using P = decltype(program);
          typename P::Args args{x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                partial.mutable_data_ptr<Acc>(), g, chunks};
          Launcher::template launch<P>(args, P::num_threads(g, chunks));
        });
      }
      bn_reduce<Launcher>(bn, partial, running_mean, running_var, gamma, beta, eps);
      with_spatial_program<DwForwardProgram, scalar_t>(plan, [&](auto program) {
        using P = decltype(program);
        typename P::Args args{x.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(),
                              nullptr,
                              out.mutable_data_ptr<scalar_t>(),
                              g,
                              bn.scale<Acc>(),
                              bn.shift<Acc>(),
                              act};
        Launcher::template launch<P>(args, P::num_threads(g));
      });
    });
    return {out, bn.stats};
  }
};

}  // namespace depsep
