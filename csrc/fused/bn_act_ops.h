// Host side of the native fused convolution + BatchNorm + activation ops, shared by the CPU and
// CUDA registrations and by both convolutions. `Launcher` runs the BN thread programs
// (bn_act_programs.h) on the host or the GPU; `Conv` computes the convolution and its
// gradients (PointwiseConv: ATen's GEMM; DepthwiseConv: the depthwise kernels).
//
// Forward: y = conv(x) in the input's memory format, then (training) the statistics passes,
// then act(scale * y + shift) in place: y is written once by the convolution and read twice
// (statistics, apply) and rewritten once. Backward recomputes y from the saved input, then the
// gradient sums and g_y in y's place, then the convolution's gradients from g_y.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

#include "depthwise/depthwise_ops.h"
#include "fused/bn_act_programs.h"

namespace depsep {

inline int32_t bn_parse_activation(c10::string_view name) {
  if (name == "relu") return kActRelu;
  if (name == "relu6") return kActRelu6;
  if (name == "silu") return kActSilu;
  if (name == "hardswish") return kActHardswish;
  TORCH_CHECK(name == "none",
              "depsep: activation must be 'relu', 'relu6', 'silu', 'hardswish' or 'none', got '",
              std::string(name), "'");
  return kActNone;
}

inline at::ScalarType bn_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// An optional per-channel BN tensor as a contiguous Acc vector (undefined when absent).
inline at::Tensor bn_channel_vector(const std::optional<at::Tensor>& t, const char* name, int64_t C,
                                    const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "depsep: ", name, " must have shape [", C,
              "], got ", t->sizes());
  TORCH_CHECK(t->device() == like.device(), "depsep: ", name, " must be on ", like.device());
  return t->to(bn_acc_type(like.scalar_type())).contiguous();
}

template <typename Acc>
const Acc* bn_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<Acc>() : nullptr;
}

// y seen as [N, C, S], contiguous in one of the two layouts.
struct BnView {
  int64_t N, C, S;
  bool channels_last;
};

inline BnView bn_view(const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 4, "depsep: expected a 4-D convolution output");
  const bool cl = y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
  TORCH_CHECK(cl || y.is_contiguous(), "depsep: internal: convolution output not contiguous");
  return {y.size(0), y.size(1), y.size(2) * y.size(3), cl};
}

// The per-channel vectors of one BN: `stats` [2, C] holds the mean and biased variance (the
// batch's, reduced from partial moments, in training; a copy of the running ones in eval) that
// the op returns; scale and shift fold BN into one multiply-add.
struct BnVectors {
  at::Tensor stats, mean, var, scale, shift;

  BnVectors(int64_t C, const at::Tensor& like, bool training, const at::Tensor& running_mean,
            const at::Tensor& running_var) {
    const auto options = like.options().dtype(bn_acc_type(like.scalar_type()));
    stats = at::empty({2, C}, options);
    mean = stats[0];
    var = stats[1];
    if (!training) {
      mean.copy_(running_mean);
      var.copy_(running_var);
    }
    scale = at::empty({C}, options);
    shift = at::empty({C}, options);
  }

  template <typename Acc>
  BnChannelVectors<Acc> channel_vectors() const {
    return {mean.const_data_ptr<Acc>(), scale.const_data_ptr<Acc>(), shift.const_data_ptr<Acc>()};
  }
};

