"""Triton depthwise 2-D convolution: forward, input gradient and weight gradient, the ops
``depsep::triton_depthwise_conv2d_fwd``, ``_bwd_input`` and ``_bwd_weight`` (registered with
``torch.library.triton_op`` by kernels/triton/__init__.py, so torch.compile traces into the
kernels; no autograd here: kernels/_ops.py registers it on top of these ops).

Shared contract with the native ops: ``padding`` is ``[top, bottom, left, right]``, ``stride`` and
``dilation`` are ``[h, w]``, and arguments arrive validated. Each op computes in the memory format
that ``suggest_memory_format`` picks for its layout-defining tensor (NCHW or channels_last) and
returns its result in that format. Accumulation is float32 (float64 for float64 tensors).

Forward and input gradient are the same gather (depthwise_gather.py), the input gradient with the
forward's tap geometry transposed; the weight gradient is depthwise_wgrad.py's deterministic
two-pass reduction.
"""

import torch
from torch import Tensor

from .._common import conv2d_output_hw
from .._common import memory_format as suggest_memory_format
from .depthwise_gather import gather
from .depthwise_wgrad import weight_grad_sums


def _gather_op(src, weight, bias, out_shape, stride, padding, dilation, transposed) -> Tensor:
    """The gather of `src` into a new tensor of `out_shape`, both in src's memory format."""
    fmt = suggest_memory_format(src)
    out = torch.empty(out_shape, device=src.device, dtype=src.dtype, memory_format=fmt)
    gather(
        src.contiguous(memory_format=fmt),
        weight,
        bias,
        out,
        fmt == torch.channels_last,
        padding,
        stride,
        dilation,
        transposed,
    )
    return out


def depthwise_conv2d_fwd(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """Depthwise conv2d: input [N, C, H, W], weight [C, 1, kH, kW], padding [t, b, l, r]."""
    N, C, H, W = input.shape
    oh, ow = conv2d_output_hw(H, W, weight.shape[-2:], stride, padding, dilation)
    return _gather_op(input, weight, bias, (N, C, oh, ow), stride, padding, dilation, False)


def depthwise_conv2d_bwd_input(
    grad_output: Tensor,
    weight: Tensor,
    input_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """Gradient of depthwise_conv2d_fwd with respect to its input, shaped `input_shape`."""
    return _gather_op(grad_output, weight, None, input_shape, stride, padding, dilation, True)


def depthwise_conv2d_bwd_weight(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    compute_bias: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_weight [C, 1, kH, kW], grad_bias [C] or an empty [0]) of depthwise_conv2d_fwd.

    Deterministic: no atomics, and the reduction order depends on the shapes only.
    """
    C = input.shape[1]
    kh, kw = kernel_size
    fmt = suggest_memory_format(input)
    sums = weight_grad_sums(
        grad_output.contiguous(memory_format=fmt),
        input.contiguous(memory_format=fmt),
        fmt == torch.channels_last,
        kh * kw + int(compute_bias),
        kernel_size,
        padding,
        stride,
        dilation,
    )
    grad_weight = (
        sums[:, : kh * kw]
        .to(input.dtype, memory_format=torch.contiguous_format, copy=True)
        .view(C, 1, kh, kw)
    )
    if compute_bias:
        grad_bias = sums[:, kh * kw].to(
            input.dtype, memory_format=torch.contiguous_format, copy=True
        )
    else:
        grad_bias = torch.empty(0, device=input.device, dtype=input.dtype)
    return grad_weight, grad_bias
