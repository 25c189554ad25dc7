"""The public functional ops: validate, apply autocast, choose a backend, call its op."""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validate, reference
from ._backend import select_backend


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts like F.conv2d under torch.autocast, before validation sees the dtypes: floating
    tensors to the autocast dtype of the first tensor's device type."""
    first = tensors[0]
    device_type = first.device.type if isinstance(first, Tensor) else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors
    )


def depthwise_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    backend: str | None = None,
) -> Tensor:
    """Depthwise 2-D convolution: F.conv2d(input, weight, bias, stride, padding, dilation,
    groups=C) with weight [C, 1, kH, kW].

    input is [N, C, H, W] in NCHW or channels_last; the output keeps the input's memory format.
    stride, padding and dilation are ints or pairs; padding may also be "same" or "valid".
    Differentiable in input, weight and bias. `backend` is "torch", "native", "triton" or None
    (auto: $DEPSEP_BACKEND, else the fastest available for the device).
    """
    op = "depthwise_conv2d"
    input, weight, bias = _autocast(input, weight, bias)
    geometry = _validate.depthwise_args(op, input, weight, bias, stride, padding, dilation)
    chosen = select_backend(backend, input.device)
    if chosen == "torch":
        return reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation)
    fwd = (
        torch.ops.depsep.depthwise_conv2d_fwd
        if chosen == "native"
        else torch.ops.depsep.triton_depthwise_conv2d_fwd
    )
    return fwd(
        input, weight, bias, list(geometry.stride), list(geometry.padding), list(geometry.dilation)
    )


def _momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None, training: bool):
    """The running-average factor of this step, as nn.BatchNorm2d derives it: counts the batch in
    num_batches_tracked when training, and momentum=None means a cumulative average."""
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else float(momentum)


def _update_running_stats(running_mean, running_var, mean, var, factor: float, count: int):
    """running = (1 - factor) * running + factor * batch, with the unbiased batch variance."""
    with torch.no_grad():
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        unbiased = var * (count / (count - 1))
        running_var.lerp_(unbiased.to(running_var.dtype), factor)


def _fused(
    conv: str,
    op: str,
    input: Tensor,
    weight: Tensor,
    geometry: tuple,
    bn: tuple,
    training: bool,
    momentum,
    eps: float,
    activation,
    backend,
    num_batches_tracked,
    reference_conv,
) -> Tensor:
    """The shared body of pointwise_bn_act and depthwise_bn_act, past their conv checks."""
    running_mean, running_var, bn_weight, bn_bias = bn
    act = _validate.bn_act_args(
        op, input, weight.shape[0], *bn, training, momentum, eps, activation, num_batches_tracked
    )
    chosen = select_backend(backend, input.device, fused_eval=not training)
    factor = _momentum_factor(momentum, num_batches_tracked, training)
    if chosen == "torch" or input.numel() == 0:
        # The reference; also for empty input, where F.batch_norm defines what happens.
        y = reference_conv(input, weight)
        _validate.batch_values_per_channel(op, y.shape, training)
        return reference.conv_bn_act(y, *bn, training, factor, eps, act)
    fwd = getattr(torch.ops.depsep, f"{'' if chosen == 'native' else 'triton_'}{conv}_bn_act_fwd")
    out, mean, var = fwd(
        input,
        weight,
        *geometry,
        bn_weight,
        bn_bias,
        None if training else running_mean,
        None if training else running_var,
        training,
        float(eps),
        act,
    )
    count = _validate.batch_values_per_channel(op, out.shape, training)
    if training and running_mean is not None:
        _update_running_stats(running_mean, running_var, mean, var, factor, count)
    return out


def pointwise_bn_act(
    input: Tensor,
    weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    backend: str | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Fused 1x1 convolution + BatchNorm + activation: the same as
    act(F.batch_norm(F.conv2d(input, weight), running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps)), with weight [C_out, C_in, 1, 1] and activation "relu", "relu6"
    or None.

    When training, the running statistics (if given) are updated in place with the unbiased
    batch variance. `num_batches_tracked` (optional, like nn.BatchNorm2d's buffer) is counted up
    when training; momentum=None then means a cumulative average over the counted batches.
    Differentiable in input, weight, bn_weight and bn_bias. The output keeps the input's memory
    format.
    """
    op = "pointwise_bn_act"
    input, weight = _autocast(input, weight)
    _validate.pointwise_weight(op, input, weight)
    bn = (running_mean, running_var, bn_weight, bn_bias)
    return _fused(
        "pointwise",
        op,
        input,
        weight,
        (),
        bn,
        training,
        momentum,
        eps,
        activation,
        backend,
        num_batches_tracked,
        lambda x, w: F.conv2d(x, w),
    )


def depthwise_bn_act(
    input: Tensor,
    weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str | None = "relu",
    backend: str | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Fused depthwise convolution + BatchNorm + activation: the same as
    act(F.batch_norm(depthwise_conv2d(input, weight, None, stride, padding, dilation), ...)),
    with weight [C, 1, kH, kW]; the BatchNorm arguments as in pointwise_bn_act."""
    op = "depthwise_bn_act"
    input, weight = _autocast(input, weight)
    g = _validate.depthwise_args(op, input, weight, None, stride, padding, dilation)
    bn = (running_mean, running_var, bn_weight, bn_bias)
    geometry = (list(g.stride), list(g.padding), list(g.dilation))
    return _fused(
        "depthwise",
        op,
        input,
        weight,
        geometry,
        bn,
        training,
        momentum,
        eps,
        activation,
        backend,
        num_batches_tracked,
        lambda x, w: reference.depthwise_conv2d(x, w, None, stride, padding, dilation),
    )