// The running-statistics step of a training call, on the tensors' device: num_batches_tracked
// (if given) counts the batch, then each channel's running mean and variance move towards the
// batch's (unbiased variance over `count` values) by `momentum`, or by 1 / num_batches_tracked
// when momentum is None.
template <typename Launcher>
void bn_update_running_stats(const at::Tensor& stats, const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var,
                             const std::optional<at::Tensor>& num_batches_tracked,
                             std::optional<double> momentum, int64_t count) {
  const bool counted = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (counted) num_batches_tracked->add_(1);
  if (!running_mean.has_value() || !running_mean->defined()) return;
  const at::Tensor& rm = *running_mean;
  const at::Tensor& rv = *running_var;
  TORCH_CHECK(rm.is_contiguous() && rv.is_contiguous() && rm.scalar_type() == rv.scalar_type(),
              "depsep: running_mean and running_var must be contiguous and of one dtype");
  TORCH_CHECK(momentum.has_value() || counted,
              "depsep: momentum=None (a cumulative average) needs num_batches_tracked");
  TORCH_CHECK(!counted || num_batches_tracked->scalar_type() == at::kLong,
              "depsep: num_batches_tracked must be an int64 tensor");
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "bn_running_stats", [&] {
    using Acc = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "bn_running", [&] {
      using R = BnRunningStatsProgram<Acc, scalar_t>;
      typename R::Args args{
          stats.const_data_ptr<Acc>(),
          rm.mutable_data_ptr<scalar_t>(),
          rv.mutable_data_ptr<scalar_t>(),
          momentum.has_value() ? nullptr : num_batches_tracked->const_data_ptr<int64_t>(),
          static_cast<Acc>(momentum.value_or(0.0)),
          static_cast<Acc>(count) / static_cast<Acc>(count - 1),
          stats.size(1)};
      Launcher::template launch<R>(args, R::num_threads(args));
    });
  });
}

// Merges `partial` ([chunks, 3, C] moments, in order; chunks may be 0 in eval) into v.mean and
// v.var, in groups of kBnMergeGroup chunks while more are left, then derives v.scale and v.shift.
template <typename Launcher>
void bn_reduce(BnVectors& v, at::Tensor partial, const at::Tensor& gamma, const at::Tensor& beta,
               double eps) {
  AT_DISPATCH_FLOATING_TYPES(v.mean.scalar_type(), "bn_reduce", [&] {
    using Acc = scalar_t;
    using M = BnMomentsMergeProgram<Acc>;
    while (partial.size(0) > kBnMergeGroup) {
      at::Tensor merged =
          at::empty({M::groups(partial.size(0)), 3, partial.size(2)}, partial.options());
      typename M::Args args{partial.const_data_ptr<Acc>(), merged.mutable_data_ptr<Acc>(),
                            partial.size(0), partial.size(2)};
      Launcher::template launch<M>(args, M::num_threads(args));
      partial = merged;
    }
    using R = BnStatsReduceProgram<Acc>;
    typename R::Args args{partial.size(0) > 0 ? partial.const_data_ptr<Acc>() : nullptr,
                          bn_ptr_or_null<Acc>(gamma),
                          bn_ptr_or_null<Acc>(beta),
                          v.mean.mutable_data_ptr<Acc>(),
                          v.var.mutable_data_ptr<Acc>(),
                          v.scale.mutable_data_ptr<Acc>(),
                          v.shift.mutable_data_ptr<Acc>(),
                          static_cast<Acc>(eps),
                          partial.size(0),
                          v.mean.size(0)};
    Launcher::template launch<R>(args, R::num_threads(args));
  });
}

