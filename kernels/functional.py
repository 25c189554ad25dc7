"""The public functional ops: validate, apply autocast, choose a backend, call its op."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _ops, _validate, reference
from ._backend import select_backend


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts like F.conv2d under torch.autocast, before validation sees the dtypes: floating
    tensors to the autocast dtype of the first tensor's device type."""
    if not torch._C._is_any_autocast_enabled():
        return tensors
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
    input, weight, bias = _autocast(input, weight, bias)
    g = _validate.depthwise_args("depthwise_conv2d", input, weight, bias, stride, padding, dilation)
    chosen = select_backend(backend, input.device)
    if chosen == "torch":
        return reference.depthwise_conv(input, weight, bias, stride, padding, dilation)
    return _ops.DepthwiseConv2d.apply(
        _ops.OPS[chosen], input, weight, bias, g.stride, g.padding, g.dilation
    )


def _fused_call(ops, depthwise: bool, geometry: tuple, training, momentum, eps, act: str):
    """The BnActCall of a checked fused op: the depthwise or the 1x1 pair of `ops`."""
    if depthwise:
        fwd, bwd = ops.depthwise_bn_act_fwd, ops.depthwise_bn_act_bwd
    else:
        fwd, bwd = ops.pointwise_bn_act_fwd, ops.pointwise_bn_act_bwd
    return _ops.BnActCall(fwd, bwd, geometry, training, momentum, float(eps), act)


def _bn_act(
    op: str,
    input: Tensor,
    weight: Tensor,
    geometry: tuple,
    input_shape: tuple,
    output_hw: tuple,
    bn: tuple,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum,
    eps: float,
    activation,
    backend,
    reference_conv,
) -> Tensor:
    """The shared body of pointwise_bn_act and depthwise_bn_act, past their conv checks (which
    gave the input's shape and the convolution's output height and width); bn is
    (running_mean, running_var, bn_weight, bn_bias)."""
    running_mean, running_var, bn_weight, bn_bias = bn
    act = _validate.bn_act_args(
        op, input, weight.shape[0], *bn, training, momentum, eps, activation, num_batches_tracked
    )
    values = input_shape[0] * output_hw[0] * output_hw[1]
    _validate.batch_values_per_channel(op, values, input_shape, training)
    chosen = select_backend(backend, input.device, fused_eval=not training)
    if chosen == "torch" or 0 in input_shape:
        # The reference; also for empty input, where F.batch_norm defines what happens.
        return reference.bn_act(
            reference_conv(input, weight),
            running_mean,
            running_var,
            bn_weight,
            bn_bias,
            num_batches_tracked,
            training,
            momentum,
            eps,
            act,
        )
    call = _fused_call(_ops.OPS[chosen], bool(geometry), geometry, training, momentum, eps, act)
    tensors = (input, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked)
    if not torch.is_grad_enabled():  # nothing to record: the op alone, without a Function
        return _ops.bn_act_forward(call, *tensors)[0]
    return _ops.BnAct.apply(call, *tensors)


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
    training, momentum, eps)), with weight [C_out, C_in, 1, 1] and activation "relu", "relu6",
    "silu", "hardswish" or None.

    When training, the running statistics (if given) are updated in place with the unbiased
    batch variance. `num_batches_tracked` (optional, like nn.BatchNorm2d's buffer) is counted up
    when training; momentum=None then means a cumulative average over the counted batches.
    Differentiable in input, weight, bn_weight and bn_bias. The output keeps the input's memory
    format.
    """
    op = "pointwise_bn_act"
    input, weight = _autocast(input, weight)
    shape = _validate.pointwise_weight(op, input, weight)
    return _bn_act(
        op,
        input,
        weight,
        (),
        shape,
        shape[2:],
        (running_mean, running_var, bn_weight, bn_bias),
        num_batches_tracked,
        training,
        momentum,
        eps,
        activation,
        backend,
        reference.pointwise_conv,
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
    shape = tuple(input.shape)
    return _bn_act(
        op,
        input,
        weight,
        (g.stride, g.padding, g.dilation),
        shape,
        g.output_hw(shape[2], shape[3]),
        (running_mean, running_var, bn_weight, bn_bias),
        num_batches_tracked,
        training,
        momentum,
        eps,
        activation,
        backend,
        lambda x, w: reference.depthwise_conv(x, w, None, stride, padding, dilation),
    )


@dataclass
class BnActStage:
    """One conv + BatchNorm + activation stage of bn_act_chain: the arguments of
    pointwise_bn_act (depthwise=False: weight [C_out, C_in, 1, 1]) or of depthwise_bn_act
    (depthwise=True: weight [C, 1, kH, kW], with stride, padding and dilation)."""

    weight: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    bn_weight: Tensor | None
    bn_bias: Tensor | None
    training: bool
    depthwise: bool = False
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    momentum: float | None = 0.1
    eps: float = 1e-5
    activation: str | None = "relu"
    num_batches_tracked: Tensor | None = None


RECOMPUTE = ("depthwise", "all")


def bn_act_chain(
    input: Tensor,
    stages: Sequence[BnActStage],
    *,
    recompute: str = "depthwise",
    backend: str | None = None,
    recompute_input: Callable[[], Tensor] | None = None,
) -> Tensor:
    """The stages applied one after another (each as pointwise_bn_act or depthwise_bn_act would
    compute it, running statistics included), as one autograd unit that keeps less for
    backward: the chain input, the weights, each stage's per-channel statistics and, with
    recompute="depthwise" (the default), the outputs of its 1x1 stages that a later stage
    reads; the depthwise stages' outputs (about 3% of a MobileNet's FLOPs) are recomputed in
    backward. recompute="all" keeps only the chain input and recomputes every stage's output.

    recompute_input, when given, is a callable that returns `input` again, bit for bit and
    without autograd (the output of a run that itself keeps only its own input, say): the chain
    then keeps no reference to its input and calls it in backward instead."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"bn_act_chain: recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if recompute_input is not None and not callable(recompute_input):
        raise TypeError(
            "bn_act_chain: recompute_input must be a callable or None, "
            f"got {type(recompute_input).__name__}"
        )
    if len(stages) == 0:
        raise ValueError("bn_act_chain: stages must not be empty")
    casting = torch._C._is_any_autocast_enabled()
    if casting:
        given = input
        (input,) = _autocast(input)
        if input is not given:  # the cast is what the chain reads: keep it
            recompute_input = None
    plan, tensors, like = [], [], input
    dtype, device = input.dtype, input.device
    for index, stage in enumerate(stages):
        op = f"bn_act_chain stage {index}"
        weight = _autocast(input, stage.weight)[1] if casting else stage.weight
        bn = (stage.running_mean, stage.running_var, stage.bn_weight, stage.bn_bias)
        shape = tuple(like.shape)
        if stage.depthwise:
            g = _validate.depthwise_args(
                op, like, weight, None, stage.stride, stage.padding, stage.dilation
            )
            geometry, out_hw = (g.stride, g.padding, g.dilation), g.output_hw(*shape[2:])
        else:
            _validate.pointwise_weight(op, like, weight)
            geometry, out_hw = (), shape[2:]
        out_channels = weight.shape[0]
        act = _validate.bn_act_args(
            op,
            like,
            out_channels,
            *bn,
            stage.training,
            stage.momentum,
            stage.eps,
            stage.activation,
            stage.num_batches_tracked,
        )
        _validate.batch_values_per_channel(
            op, shape[0] * out_hw[0] * out_hw[1], shape, stage.training
        )
        plan.append((stage.depthwise, geometry, act))
        tensors += [weight, stage.bn_weight, stage.bn_bias, *bn[:2], stage.num_batches_tracked]
        # The next stage is checked against this one's output, without computing it.
        like = _validate.TensorSpec((shape[0], out_channels, *out_hw), dtype, device)
    training = any(stage.training for stage in stages)
    chosen = select_backend(backend, input.device, fused_eval=not training)
    if chosen == "torch" or input.numel() == 0:
        x = input
        for stage in stages:
            fn = depthwise_bn_act if stage.depthwise else pointwise_bn_act
            geometry = (
                dict(stride=stage.stride, padding=stage.padding, dilation=stage.dilation)
                if stage.depthwise
                else {}
            )
            x = fn(
                x,
                stage.weight,
                stage.running_mean,
                stage.running_var,
                stage.bn_weight,
                stage.bn_bias,
                training=stage.training,
                momentum=stage.momentum,
                eps=stage.eps,
                activation=stage.activation,
                backend="torch",
                num_batches_tracked=stage.num_batches_tracked,
                **geometry,
            )
        return x
    ops = _ops.OPS[chosen]
    if not torch.is_grad_enabled():
        return _bn_act_chain_no_grad(ops, input, tensors, stages, plan, training)
    chain = tuple(
        _ops.ChainStage(
            _stage_call(ops, stage, *planned),
            # A stage's input is kept when the previous stage is a 1x1 one (default) or never.
            index > 0 and recompute == "depthwise" and not plan[index - 1][0],
        )
        for index, (stage, planned) in enumerate(zip(stages, plan))
    )
    return _ops.BnActChain.apply(chain, recompute_input, input, *tensors)


