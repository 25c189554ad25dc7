"""Facts that several layers of the package share, each defined once: the activations the fused
ops apply, the accumulation dtype, the convolution output size, the memory-format rule and the
TF32 setting for convolutions. A leaf module: it imports nothing of the package."""

import torch
from torch import Tensor

# The fused ops' activations: the name the ops take (the public `activation=None` is "none") and
# the code the kernels switch on. csrc/common/activation.h defines the same codes for C++.
ACTIVATION_CODES = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4}


def activation_op_name(activation: str | None) -> str:
    """The ops' name of a public `activation` argument (None means no activation)."""
    return "none" if activation is None else activation


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a kernel over `dtype` tensors, which is also the dtype of the
    per-channel statistics the fused ops return: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_output_size(size, pad_begin, pad_end, kernel: int, stride: int, dilation: int):
    """Output length along one axis of a convolution (padding may differ at the two ends)."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_output_hw(height, width, kernel_size, stride, padding, dilation):
    """(OH, OW) of a 2-D convolution with padding [top, bottom, left, right]."""
    return (
        conv_output_size(height, padding[0], padding[1], kernel_size[0], stride[0], dilation[0]),
        conv_output_size(width, padding[2], padding[3], kernel_size[1], stride[1], dilation[1]),
    )


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor with NHWC-like strides, else contiguous_format, exactly as
    the C++ kernels decide (ATen's Tensor.suggest_memory_format(); torch._prims_common has it
    from torch 2.12, older releases have only the stride test)."""
    if not torch.compiler.is_compiling():
        # A tensor contiguous in exactly one of the two layouts has that one (the common case,
        # answered without the general stride analysis).
        contiguous = t.is_contiguous()
        if contiguous != t.is_contiguous(memory_format=torch.channels_last):
            return torch.contiguous_format if contiguous else torch.channels_last
    suggest = getattr(torch._prims_common, "suggest_memory_format", None)
    if suggest is not None:
        return suggest(t)
    strides_like_cl = torch._prims_common.are_strides_like_channels_last(t.shape, t.stride())
    return torch.channels_last if t.dim() == 4 and strides_like_cl else torch.contiguous_format


def conv_allows_tf32() -> bool:
    """Whether float32 convolutions may run as TF32, as cuDNN decides for its own: the per-op
    `torch.backends.cudnn.conv.fp32_precision` ("none" inherits from cuDNN's, then from the
    global setting). Torch releases without that API have only `torch.backends.cudnn.allow_tf32`,
    which newer ones refuse to read once the per-op setting is used."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        return bool(torch.backends.cudnn.allow_tf32)
    for precision in (
        conv.fp32_precision,
        torch.backends.cudnn.fp32_precision,
        torch.backends.fp32_precision,
    ):
        if precision != "none":
            return precision == "tf32"
    return False
