"""The public functional ops: validate, apply autocast, choose a backend, call its op."""

import torch
from torch import Tensor

from . import _validate, reference
from ._backend import select_backend


def _autocast(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Casts like F.conv2d under torch.autocast: floating tensors to the autocast dtype."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


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
    geometry = _validate.depthwise_args(op, input, weight, bias, stride, padding, dilation)
    input, weight, bias = _autocast(input.device.type, input, weight, bias)
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