def _stage_call(ops, stage: BnActStage, depthwise: bool, geometry: tuple, act: str):
    """The BnActCall of a checked chain stage."""
    return _fused_call(ops, depthwise, geometry, stage.training, stage.momentum, stage.eps, act)


def _bn_act_chain_no_grad(ops, input, tensors, stages, plan, training) -> Tensor:
    """bn_act_chain with nothing to record: a depthwise then a 1x1 stage in eval as the
    backend's one-pass block op where it has one for this device, else the ops one after
    another."""
    per_stage = len(_ops.CHAIN_STAGE_TENSORS)
    block = ops.depthwise_pointwise_eval
    if (
        block is not None
        and not training
        and len(plan) == 2
        and plan[0][0]
        and not plan[1][0]
        and _ops.has_kernel(block, input.device)
    ):
        dw_w, dw_bn_w, dw_bn_b, dw_rm, dw_rv, _ = tensors[:per_stage]
        pw_w, pw_bn_w, pw_bn_b, pw_rm, pw_rv, _ = tensors[per_stage:]
        return block(
            input,
            dw_w,
            *plan[0][1],
            dw_bn_w,
            dw_bn_b,
            dw_rm,
            dw_rv,
            float(stages[0].eps),
            plan[0][2],
            pw_w,
            pw_bn_w,
            pw_bn_b,
            pw_rm,
            pw_rv,
            float(stages[1].eps),
            plan[1][2],
        )
    x = input
    for index, (stage, planned) in enumerate(zip(stages, plan)):
        stage_tensors = tensors[index * per_stage : (index + 1) * per_stage]
        x, _ = _ops.bn_act_forward(_stage_call(ops, stage, *planned), x, *stage_tensors)
    return x
