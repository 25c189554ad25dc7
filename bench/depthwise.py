"""Depthwise 3x3 convolution on the 13 depthwise layers of MobileNet V1.

Modes and their minimum bytes (x input, w weight, y output; each read or written once):
  forward           y = depthwise_conv2d(x, w):            x + w + y
  backward          grads of x and w through one retained graph, the backward kernels alone:
                    read dy, x, w; write dx, dw:           dy + 2x + 2w
  forward+backward  both, a fresh graph per call:          x + w + y + dy + x + w

"torch" is kernels/reference.py called directly (F.conv2d with groups=C, as a model runs it,
without the depsep dispatch); the tables note which kernel PyTorch picked for it.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

import kernels
from bench.harness import (
    REFERENCE,
    Case,
    Op,
    Outputs,
    Runner,
    conv_kernel_picked,
    layout_format,
)
from bench.shapes import MOBILENET_V1_DEPTHWISE, DepthwiseLayer, quick_subset, subset
from kernels import reference

# PyTorch's own CUDA depthwise kernel (aten._conv_depthwise2d and its backward): what F.conv2d
# runs for NCHW float32/bfloat16 when it does not pick cuDNN.
ATEN_DEPTHWISE = "aten_depthwise"


@dataclass(frozen=True)
class DepthwiseInputs:
    input: torch.Tensor
    weight: torch.Tensor
    grad_output: torch.Tensor | None  # the modes with a backward only


def make_case(
    layer: DepthwiseLayer, batch: int, dtype: torch.dtype, layout: str, mode: str
) -> Case:
    k = layer.kernel_size
    x = batch * layer.channels * layer.size**2
    y = batch * layer.channels * layer.out_size**2
    w = layer.channels * k * k
    numel = {
        "forward": x + w + y,
        "backward": y + 2 * x + 2 * w,
        "forward+backward": x + w + y + y + x + w,
    }[mode]
    shape = f"{batch}x{layer.channels}x{layer.size}x{layer.size} s{layer.stride}"
    return Case("depthwise", mode, layer, batch, dtype, layout, shape, numel * dtype.itemsize)


def make_inputs(case: Case, device: torch.device) -> DepthwiseInputs:
    layer, memory_format = case.layer, layout_format(case.layout)
    # Drawn in float32 whatever the dtype, so that every dtype sees the same values.
    generator = torch.Generator(device).manual_seed(0)

    def randn(*size):
        tensor = torch.randn(size, generator=generator, device=device).to(case.dtype)
        return tensor.contiguous(memory_format=memory_format)

    k = layer.kernel_size
    grad_output = None
    if case.mode != "forward":
        grad_output = randn(case.batch, layer.channels, layer.out_size, layer.out_size)
    return DepthwiseInputs(
        input=randn(case.batch, layer.channels, layer.size, layer.size),
        weight=randn(layer.channels, 1, k, k),
        grad_output=grad_output,
    )


def _depthwise_conv(backend: str, input: torch.Tensor, weight: torch.Tensor, layer: DepthwiseLayer):
    if backend in (REFERENCE, ATEN_DEPTHWISE):
        return reference.depthwise_conv(input, weight, None, layer.stride, layer.padding, 1)
    return kernels.depthwise_conv2d(
        input, weight, None, layer.stride, layer.padding, backend=backend
    )


@contextmanager
def _cudnn_disabled():
    # Only this flag: cudnn.flags() would also reset TF32 and the other cuDNN settings.
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


def _dispatch_context(backend: str):
    # With cuDNN off, F.conv2d and its autograd node run PyTorch's native depthwise kernels.
    return _cudnn_disabled() if backend == ATEN_DEPTHWISE else nullcontext()


def make_runner(case: Case, inputs: DepthwiseInputs, backend: str) -> Runner:
    layer = case.layer
    if case.mode == "forward":

        def forward() -> Outputs:
            with _dispatch_context(backend):
                return {"output": _depthwise_conv(backend, inputs.input, inputs.weight, layer)}

        return forward

    input = inputs.input.detach().requires_grad_()
    weight = inputs.weight.detach().requires_grad_()

    def gradients(output) -> Outputs:
        grad_input, grad_weight = torch.autograd.grad(
            output, (input, weight), inputs.grad_output, retain_graph=case.mode == "backward"
        )
        return {"grad_input": grad_input, "grad_weight": grad_weight}

    if case.mode == "forward+backward":

        def forward_backward() -> Outputs:
            with _dispatch_context(backend):
                output = _depthwise_conv(backend, input, weight, layer)
                return {"output": output.detach(), **gradients(output)}

        return forward_backward

    with _dispatch_context(backend):
        output = _depthwise_conv(backend, input, weight, layer)

    def backward() -> Outputs:
        with _dispatch_context(backend):
            return gradients(output)

    return backward


def describe_kernel(case: Case, inputs: DepthwiseInputs, backend: str) -> str:
    if backend not in (REFERENCE, ATEN_DEPTHWISE):
        return ""
    with _dispatch_context(backend):
        return conv_kernel_picked(
            inputs.input, inputs.weight, case.layer.stride, case.layer.padding, case.layer.channels
        )


def aten_depthwise_unavailable(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "PyTorch's native depthwise kernel is CUDA-only"
    if case.layout != "nchw" or case.dtype not in (torch.float32, torch.bfloat16):
        return "baseline only where PyTorch picks it: NCHW float32/bfloat16"
    return None


OP = Op(
    name="depthwise",
    modes=("forward", "backward", "forward+backward"),
    layers=MOBILENET_V1_DEPTHWISE,
    subset_layers=subset(MOBILENET_V1_DEPTHWISE),
    quick_layers=quick_subset(MOBILENET_V1_DEPTHWISE),
    make_case=make_case,
    make_inputs=make_inputs,
    make_runner=make_runner,
    baselines={ATEN_DEPTHWISE: aten_depthwise_unavailable},
    describe_kernel=describe_kernel,
)
