"""The fused convolution + BatchNorm + ReLU ops on MobileNet V1's layers: depthwise_bn_act on the
13 depthwise 3x3 layers, pointwise_bn_act on the 13 pointwise 1x1 layers.

Modes (x, w: the convolution's input and weight, in the case's dtype and layout; the BatchNorm
weight, bias and running statistics in float32, as mixed-precision training keeps them):
  eval              training=False forward: output only
  forward           training=True forward of inputs that need gradients, as in a training
                    step: output and the in-place running-statistics update
  backward          the gradients of x, w, BN weight and bias through one retained graph: the
                    backward kernels alone
  forward+backward  training=True forward, then the gradients of all four, per call

Minimum bytes, each tensor read or written once (c: the bytes of one per-channel vector; y and
dy: output and its gradient; conv_bn_act_min_bytes):
  eval              x + w + 4c (BN weight, bias, running mean, var) + y
  forward           x + w + 4c + y + 2c (running statistics written back)
  backward          dy + x + w + 4c (BN weight, bias, saved batch mean, var) + dx + dw + 2c
  forward+backward  x + w + 4c + dy  read, y + 2c + dx + dw + 2c  written
No real kernel reaches the training bounds: the batch statistics need the whole convolution
output before any of it can be normalised, so x is read at least twice (or the conv output
stored); the "% copy" of the training modes is the distance from that ideal.

Baselines: "torch", the reference functions of kernels/reference.py called directly (eager
F.conv2d + F.batch_norm + ReLU, without the depsep dispatch), and torch.compile of them.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kernels
from bench.harness import (
    COMPILE_BASELINES,
    COMPILE_MODES,
    REFERENCE,
    Case,
    Op,
    Outputs,
    Runner,
    compile_reference,
    conv_kernel_picked,
    layout_format,
)
from bench.shapes import (
    MOBILENET_V1_DEPTHWISE,
    MOBILENET_V1_POINTWISE,
    DepthwiseLayer,
    PointwiseLayer,
    quick_subset,
    subset,
)
from kernels import reference
from kernels._common import stats_dtype

MODES = ("eval", "forward", "backward", "forward+backward")
MOMENTUM, EPS, ACTIVATION = 0.1, 1e-5, "relu"


def conv_bn_act_min_bytes(mode: str, x: int, y: int, w: int, c: int) -> int:
    """The minimum bytes of a conv + BN + activation computation in `mode` (module docstring),
    from the bytes of its input x, output y, conv weights w and one per-channel vector c."""
    return {
        "eval": x + w + 4 * c + y,
        "forward": x + w + 4 * c + y + 2 * c,
        "backward": y + x + w + 4 * c + x + w + 2 * c,
        "forward+backward": 2 * x + 2 * y + 2 * w + 8 * c,
    }[mode]


def bn_dtype(dtype: torch.dtype) -> torch.dtype:
    """BatchNorm's parameters and statistics: float32, or float64 for float64 runs."""
    return stats_dtype(dtype)


@dataclass(frozen=True)
class Geometry:
    """What one fused op needs to know of a layer."""

    in_channels: int
    out_channels: int
    size: int
    out_size: int
    weight_shape: tuple[int, ...]
    stride: int
    padding: int
    groups: int


def _depthwise_geometry(layer: DepthwiseLayer) -> Geometry:
    c, k = layer.channels, layer.kernel_size
    return Geometry(c, c, layer.size, layer.out_size, (c, 1, k, k), layer.stride, layer.padding, c)


def _pointwise_geometry(layer: PointwiseLayer) -> Geometry:
    cin, cout = layer.in_channels, layer.out_channels
    return Geometry(cin, cout, layer.size, layer.size, (cout, cin, 1, 1), 1, 0, 1)


@dataclass(frozen=True)
class BnActInputs:
    input: torch.Tensor
    weight: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    grad_output: torch.Tensor | None  # the modes with a backward only


def _make_case(op_name: str, geometry_of: Callable, layer, batch, dtype, layout, mode) -> Case:
    g = geometry_of(layer)
    size = dtype.itemsize
    min_bytes = conv_bn_act_min_bytes(
        mode,
        x=batch * g.in_channels * g.size**2 * size,
        y=batch * g.out_channels * g.out_size**2 * size,
        w=math.prod(g.weight_shape) * size,
        c=g.out_channels * bn_dtype(dtype).itemsize,
    )
    shape = f"{batch}x{g.in_channels}x{g.size}x{g.size}"
    shape += f" s{g.stride}" if g.groups > 1 else f" -> {g.out_channels}"
    return Case(op_name, mode, layer, batch, dtype, layout, shape, min_bytes)


