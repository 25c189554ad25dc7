"""Depthwise 3x3 convolution on the 13 depthwise layers of MobileNet V1.

Modes:
  forward   kernels.depthwise_conv2d
  backward  torch.autograd.grad of input and weight through one retained graph: the backward
            kernels alone, without the forward
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from bench.harness import Case, Op, Outputs, Runner, layout_format
from bench.shapes import MOBILENET_V1_DEPTHWISE, DepthwiseLayer, quick_subset

# PyTorch's own CUDA depthwise kernel (aten._conv_depthwise2d and its backward): what F.conv2d
# runs for NCHW float32/bfloat16 when it does not pick cuDNN.
ATEN_DEPTHWISE = "aten_depthwise"


@dataclass(frozen=True)
class DepthwiseInputs:
    input: torch.Tensor
    weight: torch.Tensor
    grad_output: torch.Tensor | None  # backward mode only


def make_case(
    layer: DepthwiseLayer, batch: int, dtype: torch.dtype, layout: str, mode: str
) -> Case:
    k = layer.kernel_size
    input_numel = batch * layer.channels * layer.size**2
    output_numel = batch * layer.channels * layer.out_size**2
    weight_numel = layer.channels * k * k
    if mode == "forward":
        numel = input_numel + weight_numel + output_numel
    else:
        # read grad_output, input, weight; write grad_input, grad_weight
        numel = output_numel + input_numel + weight_numel + input_numel + weight_numel
    shape = f"{batch}x{layer.channels}x{layer.size}x{layer.size} s{layer.stride}"
    return Case("depthwise", mode, layer, batch, dtype, layout, shape, numel * dtype.itemsize)


def make_inputs(case: Case, device: torch.device) -> DepthwiseInputs:
    layer, memory_format = case.layer, layout_format(case.layout)
    generator = torch.Generator(device).manual_seed(0)

    def randn(*size):
        tensor = torch.randn(size, generator=generator, device=device, dtype=case.dtype)
        return tensor.contiguous(memory_format=memory_format)

    k = layer.kernel_size
    grad_output = None
    if case.mode == "backward":
        grad_output = randn(case.batch, layer.channels, layer.out_size, layer.out_size)
    return DepthwiseInputs(
        input=randn(case.batch, layer.channels, layer.size, layer.size),
        weight=randn(layer.channels, 1, k, k),
        grad_output=grad_output,
    )


def _depthwise_conv(backend: str, input: torch.Tensor, weight: torch.Tensor, layer: DepthwiseLayer):
    if backend == ATEN_DEPTHWISE:
        return F.conv2d(input, weight, None, layer.stride, layer.padding, groups=layer.channels)
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
    with _dispatch_context(backend):
        output = _depthwise_conv(backend, input, weight, layer)

    def backward() -> Outputs:
        with _dispatch_context(backend):
            grad_input, grad_weight = torch.autograd.grad(
                output, (input, weight), inputs.grad_output, retain_graph=True
            )
        return {"grad_input": grad_input, "grad_weight": grad_weight}

    return backward


def aten_depthwise_unavailable(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "PyTorch's native depthwise kernel is CUDA-only"
    if case.layout != "nchw" or case.dtype not in (torch.float32, torch.bfloat16):
        return "baseline only where PyTorch picks it: NCHW float32/bfloat16"
    return None


OP = Op(
    name="depthwise",
    modes=("forward", "backward"),
    layers=MOBILENET_V1_DEPTHWISE,
    quick_layers=quick_subset(MOBILENET_V1_DEPTHWISE),
    make_case=make_case,
    make_inputs=make_inputs,
    make_runner=make_runner,
    baselines={ATEN_DEPTHWISE: aten_depthwise_unavailable},
)
