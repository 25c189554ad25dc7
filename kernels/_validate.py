"""Input validation for every public op: the one place that turns bad arguments into a ValueError
or TypeError naming the argument (never a crash, a hang or a silently wrong result), and
normalises the good ones."""

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import ACTIVATION_CODES, activation_op_name, conv2d_output_hw

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_SUPPORTED = frozenset(SUPPORTED_DTYPES)
_CONV_NAMES = ("input", "weight", "bias")
_INPUT_WEIGHT = _CONV_NAMES[:2]
_BN_NAMES = ("running_mean", "running_var", "bn_weight", "bn_bias")


@dataclass(frozen=True)
class TensorSpec:
    """What the checks read of a tensor, for one not computed yet (a chain stage's input): its
    shape, dtype and device, without a tensor to dispatch."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int:
        return len(self.shape)


def check_tensors(op: str, names: tuple[str, ...], tensors: tuple) -> None:
    """Each tensor (named by `names`, in order; None allowed: optional) is a floating tensor of a
    supported dtype, and all share the first one's dtype and device. Positional, not keyword
    arguments: a public op calls this on every call, and a keyword dict costs ~0.5 us."""
    first_name = first_dtype = first_device = None
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if not isinstance(t, (Tensor, TensorSpec)):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        dtype, device = t.dtype, t.device  # each read once: a Tensor attribute costs ~0.3 us
        if dtype not in _SUPPORTED:
            names_ = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise TypeError(f"{op}: {name} has unsupported dtype {dtype}; expected one of {names_}")
        if first_name is None:
            first_name, first_dtype, first_device = name, dtype, device
            continue
        if dtype != first_dtype:
            raise TypeError(
                f"{op}: {name} has dtype {dtype} but {first_name} has {first_dtype}; "
                "all tensors must share one dtype"
            )
        if device != first_device:
            raise ValueError(
                f"{op}: {name} is on {device} but {first_name} is on {first_device}; "
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

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        return conv2d_output_hw(
            height, width, self.kernel_size, self.stride, self.padding, self.dilation
        )


def _geometry(op: str, kernel: tuple[int, int], stride, padding, dilation) -> ConvGeometry:
    stride = _int_pair(op, "stride", stride, 1)
    dilation = _int_pair(op, "dilation", dilation, 1)
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
    return ConvGeometry(stride, pad, dilation, kernel)


# Normalised geometries by their arguments: a model calls each layer's with the same ones.
_GEOMETRIES: dict[tuple, ConvGeometry] = {}


def _plain(value) -> bool:
    """An int, a str or a pair of ints: a cache key that equals only arguments of its types
    (True == 1, but a bool stride must still be refused)."""
    kind = type(value)
    return (
        kind is int
        or kind is str
        or (kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int)
    )


def _cached_geometry(op: str, kernel: tuple[int, int], stride, padding, dilation):
    if not (_plain(stride) and _plain(padding) and _plain(dilation)):
        return _geometry(op, kernel, stride, padding, dilation)
    key = (kernel, stride, padding, dilation)
    geometry = _GEOMETRIES.get(key)
    if geometry is None:
        geometry = _GEOMETRIES[key] = _geometry(op, kernel, stride, padding, dilation)
    return geometry


def _depthwise_weight(
    op: str, input: Tensor, weight: Tensor, bias: Tensor | None, names: tuple[str, str, str]
) -> tuple[tuple[int, int], tuple[int, ...]]:
    """Checks a depthwise convolution's input [N, C, H, W], weight [C, 1, kH, kW] and bias [C] or
    None (called `names`); returns the kernel size and the input's shape."""
    check_tensors(op, names, (input, weight, bias))
    name = names[1]
    check_rank(op, "input", input, 4, "[N, C, H, W]")
    check_rank(op, name, weight, 4, "[C, 1, kH, kW]")
    shape, input_shape = tuple(weight.shape), tuple(input.shape)
    channels = input_shape[1]
    if shape[1] != 1:
        raise ValueError(
            f"{op}: {name} must be [C, 1, kH, kW] (one filter per channel), got {shape}"
        )
    if shape[0] != channels:
        raise ValueError(
            f"{op}: {name} has {shape[0]} filters but input has {channels} channels; "
            f"a depthwise {name} is [C, 1, kH, kW] with C = input.shape[1]"
        )
    if channels == 0:
        raise ValueError(f"{op}: input has 0 channels")
    if shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"{op}: {name} has an empty kernel {shape[2:]}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{op}: bias must have shape ({channels},), got {tuple(bias.shape)}")
    return shape[2:], input_shape