def _make_inputs(geometry_of: Callable, case: Case, device: torch.device) -> BnActInputs:
    g, memory_format = geometry_of(case.layer), layout_format(case.layout)
    # Drawn in float32 whatever the dtype, so that every dtype sees the same values.
    generator = torch.Generator(device).manual_seed(0)

    def randn(*size, dtype=case.dtype):
        tensor = torch.randn(size, generator=generator, device=device).to(dtype)
        return tensor.contiguous(memory_format=memory_format) if len(size) == 4 else tensor

    # Kaiming-like weights keep the conv output near unit scale, as in a trained network.
    fan_in = math.prod(g.weight_shape[1:])
    stats_dtype = bn_dtype(case.dtype)
    grad_output = None
    if case.mode != "eval":
        grad_output = randn(case.batch, g.out_channels, g.out_size, g.out_size)
    return BnActInputs(
        input=randn(case.batch, g.in_channels, g.size, g.size),
        weight=randn(*g.weight_shape) * (2 / fan_in) ** 0.5,
        running_mean=0.1 * randn(g.out_channels, dtype=stats_dtype),
        running_var=1 + 0.2 * randn(g.out_channels, dtype=stats_dtype).abs(),
        bn_weight=1 + 0.1 * randn(g.out_channels, dtype=stats_dtype),
        bn_bias=0.1 * randn(g.out_channels, dtype=stats_dtype),
        grad_output=grad_output,
    )


def _reference_conv(g: Geometry, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if g.groups > 1:
        return reference.depthwise_conv(x, w, None, g.stride, g.padding, 1)
    return reference.pointwise_conv(x, w)


def _reference(g: Geometry, x, w, running_mean, running_var, bn_weight, bn_bias, training):
    y = _reference_conv(g, x, w)
    return reference.bn_act(
        y, running_mean, running_var, bn_weight, bn_bias, None, training, MOMENTUM, EPS, ACTIVATION
    )


def _fused(op_name: str, g: Geometry, backend: str, *args, training: bool):
    geometry = {"stride": g.stride, "padding": g.padding} if g.groups > 1 else {}
    return getattr(kernels, op_name)(
        *args,
        **geometry,
        training=training,
        momentum=MOMENTUM,
        eps=EPS,
        activation=ACTIVATION,
        backend=backend,
    )


def _make_runner(
    op_name: str, geometry_of: Callable, case: Case, inputs: BnActInputs, backend: str
) -> Runner:
    g = geometry_of(case.layer)
    if backend == REFERENCE:
        op = functools.partial(_reference, g)
    elif backend in COMPILE_MODES:
        op = compile_reference(functools.partial(_reference, g), backend)
    else:

        def op(*args):
            return _fused(op_name, g, backend, *args[:-1], training=args[-1])

    # Each backend starts from the same running statistics: training updates them in place.
    running = (inputs.running_mean.clone(), inputs.running_var.clone())
    if case.mode == "eval":

        def evaluate() -> Outputs:
            x, w, bn = inputs.input, inputs.weight, (inputs.bn_weight, inputs.bn_bias)
            return {"output": op(x, w, *running, *bn, False)}

        return evaluate

    leaves = tuple(
        t.detach().requires_grad_()
        for t in (inputs.input, inputs.weight, inputs.bn_weight, inputs.bn_bias)
    )
    x, w, bn_weight, bn_bias = leaves

    def statistics() -> Outputs:
        return {"running_mean": running[0], "running_var": running[1]}

    def gradients(output: torch.Tensor) -> Outputs:
        grads = torch.autograd.grad(
            output, leaves, inputs.grad_output, retain_graph=case.mode == "backward"
        )
        names = ("grad_input", "grad_weight", "grad_bn_weight", "grad_bn_bias")
        return dict(zip(names, grads))

    if case.mode == "forward":

        def forward() -> Outputs:
            return {"output": op(x, w, *running, bn_weight, bn_bias, True), **statistics()}

        return forward
    if case.mode == "forward+backward":

        def forward_backward() -> Outputs:
            output = op(x, w, *running, bn_weight, bn_bias, True)
            return {"output": output.detach(), **gradients(output), **statistics()}

        return forward_backward

    output = op(x, w, *running, bn_weight, bn_bias, True)

    def backward() -> Outputs:
        return gradients(output)

    return backward


def _describe_kernel(geometry_of: Callable, case: Case, inputs: BnActInputs, backend: str) -> str:
    if backend != REFERENCE:
        return ""
    g = geometry_of(case.layer)
    return conv_kernel_picked(inputs.input, inputs.weight, g.stride, g.padding, g.groups)


def _make_op(name: str, layers: tuple, geometry_of: Callable) -> Op:
    return Op(
        name=name,
        modes=MODES,
        layers=layers,
        subset_layers=subset(layers),
        quick_layers=quick_subset(layers),
        make_case=functools.partial(_make_case, name, geometry_of),
        make_inputs=functools.partial(_make_inputs, geometry_of),
        make_runner=functools.partial(_make_runner, name, geometry_of),
        baselines=COMPILE_BASELINES,
        describe_kernel=functools.partial(_describe_kernel, geometry_of),
    )


DEPTHWISE_OP = _make_op("depthwise_bn_act", MOBILENET_V1_DEPTHWISE, _depthwise_geometry)
POINTWISE_OP = _make_op("pointwise_bn_act", MOBILENET_V1_POINTWISE, _pointwise_geometry)
