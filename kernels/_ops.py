"""The op library: every op's schema (defined once, here), the table of each backend's ops, the
fake kernels and the autograd.

An op is layered as kernel (csrc/, kernels/triton/) -> registered op without autograd (its schema
here; its implementation registered by kernels._C for "native", by kernels/triton/ for "triton")
-> autograd (the Functions below) -> public function (functional.py) -> nn.Module (mobilenet/).
Every backend's op of a name has the same schema; `OPS[backend]` holds their handles.
"""

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor
from torch._ops import OpOverload

from ._common import conv2d_output_hw, memory_format, stats_dtype


class OpSignatures:
    """The signature of every op, from which its schema is inferred (shape arguments are SymInt,
    so that torch.compile(dynamic=True) keeps them symbolic). padding is [top, bottom, left,
    right]; stride, dilation and kernel_size are [h, w]. Every op computes in the memory format
    of its input (grad_output for the input gradient) and returns activation-sized results in it.
    """

    @staticmethod
    def depthwise_conv2d_fwd(
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
    ) -> Tensor:
        """F.conv2d(input, weight, bias, groups=C) with weight [C, 1, kH, kW]."""

    @staticmethod
    def depthwise_conv2d_bwd_input(
        grad_output: Tensor,
        weight: Tensor,
        input_shape: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
    ) -> Tensor:
        """The gradient of depthwise_conv2d_fwd with respect to its input."""

    @staticmethod
    def depthwise_conv2d_bwd_weight(
        grad_output: Tensor,
        input: Tensor,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        compute_bias: bool,
    ) -> tuple[Tensor, Tensor]:
        """(grad_weight [C, 1, kH, kW], grad_bias [C] or an empty [0]), reduced in a fixed order."""

    @staticmethod
    def pointwise_bn_act_fwd(
        input: Tensor,
        weight: Tensor,
        bn_weight: Tensor | None,
        bn_bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        training: bool,
        momentum: float | None,
        eps: float,
        activation: str,
    ) -> tuple[Tensor, Tensor]:
        """(act(BN(conv1x1(input))), stats) with weight [C_out, C_in, 1, 1].

        training: normalise with the batch's mean and biased variance; then, when given,
        num_batches_tracked counts the batch and the running statistics move towards the batch's
        (unbiased variance) by `momentum`, or by 1 / num_batches_tracked when momentum is None (a
        cumulative average). Otherwise normalise with the running statistics, which are required.
        stats [2, C_out] holds the mean and biased variance it normalised with, in the
        accumulation dtype (float64 for float64 input, else float32)."""

    @staticmethod
    def pointwise_bn_act_bwd(
        grad_output: Tensor,
        input: Tensor,
        weight: Tensor,
        bn_weight: Tensor | None,
        bn_bias: Tensor | None,
        stats: Tensor,
        training: bool,
        eps: float,
        activation: str,
        output_mask: Sequence[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grad_input, grad_weight, grad_bn_weight, grad_bn_bias) of pointwise_bn_act_fwd from
        its saved input, weights and stats (the convolution, BN output and activation derivative
        are recomputed); each an empty [0] where output_mask says it is not wanted."""

    @staticmethod
    def depthwise_bn_act_fwd(
        input: Tensor,
        weight: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        bn_weight: Tensor | None,
        bn_bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        training: bool,
        momentum: float | None,
        eps: float,
        activation: str,
    ) -> tuple[Tensor, Tensor]:
        """pointwise_bn_act_fwd with a depthwise convolution, weight [C, 1, kH, kW]."""

    @staticmethod
    def depthwise_bn_act_bwd(
        grad_output: Tensor,
        input: Tensor,
        weight: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        bn_weight: Tensor | None,
        bn_bias: Tensor | None,
        stats: Tensor,
        training: bool,
        eps: float,
        activation: str,
        output_mask: Sequence[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The gradients of depthwise_bn_act_fwd, as pointwise_bn_act_bwd's."""

    @staticmethod
    def depthwise_pointwise_eval(
        input: Tensor,
        dw_weight: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        dw_bn_weight: Tensor | None,
        dw_bn_bias: Tensor | None,
        dw_running_mean: Tensor,
        dw_running_var: Tensor,
        dw_eps: float,
        dw_activation: str,
        pw_weight: Tensor,
        pw_bn_weight: Tensor | None,
        pw_bn_bias: Tensor | None,
        pw_running_mean: Tensor,
        pw_running_var: Tensor,
        pw_eps: float,
        pw_activation: str,
    ) -> Tensor:
        """The depthwise-separable block in eval, as one pass: pw_act(BN_pw(conv1x1(dw_act(
        BN_dw(depthwise(input)))))), each BN with its running statistics; the depthwise output
        never goes to memory. dw_weight [C, 1, kH, kW], pw_weight [C_out, C, 1, 1]."""


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
MUTATED_ARGS = {"pointwise_bn_act_fwd": _RUNNING_STATS, "depthwise_bn_act_fwd": _RUNNING_STATS}


def _op_names() -> list[str]:
    return [name for name, _ in inspect.getmembers(OpSignatures, inspect.isfunction)]


SCHEMAS = {
    name: torch.library.infer_schema(
        getattr(OpSignatures, name), mutates_args=MUTATED_ARGS.get(name, ())
    )
    for name in _op_names()
}


# Ops a backend may leave out (the functional API then takes the other ops' path).
OPTIONAL_OPS = ("depthwise_pointwise_eval",)


@dataclass(frozen=True)
class OpSet:
    """One backend's registered ops, by op name (None: an optional op it does not have)."""

    depthwise_conv2d_fwd: OpOverload
    depthwise_conv2d_bwd_input: OpOverload
    depthwise_conv2d_bwd_weight: OpOverload
    pointwise_bn_act_fwd: OpOverload
    pointwise_bn_act_bwd: OpOverload
    depthwise_bn_act_fwd: OpOverload
    depthwise_bn_act_bwd: OpOverload
    depthwise_pointwise_eval: OpOverload | None

    @classmethod
    def from_namespace(cls, namespace: str, prefix: str = "") -> "OpSet":
        ops = getattr(torch.ops, namespace)

        def handle(name):
            if name in OPTIONAL_OPS and not hasattr(ops, prefix + name):
                return None
            return getattr(ops, prefix + name).default

        return cls(**{f.name: handle(f.name) for f in fields(cls)})


assert sorted(f.name for f in fields(OpSet)) == sorted(SCHEMAS), "OpSet and OpSignatures differ"

# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and memory formats of every op's outputs
# ---------------------------------------------------------------------------------------------


def _depthwise_output_shape(input_shape, kernel_size, stride, padding, dilation):
    n, c, h, w = input_shape
    oh, ow = conv2d_output_hw(h, w, kernel_size, stride, padding, dilation)
    torch._check(oh > 0 and ow > 0, lambda: "depsep: kernel larger than the padded input")
    return (n, c, oh, ow)


def _check_depthwise_weight(input, weight):
    torch._check(input.dim() == 4, lambda: "depsep: input must be 4-D")
    torch._check(
        tuple(weight.shape[:2]) == (input.shape[1], 1),
        lambda: f"depsep: weight must be [C, 1, kH, kW], got {tuple(weight.shape)}",
    )
    torch._check(weight.dtype == input.dtype, lambda: "depsep: weight dtype must match input")


def _check_grad_output(grad_output, expected):
    torch._check(
        tuple(grad_output.shape) == tuple(expected),
        lambda: f"depsep: grad_output must be {tuple(expected)}, got {tuple(grad_output.shape)}",
    )


def _empty_like_layout(shape, like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(shape, dtype=dtype).contiguous(memory_format=memory_format(like))


def _depthwise_conv2d_fwd_fake(input, weight, bias, stride, padding, dilation):
    _check_depthwise_weight(input, weight)
    shape = _depthwise_output_shape(input.shape, weight.shape[2:], stride, padding, dilation)
    return _empty_like_layout(shape, input)


def _depthwise_conv2d_bwd_input_fake(grad_output, weight, input_shape, stride, padding, dilation):
    torch._check(grad_output.dim() == 4, lambda: "depsep: grad_output must be 4-D")
    expected = _depthwise_output_shape(input_shape, weight.shape[2:], stride, padding, dilation)
    _check_grad_output(grad_output, expected)
    return _empty_like_layout(input_shape, grad_output)


def _depthwise_conv2d_bwd_weight_fake(
    grad_output, input, kernel_size, stride, padding, dilation, compute_bias
):
    expected = _depthwise_output_shape(input.shape, kernel_size, stride, padding, dilation)
    _check_grad_output(grad_output, expected)
    channels = input.shape[1]
    grad_weight = input.new_empty((channels, 1, *kernel_size))
    return grad_weight, input.new_empty((channels if compute_bias else 0,))


def _fused_output_shape(input, weight, geometry):
    """The convolution output shape of a fused op: 1x1 when geometry is empty, else depthwise."""
    torch._check(input.dim() == 4, lambda: "depsep: input must be 4-D")
    torch._check(weight.dtype == input.dtype, lambda: "depsep: weight dtype must match input")
    if not geometry:
        torch._check(
            tuple(weight.shape[1:]) == (input.shape[1], 1, 1),
            lambda: f"depsep: weight must be [C_out, {input.shape[1]}, 1, 1]",
        )
        return (input.shape[0], weight.shape[0], input.shape[2], input.shape[3])
    _check_depthwise_weight(input, weight)
    return _depthwise_output_shape(input.shape, weight.shape[2:], *geometry)


def _bn_act_fwd_fake(input, weight, geometry):
    shape = _fused_output_shape(input, weight, geometry)
    stats = input.new_empty((2, shape[1]), dtype=stats_dtype(input.dtype))
    return _empty_like_layout(shape, input), stats


def _bn_act_bwd_fake(grad_output, input, weight, geometry, bn_weight, bn_bias, output_mask):
    expected = _fused_output_shape(input, weight, geometry)
    _check_grad_output(grad_output, expected)
    channels = expected[1]
    bn_dtype = input.dtype if bn_weight is None else bn_weight.dtype
    bias_dtype = input.dtype if bn_bias is None else bn_bias.dtype
    grads = (
        _empty_like_layout(input.shape, input),
        torch.empty_like(weight),
        input.new_empty((channels,), dtype=bn_dtype),
        input.new_empty((channels,), dtype=bias_dtype),
    )
    return tuple(g if wanted else g.new_empty((0,)) for g, wanted in zip(grads, output_mask))


def _pointwise_bn_act_fwd_fake(input, weight, bn_weight, bn_bias, *running_and_options):
    return _bn_act_fwd_fake(input, weight, ())


def _pointwise_bn_act_bwd_fake(grad_output, input, weight, bn_weight, bn_bias, *rest):
    return _bn_act_bwd_fake(grad_output, input, weight, (), bn_weight, bn_bias, rest[-1])


def _depthwise_bn_act_fwd_fake(input, weight, stride, padding, dilation, *bn_and_options):
    return _bn_act_fwd_fake(input, weight, (stride, padding, dilation))


def _depthwise_bn_act_bwd_fake(
    grad_output, input, weight, stride, padding, dilation, bn_weight, bn_bias, *rest
):
    geometry = (stride, padding, dilation)
    return _bn_act_bwd_fake(grad_output, input, weight, geometry, bn_weight, bn_bias, rest[-1])


def _depthwise_pointwise_eval_fake(input, dw_weight, stride, padding, dilation, *rest):
    pw_weight = rest[6]
    n, _, oh, ow = _fused_output_shape(input, dw_weight, (stride, padding, dilation))
    torch._check(
        tuple(pw_weight.shape[1:]) == (input.shape[1], 1, 1),
        lambda: f"depsep: pw_weight must be [C_out, {input.shape[1]}, 1, 1]",
    )
    return _empty_like_layout((n, pw_weight.shape[0], oh, ow), input)


_FAKES = {
    "depthwise_conv2d_fwd": _depthwise_conv2d_fwd_fake,
    "depthwise_conv2d_bwd_input": _depthwise_conv2d_bwd_input_fake,
    "depthwise_conv2d_bwd_weight": _depthwise_conv2d_bwd_weight_fake,
    "pointwise_bn_act_fwd": _pointwise_bn_act_fwd_fake,
    "pointwise_bn_act_bwd": _pointwise_bn_act_bwd_fake,
    "depthwise_bn_act_fwd": _depthwise_bn_act_fwd_fake,
    "depthwise_bn_act_bwd": _depthwise_bn_act_bwd_fake,
    "depthwise_pointwise_eval": _depthwise_pointwise_eval_fake,
}

# ---------------------------------------------------------------------------------------------
# The ops of each backend
# ---------------------------------------------------------------------------------------------

# Activation-sized arguments and results keep their strides: the kernels pick their layout.
_FIXED_LAYOUT = (torch.Tag.needs_fixed_stride_order,)


def _define(namespace: str) -> torch.library.Library:
    """Defines every op with its schema and fake kernel in `namespace` (kernels._C registers the
    implementations of "depsep" and "depsep_host")."""
    lib = torch.library.Library(namespace, "DEF")  # noqa: TOR901 (one DEF library per namespace)
    for name, schema in SCHEMAS.items():
        lib.define(name + schema, tags=_FIXED_LAYOUT)
        torch.library.register_fake(f"{namespace}::{name}", _FAKES[name], lib=lib)
    return lib


_LIBRARIES = {"native": _define("depsep")}
# Each backend's ops by backend name: "native" (kernels._C), "triton" (added by kernels/triton/
# when Triton is there) and, for the tests only, "host_programs" (host_program_ops()).
OPS: dict[str, OpSet] = {"native": OpSet.from_namespace("depsep")}


def define_triton_op(name: str, implementation) -> None:
    """Registers a Triton implementation of op `name` as "depsep::triton_<name>" with the op's
    schema; torch.compile traces into its kernels. The implementation takes the op's signature
    (set here, so that torch releases that infer a triton_op's schema from the signature infer
    the same one)."""
    implementation.__signature__ = inspect.signature(getattr(OpSignatures, name))
    torch.library.triton_op(
        f"depsep::triton_{name}",
        implementation,
        mutates_args=MUTATED_ARGS.get(name, ()),
        schema=SCHEMAS[name],
    )


def add_triton_ops() -> None:
    """Puts the Triton ops, all registered by now, into OPS."""
    OPS["triton"] = OpSet.from_namespace("depsep", prefix="triton_")


def host_program_ops() -> OpSet:
    """Test-only: the ops that run the CUDA kernels' thread and block programs on the host, for
    CPU tensors (namespace "depsep_host", defined on the first call), under OPS["host_programs"].
    The tests run them in every CI run, so the GPU code's index arithmetic, boundary handling,
    vector accesses, accumulation order and epilogues are executed without a GPU."""
    if "host_programs" not in OPS:
        _LIBRARIES["host_programs"] = _define("depsep_host")
        OPS["host_programs"] = OpSet.from_namespace("depsep_host")
    return OPS["host_programs"]


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: OpOverload, device: torch.device) -> bool:
    """Whether `op` has a kernel for `device`'s tensors (an optional op may have it for some
    device types only)."""
    key = _DISPATCH_KEYS.get(device.type)
    return key is not None and torch._C._dispatch_has_computed_kernel_for_dispatch_key(
        op.name(), key
    )


def has_native_kernel(dispatch_key: str) -> bool:
    """Whether kernels._C registered the native ops for `dispatch_key` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        OPS["native"].depthwise_conv2d_fwd.name(), dispatch_key
    )


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _differentiable(function, direct, *args):
    """`function.apply(*args)` when autograd records (double backward), else `direct(*args[1:])`,
    the op itself, without a Function's overhead."""
    if torch.is_grad_enabled():
        return function.apply(*args)
    return direct(*args[1:])


class DepthwiseConv2d(torch.autograd.Function):
    """depthwise_conv2d_fwd of an OpSet. The input is saved only when the weight needs a gradient
    and the weight only when the input does. The backward ops are linear in both arguments, so
    their own gradients are depthwise ops again: double backward runs the same kernels."""

    @staticmethod
    def forward(ctx, ops: OpSet, input, weight, bias, stride, padding, dilation):
        needs_input, needs_weight = ctx.needs_input_grad[1:3]
        ctx.ops = ops
        ctx.geometry = (stride, padding, dilation)
        ctx.input_shape = input.shape
        ctx.input_format = memory_format(input)
        ctx.kernel_size = weight.shape[2:]
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        return ops.depthwise_conv2d_fwd(input, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        ops = ctx.ops
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[1:4]
        grad_input = grad_weight = grad_bias = None
        # The kernels compute in grad_output's layout; the gradients follow the input's.
        grad_output = grad_output.contiguous(memory_format=ctx.input_format)
        if needs_input:
            grad_input = _differentiable(
                DepthwiseConv2dInputGrad,
                ops.depthwise_conv2d_bwd_input,
                ops,
                grad_output,
                weight,
                ctx.input_shape,
                *ctx.geometry,
            )
        if needs_weight:
            grad_weight, grad_bias = _differentiable(
                DepthwiseConv2dWeightGrad,
                ops.depthwise_conv2d_bwd_weight,
                ops,
                grad_output,
                input,
                ctx.kernel_size,
                *ctx.geometry,
                needs_bias,
            )
        elif needs_bias:  # the bias alone needs no input
            grad_bias = grad_output.sum((0, 2, 3))
        return None, grad_input, grad_weight, grad_bias if needs_bias else None, None, None, None


class DepthwiseConv2dInputGrad(torch.autograd.Function):
    """depthwise_conv2d_bwd_input, differentiable: grad_input = conv_transpose(grad_output, w),
    whose adjoints are a forward convolution and a weight gradient with grad_grad_input in the
    input's place."""

    @staticmethod
    def forward(ctx, ops: OpSet, grad_output, weight, input_shape, stride, padding, dilation):
        ctx.ops = ops
        ctx.geometry = (stride, padding, dilation)
        ctx.save_for_backward(grad_output, weight)
        return ops.depthwise_conv2d_bwd_input(
            grad_output, weight, input_shape, stride, padding, dilation
        )

    @staticmethod
    def backward(ctx, grad_grad_input):
        grad_output, weight = ctx.saved_tensors
        ops = ctx.ops
        needs_grad_output, needs_weight = ctx.needs_input_grad[1:3]
        d_grad_output = d_weight = None
        if needs_grad_output:
            d_grad_output = DepthwiseConv2d.apply(ops, grad_grad_input, weight, None, *ctx.geometry)
        if needs_weight:
            d_weight, _ = DepthwiseConv2dWeightGrad.apply(
                ops, grad_output, grad_grad_input, weight.shape[2:], *ctx.geometry, False
            )
        return None, d_grad_output, d_weight, None, None, None, None


class DepthwiseConv2dWeightGrad(torch.autograd.Function):
    """depthwise_conv2d_bwd_weight, differentiable: its adjoints are a forward convolution of the
    input with grad_grad_weight (+ grad_grad_bias) and an input gradient of it."""

    @staticmethod
    def forward(
        ctx, ops: OpSet, grad_output, input, kernel_size, stride, padding, dilation, compute_bias
    ):
        ctx.ops = ops
        ctx.geometry = (stride, padding, dilation)
        ctx.kernel_size = kernel_size
        ctx.compute_bias = compute_bias
        ctx.save_for_backward(grad_output, input)
        grad_weight, grad_bias = ops.depthwise_conv2d_bwd_weight(
            grad_output, input, kernel_size, stride, padding, dilation, compute_bias
        )
        if not compute_bias:
            ctx.mark_non_differentiable(grad_bias)
        return grad_weight, grad_bias

    @staticmethod
    def backward(ctx, grad_grad_weight, grad_grad_bias):
        grad_output, input = ctx.saved_tensors
        ops = ctx.ops
        needs_grad_output, needs_input = ctx.needs_input_grad[1:3]
        if grad_grad_weight is None:
            grad_grad_weight = input.new_zeros(input.shape[1], 1, *ctx.kernel_size)
        bias = grad_grad_bias if ctx.compute_bias else None
        d_grad_output = d_input = None
        if needs_grad_output:
            d_grad_output = DepthwiseConv2d.apply(ops, input, grad_grad_weight, bias, *ctx.geometry)
        if needs_input:
            d_input = DepthwiseConv2dInputGrad.apply(
                ops, grad_output, grad_grad_weight, input.shape, *ctx.geometry
            )
        return None, d_grad_output, d_input, None, None, None, None, None


class BnActCall(NamedTuple):
    """A fused op's non-tensor half: its forward op, its backward op (of the same OpSet) and the
    arguments that are not tensors (`geometry`: a depthwise convolution's stride, padding and
    dilation; empty for the 1x1 one). A tuple, as cheap to build per call as anything is."""

    fwd: OpOverload
    bwd: OpOverload
    geometry: tuple
    training: bool
    momentum: float | None
    eps: float
    activation: str


def bn_act_forward(
    call: BnActCall, input, weight, bn_weight, bn_bias, running_mean, running_var, nbt
):
    """(output, [2, C] statistics) of the fused forward op `call.fwd`."""
    return call.fwd(
        input,
        weight,
        *call.geometry,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        nbt,
        call.training,
        call.momentum,
        call.eps,
        call.activation,
    )


def bn_act_backward(call: BnActCall, grad_output, input, weight, bn_weight, bn_bias, stats, mask):
    """(grad input, weight, bn_weight, bn_bias) of the fused backward op `call.bwd`, each
    computed where `mask` says."""
    return call.bwd(
        grad_output,
        input,
        weight,
        *call.geometry,
        bn_weight,
        bn_bias,
        stats,
        call.training,
        call.eps,
        call.activation,
        mask,
    )


class BnAct(torch.autograd.Function):
    """A fused convolution + BatchNorm + activation op, `call` its ops and options. Autograd keeps
    the input, the weights and the [2, C] statistics: the backward op recomputes the convolution,
    the BN output and the activation mask."""

    @staticmethod
    def forward(
        ctx, call: BnActCall, input, weight, bn_weight, bn_bias, running_mean, running_var, nbt
    ):
        out, stats = bn_act_forward(
            call, input, weight, bn_weight, bn_bias, running_mean, running_var, nbt
        )
        ctx.call = call
        ctx.save_for_backward(input, weight, bn_weight, bn_bias, stats)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bn_weight, bn_bias, stats = ctx.saved_tensors
        call = ctx.call
        mask = list(ctx.needs_input_grad[1:5])  # input, weight, bn_weight, bn_bias
        grads = bn_act_backward(call, grad_output, input, weight, bn_weight, bn_bias, stats, mask)
        return (None, *(g if wanted else None for g, wanted in zip(grads, mask)), None, None, None)


class ChainStage(NamedTuple):
    """One stage of a BnActChain: its fused ops and options, and whether the chain keeps this
    stage's input for backward (the chain input is always kept; an input not kept is recomputed
    from the previous stage's)."""

    call: BnActCall
    keep_input: bool


# BnActChain.apply's arguments before the stages' tensors: the stages, the input's recomputation
# (None: keep the input), the input.
_CHAIN_INPUT = 2
_CHAIN_FIRST_TENSOR = 3


# The tensors of a stage, in the order BnActChain takes them.
CHAIN_STAGE_TENSORS = (
    "weight",
    "bn_weight",
    "bn_bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
)


class BnActChain(torch.autograd.Function):
    """A run of fused convolution + BatchNorm + activation stages as one autograd unit.

    The forward runs each stage's forward op (the running statistics move once, there) and
    keeps the chain input, the stages' weights, each stage's [2, C] statistics and the inputs of
    the stages marked keep_input. The backward recomputes the other stage inputs from the
    previous stage's as the forward computed them (the running statistics do not move again),
    then runs each stage's backward op from the last to the first. `tensors` are
    CHAIN_STAGE_TENSORS for every stage in turn. Given `recompute_input` (a callable that returns
    the input again, bit for bit), the chain keeps no reference to its input and calls that in
    backward instead."""

    @staticmethod
    def forward(ctx, stages: tuple, recompute_input, input, *tensors):
        per_stage = len(CHAIN_STAGE_TENSORS)
        x = input
        kept, weights, stats = [input if recompute_input is None else None], [], []
        for index, stage in enumerate(stages):
            w, bn_w, bn_b, rm, rv, nbt = tensors[index * per_stage : (index + 1) * per_stage]
            if index > 0:
                kept.append(x if stage.keep_input else None)
            x, stage_stats = bn_act_forward(stage.call, x, w, bn_w, bn_b, rm, rv, nbt)
            weights += (w, bn_w, bn_b)
            stats.append(stage_stats)
        ctx.stages = stages
        ctx.recompute_input = recompute_input
        ctx.save_for_backward(*kept, *weights, *stats)
        return x

    @staticmethod
    def backward(ctx, grad_output):
        stages = ctx.stages
        count = len(stages)
        saved = ctx.saved_tensors
        inputs = list(saved[:count])
        weights = saved[count : 4 * count]
        stats = saved[4 * count :]
        if inputs[0] is None:
            inputs[0] = ctx.recompute_input()
        for index in range(1, count):
            if inputs[index] is None:  # recompute it, as the forward computed it
                call = stages[index - 1].call
                w, bn_w, bn_b = weights[3 * (index - 1) : 3 * index]
                # A training stage normalises with the batch's statistics again (no running
                # statistics to update): the same values in the same order give the forward's
                # output bit for bit, which an eval-mode call with the saved statistics would
                # not (its scale and shift come from the saved, rounded statistics), and over a
                # few values per channel BN amplifies any difference. An eval stage takes its
                # saved running statistics.
                mean, var = (None, None) if call.training else stats[index - 1]
                inputs[index], _ = bn_act_forward(
                    call, inputs[index - 1], w, bn_w, bn_b, mean, var, None
                )
        per_stage = len(CHAIN_STAGE_TENSORS)
        needs = ctx.needs_input_grad
        grads = [None] * (len(needs))
        grad = grad_output
        for index in reversed(range(count)):
            # This stage's weight in the Function's inputs.
            first = _CHAIN_FIRST_TENSOR + index * per_stage
            earlier = needs[_CHAIN_INPUT] or any(
                any(needs[start : start + 3])
                for start in range(_CHAIN_FIRST_TENSOR, first, per_stage)
            )
            mask = [earlier, *needs[first : first + 3]]
            if not any(mask):
                continue
            w, bn_w, bn_b = weights[3 * index : 3 * index + 3]
            results = bn_act_backward(
                stages[index].call, grad, inputs[index], w, bn_w, bn_b, stats[index], mask
            )
            inputs[index] = None  # its memory goes back as soon as the stage is done
            for offset, (result, wanted) in enumerate(zip(results[1:], mask[1:])):
                grads[first + offset] = result if wanted else None
            grad = results[0] if earlier else None
        grads[_CHAIN_INPUT] = grad if needs[_CHAIN_INPUT] else None
        return tuple(grads)