template <typename Launcher>
struct BnActPasses {
  // Leaves act(BN(y)) in y; returns the [2, C] mean and biased variance it normalised with.
  static at::Tensor forward(at::Tensor& y, const at::Tensor& gamma, const at::Tensor& beta,
                            const at::Tensor& running_mean, const at::Tensor& running_var,
                            bool training, double eps, int32_t act) {
    const BnView v = bn_view(y);
    BnVectors bn(v.C, y, training, running_mean, running_var);
    const int64_t positions = v.N * v.S;
    const int64_t chunk = bn_chunk_positions(positions);
    const int64_t chunks = training ? (positions + chunk - 1) / chunk : 0;
    at::Tensor partial = at::empty({chunks, 3, v.C}, bn.mean.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_fwd", [&] {
      using Acc = at::opmath_type<scalar_t>;
      with_layout(v.channels_last, [&](auto cl) {
        constexpr bool CL = decltype(cl)::value;
        if (chunks > 0) {
          using P = BnStatsPartialProgram<scalar_t, Acc, CL>;
          typename P::Args args{y.const_data_ptr<scalar_t>(),
                                partial.mutable_data_ptr<Acc>(),
                                v.N,
                                v.C,
                                v.S,
                                chunk,
                                chunks};
          Launcher::template launch<P>(args, P::num_threads(args));
        }
        bn_reduce<Launcher>(bn, partial, gamma, beta, eps);
        using A = BnApplyProgram<scalar_t, Acc, CL>;
        typename A::Args apply{
            y.mutable_data_ptr<scalar_t>(), bn.channel_vectors<Acc>(), v.N, v.C, v.S, act};
        Launcher::template launch<A>(apply, A::num_threads(apply));
      });
    });
    return bn.stats;
  }

  // Turns y into g_y (the gradient at the convolution output) in place; returns the gradients
  // of gamma and beta in Acc.
  static std::tuple<at::Tensor, at::Tensor> backward(at::Tensor& y, const at::Tensor& grad_out,
                                                     const at::Tensor& gamma,
                                                     const at::Tensor& beta, const at::Tensor& mean,
                                                     const at::Tensor& var, bool training,
                                                     double eps, int32_t act) {
    const BnView v = bn_view(y);
    BnVectors bn(v.C, y, false, mean, var);
    bn_reduce<Launcher>(bn, at::empty({0, 3, v.C}, bn.mean.options()), gamma, beta, eps);
    const auto acc_options = bn.mean.options();
    at::Tensor grad_gamma = at::empty({v.C}, acc_options);
    at::Tensor grad_beta = at::empty({v.C}, acc_options);
    at::Tensor coef = at::empty({3, v.C}, acc_options);
    const int64_t positions = v.N * v.S;
    const int64_t chunk = bn_chunk_positions(positions);
    const int64_t chunks = (positions + chunk - 1) / chunk;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_bwd", [&] {
      using Acc = at::opmath_type<scalar_t>;
      at::Tensor partial = at::empty({chunks, 2, v.C}, acc_options);
      with_layout(v.channels_last, [&](auto cl) {
        constexpr bool CL = decltype(cl)::value;
        typename BnGradSumsProgram<scalar_t, Acc, CL>::Args args{
            y.mutable_data_ptr<scalar_t>(),
            grad_out.const_data_ptr<scalar_t>(),
            bn.channel_vectors<Acc>(),
            partial.mutable_data_ptr<Acc>(),
            coef.const_data_ptr<Acc>(),
            v.N,
            v.C,
            v.S,
            chunk,
            chunks,
            act,
            training};
        using Sums = BnGradSumsProgram<scalar_t, Acc, CL>;
        Launcher::template launch<Sums>(args, Sums::num_threads(args));
        using G = BnGradReduceProgram<Acc>;
        typename G::Args reduce{partial.const_data_ptr<Acc>(),
                                bn_ptr_or_null<Acc>(gamma),
                                bn.var.const_data_ptr<Acc>(),
                                grad_gamma.mutable_data_ptr<Acc>(),
                                grad_beta.mutable_data_ptr<Acc>(),
                                coef.mutable_data_ptr<Acc>(),
                                static_cast<Acc>(eps),
                                static_cast<Acc>(positions),
                                chunks,
                                v.C,
                                training};
        Launcher::template launch<G>(reduce, G::num_threads(reduce));
        using Apply = BnGradApplyProgram<scalar_t, Acc, CL>;
        Launcher::template launch<Apply>(args, Apply::num_threads(args));
      });
    });
    return {grad_gamma, grad_beta};
  }

 private:
  template <typename Fn>
  static void with_layout(bool channels_last, Fn&& fn) {
    if (channels_last)
      fn(std::true_type{});
    else
      fn(std::false_type{});
  }
};

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

  // y = conv(input) (+ bias per output channel: the GEMM's own epilogue adds it).
  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& bias = at::Tensor()) const {
    const at::Tensor w = weight.reshape({weight.size(0), weight.size(1)});
    const at::Tensor x = input.contiguous(input.suggest_memory_format());
    at::Tensor y = output_like(x, w.size(0));
    at::Tensor y_view = channels_last(x) ? rows(y) : planes(y);  // writes through to y
    if (channels_last(x)) {
      if (bias.defined())
        at::addmm_out(y_view, bias, rows(x), w.t());
      else
        at::mm_out(y_view, rows(x), w.t());
    } else {
      if (bias.defined())
        at::baddbmm_out(y_view, bias.view({1, -1, 1}).expand(y_view.sizes()),
                        w.expand({x.size(0), -1, -1}), planes(x));
      else
        at::matmul_out(y_view, w, planes(x));
    }
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

  at::Tensor forward(const at::Tensor& input, const at::Tensor& weight,
                     const at::Tensor& bias = at::Tensor()) const {
    const std::optional<at::Tensor> b =
        bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
    return depthwise_conv2d_fwd<Compute>(input, weight, b, stride, padding, dilation);
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
    BnVectors bn(g.C, input, training, running_mean, running_var);
    at::Tensor partial = at::empty({training ? chunks.chunks : 0, 3, g.C}, bn.mean.options());
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
      bn_reduce<Launcher>(bn, partial, gamma, beta, eps);
      with_spatial_program<DwForwardProgram, scalar_t>(plan, [&](auto program) {
        using P = decltype(program);
        typename P::Args args{x.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(),
                              nullptr,
                              out.mutable_data_ptr<scalar_t>(),
                              g,
                              bn.scale.const_data_ptr<Acc>(),
                              bn.shift.const_data_ptr<Acc>(),
                              act};
        Launcher::template launch<P>(args, P::num_threads(g));
      });
    });
    return {out, bn.stats};
  }
};