def _check_kernel_fits(op: str, input_shape: tuple[int, ...], geometry: ConvGeometry) -> None:
    """The dilated kernel spans no more than the padded input along each axis."""
    kernel, pad, dilation = geometry.kernel_size, geometry.padding, geometry.dilation
    for dim, size, before, after, k, d in (
        ("height", input_shape[2], pad[0], pad[1], kernel[0], dilation[0]),
        ("width", input_shape[3], pad[2], pad[3], kernel[1], dilation[1]),
    ):
        if size + before + after < d * (k - 1) + 1:
            raise ValueError(
                f"{op}: kernel {kernel} with dilation {dilation} spans {d * (k - 1) + 1} pixels "
                f"but the padded input {dim} is {size + before + after}"
            )


def depthwise_args(
    op: str, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> ConvGeometry:
    """Checks a depthwise convolution's arguments (input [N, C, H, W], weight [C, 1, kH, kW],
    bias [C] or None, F.conv2d's stride, padding and dilation); returns its geometry."""
    kernel, input_shape = _depthwise_weight(op, input, weight, bias, _CONV_NAMES)
    geometry = (
        _geometry(op, kernel, stride, padding, dilation)
        if torch.compiler.is_compiling()
        else _cached_geometry(op, kernel, stride, padding, dilation)
    )
    _check_kernel_fits(op, input_shape, geometry)
    return geometry


_PUBLIC_ACTIVATIONS = frozenset(name for name in ACTIVATION_CODES if name != "none")


def _prefix(bn_names: tuple[str, ...]) -> str:
    return bn_names[0].removesuffix(_BN_NAMES[0])


def bn_act_args(
    op: str,
    input: Tensor,
    out_channels: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str | None,
    num_batches_tracked: Tensor | None,
    names: tuple[str, str, str, str] = _BN_NAMES,
) -> str:
    """Checks the BatchNorm and activation arguments of a fused op (the convolution's own are
    checked apart); returns the activation's name as the ops take it. `names` name the BN
    tensors in the errors; an op with two BNs gives each a prefix ("dw_running_mean", ...),
    which the errors put before eps and activation too."""
    # BN parameters and statistics share one dtype, which may differ from the input's (float32
    # statistics under autocast, as nn.BatchNorm2d keeps them).
    bn = (running_mean, running_var, bn_weight, bn_bias)
    check_tensors(op, names, bn)
    # check_tensors saw one device for all of them: the first one given stands for the rest.
    for name, t in zip(names, bn):
        if t is not None:
            if t.device != input.device:
                raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
            break
    expected = (out_channels,)
    for name, t in zip(names, bn):
        if t is not None and t.shape != expected:
            raise ValueError(
                f"{op}: {name} must have shape ({out_channels},) (one value per output channel), "
                f"got {tuple(t.shape)}"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: {names[0]} and {names[1]} must be both given or both None")
    if type(training) is not bool:
        raise TypeError(f"{op}: training must be a bool, got {training!r}")
    if not training and running_mean is None:
        raise ValueError(f"{op}: {names[0]} and {names[1]} are required when training=False")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: {_prefix(names)}eps must be a positive float, got {eps!r}")
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError(
                f"{op}: momentum=None (a cumulative average) needs num_batches_tracked to count "
                "the batches"
            )
    elif (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not (0.0 <= momentum <= 1.0)
    ):
        raise ValueError(f"{op}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    if num_batches_tracked is not None and (
        not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.numel() != 1
    ):
        raise TypeError(f"{op}: num_batches_tracked must be a one-element tensor or None")
    if activation is None:
        return activation_op_name(None)
    if type(activation) is not str or activation not in _PUBLIC_ACTIVATIONS:
        choices = ", ".join(repr(name) for name in ACTIVATION_CODES if name != "none")
        raise ValueError(
            f"{op}: {_prefix(names)}activation must be one of {choices} or None, got {activation!r}"
        )
    return activation


def pointwise_weight(
    op: str, input: Tensor, weight: Tensor, names: tuple[str, str] = _INPUT_WEIGHT
) -> tuple[int, ...]:
    """Checks a 1x1 convolution's input and weight [C_out, C_in, 1, 1] (called `names`); returns
    the input's shape."""
    check_tensors(op, names, (input, weight))
    name = names[1]
    check_rank(op, "input", input, 4, "[N, C, H, W]")
    check_rank(op, name, weight, 4, "[C_out, C_in, 1, 1]")
    shape, input_shape = tuple(weight.shape), tuple(input.shape)
    if shape[2:] != (1, 1):
        raise ValueError(f"{op}: {name} must be a 1x1 kernel [C_out, C_in, 1, 1], got {shape}")
    if shape[1] != input_shape[1]:
        raise ValueError(
            f"{op}: {name} has {shape[1]} input channels but input has "
            f"{input_shape[1]}; {name} is [C_out, C_in, 1, 1] with C_in = input.shape[1]"
        )
    if shape[0] == 0 or input_shape[1] == 0:
        raise ValueError(f"{op}: empty channels: input {input_shape}, {name} {shape}")
    return input_shape


def batch_values_per_channel(op: str, values: int, input_shape, training: bool) -> None:
    """Like F.batch_norm, training needs more than 1 value per channel to normalise over."""
    if training and values == 1:
        raise ValueError(
            f"{op}: Expected more than 1 value per channel when training, got input size "
            f"{torch.Size(input_shape)}"
        )


def _int_list(op: str, name: str, value, length: int, minimum: int) -> tuple[int, ...]:
    """A registered op's normalised int list argument: `length` ints, each at least `minimum`."""
    values = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(values) != length or not all(type(v) is int for v in values):
        raise TypeError(f"{op}: {name} must be a list of {length} ints, got {value!r}")
    if any(v < minimum for v in values):
        bound = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{op}: {name} must be {bound}, got {value!r}")
    return values


_DW_BN_NAMES = tuple("dw_" + name for name in _BN_NAMES)
_PW_BN_NAMES = tuple("pw_" + name for name in _BN_NAMES)


def depthwise_pointwise_eval_args(
    op: str,
    input: Tensor,
    dw_weight: Tensor,
    stride,
    padding,
    dilation,
    dw_bn: tuple,
    dw_eps: float,
    dw_activation: str,
    pw_weight: Tensor,
    pw_bn: tuple,
    pw_eps: float,
    pw_activation: str,
) -> ConvGeometry:
    """Checks a direct call of the registered op depthwise_pointwise_eval, whose arguments come
    as kernels/_ops.py defines them: geometry normalised (stride and dilation [h, w], padding
    [top, bottom, left, right]), activations as the ops name them ("none" included), each BN as
    (running_mean, running_var, bn_weight, bn_bias) with the running statistics required.
    Returns the depthwise geometry; the errors name the op's arguments."""
    kernel, input_shape = _depthwise_weight(op, input, dw_weight, None, ("input", "dw_weight", ""))
    geometry = ConvGeometry(
        _int_list(op, "stride", stride, 2, 1),
        _int_list(op, "padding", padding, 4, 0),
        _int_list(op, "dilation", dilation, 2, 1),
        kernel,
    )
    _check_kernel_fits(op, input_shape, geometry)
    pointwise_weight(op, input, pw_weight, ("input", "pw_weight"))
    for names, channels, bn, eps, activation in (
        (_DW_BN_NAMES, input_shape[1], dw_bn, dw_eps, dw_activation),
        (_PW_BN_NAMES, pw_weight.shape[0], pw_bn, pw_eps, pw_activation),
    ):
        public = None if activation == activation_op_name(None) else activation
        bn_act_args(op, input, channels, *bn, False, None, eps, public, None, names)
    return geometry
