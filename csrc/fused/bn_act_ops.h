// Host side of the native fused convolution + BatchNorm + activation ops, shared by the CPU and
// CUDA registrations and by every convolution policy (conv_policies.h): argument checks, the
// forward (the policy's convolution, then the BN passes of bn_passes.h, or the policy's own
// fused BN), the running-statistics step, and the backward.
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

#include "fused/bn_passes.h"
#include "fused/conv_policies.h"

namespace depsep {

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
