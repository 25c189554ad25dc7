"""Input validation for every public op (SPEC §7): one place that turns bad arguments into a
ValueError or TypeError naming the argument, and normalises the good ones."""

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensors(op: str, **tensors: Tensor | None) -> None:
    """Each named tensor (None allowed: optional) is a floating tensor of a supported dtype, and
    all share the first one's dtype and device."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise TypeError(
                f"{op}: {name} has unsupported dtype {t.dtype}; expected one of {names}"
            )
        if first is None:
            first_name, first = name, t
            continue
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                "all tensors must share one dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


def check_rank(op: str, name: str, t: Tensor, rank: int, shape_doc: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be {rank}-D {shape_doc}, got shape {tuple(t.shape)}")


def _int_pair(op: str, name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in pair
    ):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        bound = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {bound}, got {value!r}")
    return pair


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's normalised arguments: padding as [top, bottom, left, right]."""

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    kernel_size: tuple[int, int]


def depthwise_args(
    op: str, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> ConvGeometry:
    """Checks a depthwise convolution's arguments against SPEC §2 and §7; returns its geometry."""
    check_tensors(op, input=input, weight=weight, bias=bias)
    check_rank(op, "input", input, 4, "[N, C, H, W]")
    check_rank(op, "weight", weight, 4, "[C, 1, kH, kW]")
    channels = input.shape[1]
    if weight.shape[1] != 1:
        raise ValueError(
            f"{op}: weight must be [C, 1, kH, kW] (one filter per channel), "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] != channels:
        raise ValueError(
            f"{op}: weight has {weight.shape[0]} filters but input has {channels} channels; "
            "a depthwise weight is [C, 1, kH, kW] with C = input.shape[1]"
        )
    if channels == 0:
        raise ValueError(f"{op}: input has 0 channels")
    if weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"{op}: weight has an empty kernel {tuple(weight.shape[2:])}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{op}: bias must have shape ({channels},), got {tuple(bias.shape)}")

    stride = _int_pair(op, "stride", stride, 1)
    dilation = _int_pair(op, "dilation", dilation, 1)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1, got stride={stride}")
            # Like F.conv2d: the odd extra pixel of an even kernel goes to the end.
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pad = (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
        else:
            raise ValueError(
                f"{op}: padding must be 'same', 'valid', an int or a pair, got {padding!r}"
            )
    else:
        ph, pw = _int_pair(op, "padding", padding, 0)
        pad = (ph, ph, pw, pw)

    for dim, size, before, after, k, d in (
        ("height", input.shape[2], pad[0], pad[1], kernel[0], dilation[0]),
        ("width", input.shape[3], pad[2], pad[3], kernel[1], dilation[1]),
    ):
        if size + before + after < d * (k - 1) + 1:
            raise ValueError(
                f"{op}: kernel {kernel} with dilation {dilation} spans {d * (k - 1) + 1} pixels "
                f"but the padded input {dim} is {size + before + after}"
            )
    return ConvGeometry(stride, pad, dilation, kernel)