// The conv's forward with BN and the activation: (out, [2, C] statistics it normalised with).
template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor> bn_act_conv_forward(const Conv& conv, const at::Tensor& input,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& gamma,
                                                       const at::Tensor& beta, const at::Tensor& rm,
                                                       const at::Tensor& rv, bool training,
                                                       double eps, int32_t act) {
  if constexpr (Conv::kFusesBn) {
    return conv.forward_bn_act(input, weight, gamma, beta, rm, rv, training, eps, act);
  } else if (!training &&
             (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble)) {
    // Eval: BN folded into the convolution (weight * scale, bias = shift), then the activation
    // in place: one pass of the convolution and one of the activation (ATen's vectorised
    // kernels), none of BN.
    const int64_t C = weight.size(0);
    BnVectors bn(C, input, false, rm, rv);
    bn_reduce<Launcher>(bn, at::empty({0, 3, C}, bn.mean.options()), gamma, beta, eps);
    const at::Tensor scale = bn.scale.to(input.scalar_type());
    at::Tensor y =
        conv.forward(input, weight * scale.view({-1, 1, 1, 1}), bn.shift.to(input.scalar_type()));
    TORCH_CHECK(y.numel() > 0, "depsep: the fused ops need a non-empty input");
    if (act == kActRelu)
      y.relu_();
    else if (act == kActRelu6)
      y.clamp_(0, 6);
    else if (act == kActSilu)
      at::silu_(y);
    else if (act == kActHardswish)
      at::hardswish_(y);
    return {y, bn.stats};
  } else {
    at::Tensor y = conv.forward(input, weight);
    TORCH_CHECK(y.numel() > 0, "depsep: the fused ops need a non-empty input");
    at::Tensor stats = BnActPasses<Launcher>::forward(y, gamma, beta, rm, rv, training, eps, act);
    return {y, stats};
  }
}

template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor> bn_act_fwd(
    const Conv& conv, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, c10::string_view activation) {
  const int32_t act = bn_parse_activation(activation);
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "depsep: input and weight must be 4-D");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(),
              "depsep: weight must match the input's dtype and device");
  const typename Launcher::DeviceGuard guard(input.device());
  // BN normalises the convolution's output channels: weight is [C_out, C_in, 1, 1] or [C, 1, kH,
  // kW], so its first dimension is their count for both convolutions.
  const int64_t C = weight.size(0);
  const at::Tensor rm = bn_channel_vector(running_mean, "running_mean", C, input);
  const at::Tensor rv = bn_channel_vector(running_var, "running_var", C, input);
  TORCH_CHECK(training || (rm.defined() && rv.defined()),
              "depsep: running_mean and running_var are required when training=False");
  TORCH_CHECK(rm.defined() == rv.defined(),
              "depsep: running_mean and running_var must be both given or both None");
  const at::Tensor gamma = bn_channel_vector(bn_weight, "bn_weight", C, input);
  const at::Tensor beta = bn_channel_vector(bn_bias, "bn_bias", C, input);
  auto [out, stats] =
      bn_act_conv_forward<Launcher>(conv, input, weight, gamma, beta, rm, rv, training, eps, act);
  if (training)
    bn_update_running_stats<Launcher>(stats, running_mean, running_var, num_batches_tracked,
                                      momentum, out.numel() / C);
  return {out, stats};
}

template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd(
    const Conv& conv, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& stats, bool training, double eps,
    c10::string_view activation, const c10::List<bool>& output_mask) {
  const int32_t act = bn_parse_activation(activation);
  TORCH_CHECK(output_mask.size() == 4, "depsep: output_mask must have 4 values");
  const typename Launcher::DeviceGuard guard(input.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == weight.size(0),
              "depsep: stats must be [2, ", weight.size(0), "], got ", stats.sizes());
  at::Tensor y = conv.forward(input, weight);
  const int64_t C = y.size(1);
  TORCH_CHECK(grad_output.sizes() == y.sizes() && grad_output.scalar_type() == y.scalar_type(),
              "depsep: grad_output must be ", y.sizes(), " in ", y.scalar_type(), ", got ",
              grad_output.sizes(), " in ", grad_output.scalar_type());
  const at::Tensor gamma = bn_channel_vector(bn_weight, "bn_weight", C, input);
  auto [grad_gamma, grad_beta] = BnActPasses<Launcher>::backward(
      y, grad_output.contiguous(y.suggest_memory_format()), gamma,
      bn_channel_vector(bn_bias, "bn_bias", C, input),
      bn_channel_vector(stats[0], "mean", C, input), bn_channel_vector(stats[1], "var", C, input),
      training, eps, act);
  at::Tensor grad_input, grad_weight;
  conv.backward(y, input, weight, output_mask[0], output_mask[1], grad_input, grad_weight);
  const auto empty = [&](at::ScalarType t) { return at::empty({0}, input.options().dtype(t)); };
  const at::ScalarType bn_type = bn_weight.has_value() && bn_weight->defined()
                                     ? bn_weight->scalar_type()
                                     : input.scalar_type();
  const at::ScalarType bias_type =
      bn_bias.has_value() && bn_bias->defined() ? bn_bias->scalar_type() : input.scalar_type();
  return {output_mask[0] ? grad_input : empty(input.scalar_type()),
          output_mask[1] ? grad_weight : empty(input.scalar_type()),
          output_mask[2] ? grad_gamma.to(bn_type) : empty(bn_type),
          output_mask[3] ? grad_beta.to(bias_type) : empty(bias_type)};
}

// The registered ops: the schemas' argument order (kernels/_ops.py), one conv policy each.
template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor> pointwise_bn_act_fwd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, c10::string_view activation) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == input.size(1) && weight.size(2) == 1 &&
                  weight.size(3) == 1,
              "depsep: weight must be [C_out, ", input.size(1), ", 1, 1], got ", weight.sizes());
  return bn_act_fwd<Launcher>(Conv{}, input, weight, bn_weight, bn_bias, running_mean, running_var,
                              num_batches_tracked, training, momentum, eps, activation);
}

template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_bn_act_bwd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& stats, bool training, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  return bn_act_bwd<Launcher>(Conv{}, grad_output, input, weight, bn_weight, bn_bias, stats,
                              training, eps, activation, output_mask);
}

template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor> depthwise_bn_act_fwd(
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, bool training,
    std::optional<double> momentum, double eps, c10::string_view activation) {
  return bn_act_fwd<Launcher>(Conv(stride, padding, dilation), input, weight, bn_weight, bn_bias,
                              running_mean, running_var, num_batches_tracked, training, momentum,
                              eps, activation);
}

template <typename Launcher, typename Conv>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_bn_act_bwd(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const at::Tensor& stats, bool training, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  return bn_act_bwd<Launcher>(Conv(stride, padding, dilation), grad_output, input, weight,
                              bn_weight, bn_bias, stats, training, eps, activation, output_mask);
}

}  // namespace depsep
