"""The op library: every op's schema (defined once, here), its fake kernel, and its autograd.

Layering (STYLE.md): kernels (csrc/ and triton_*.py) -> registered ops without autograd (here
and the triton_op definitions) -> autograd registrations (here) -> the public functions and
nn.Modules. The "native" implementations are registered for CPU and CUDA by kernels._C.
"""

import torch

from ._layout import memory_format

_LIB = torch.library.Library("depsep", "DEF")  # noqa: TOR901 (one DEF library for the namespace)
_FIXED_LAYOUT = (torch.Tag.needs_fixed_stride_order,)

# The native depthwise ops, and their "_host_programs_" twins: CPU-only, test-only entry
# points that run the CUDA kernels' thread programs on the host (csrc/depthwise/).
NATIVE_DEPTHWISE_PREFIXES = ("", "_host_programs_")
for _prefix in NATIVE_DEPTHWISE_PREFIXES:
    _LIB.define(
        f"{_prefix}depthwise_conv2d_fwd(Tensor input, Tensor weight, Tensor? bias, "
        "int[2] stride, int[4] padding, int[2] dilation) -> Tensor",
        tags=_FIXED_LAYOUT,
    )
    _LIB.define(
        f"{_prefix}depthwise_conv2d_bwd_input(Tensor grad_output, Tensor weight, "
        "int[4] input_shape, int[2] stride, int[4] padding, int[2] dilation) -> Tensor",
        tags=_FIXED_LAYOUT,
    )
    _LIB.define(
        f"{_prefix}depthwise_conv2d_bwd_weight(Tensor grad_output, Tensor input, "
        "int[2] kernel_size, int[2] stride, int[4] padding, int[2] dilation, "
        "bool compute_bias) -> (Tensor, Tensor)",
        tags=_FIXED_LAYOUT,
    )


def has_native_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"depsep::{op}", dispatch_key)


def conv_output_size(size: int, pad_begin: int, pad_end: int, k: int, stride: int, dilation: int):
    return (size + pad_begin + pad_end - dilation * (k - 1) - 1) // stride + 1


def _depthwise_output_shape(input_shape, kernel_size, stride, padding, dilation):
    n, c, h, w = input_shape
    oh = conv_output_size(h, padding[0], padding[1], kernel_size[0], stride[0], dilation[0])
    ow = conv_output_size(w, padding[2], padding[3], kernel_size[1], stride[1], dilation[1])
    torch._check(oh > 0 and ow > 0, lambda: "depsep: kernel larger than the padded input")
    return (n, c, oh, ow)


def _depthwise_conv2d_fwd_fake(input, weight, bias, stride, padding, dilation):
    torch._check(input.dim() == 4, lambda: "depsep: input must be 4-D")
    torch._check(
        tuple(weight.shape[:2]) == (input.shape[1], 1),
        lambda: f"depsep: weight must be [C, 1, kH, kW], got {tuple(weight.shape)}",
    )
    torch._check(weight.dtype == input.dtype, lambda: "depsep: weight dtype must match input")
    shape = _depthwise_output_shape(input.shape, weight.shape[2:], stride, padding, dilation)
    return input.new_empty(shape).contiguous(memory_format=memory_format(input))


def _depthwise_conv2d_bwd_input_fake(grad_output, weight, input_shape, stride, padding, dilation):
    torch._check(grad_output.dim() == 4, lambda: "depsep: grad_output must be 4-D")
    expected = _depthwise_output_shape(input_shape, weight.shape[2:], stride, padding, dilation)
    torch._check(
        tuple(grad_output.shape) == expected,
        lambda: f"depsep: grad_output must be {expected}, got {tuple(grad_output.shape)}",
    )
    return grad_output.new_empty(input_shape).contiguous(memory_format=memory_format(grad_output))


def _depthwise_conv2d_bwd_weight_fake(
    grad_output, input, kernel_size, stride, padding, dilation, compute_bias
):
    expected = _depthwise_output_shape(input.shape, kernel_size, stride, padding, dilation)
    torch._check(
        tuple(grad_output.shape) == expected,
        lambda: f"depsep: grad_output must be {expected}, got {tuple(grad_output.shape)}",
    )
    channels = input.shape[1]
    grad_weight = input.new_empty((channels, 1, *kernel_size))
    return grad_weight, input.new_empty((channels if compute_bias else 0,))


def _register_depthwise_autograd(prefix: str) -> None:
    """Autograd of one backend's three depthwise ops ("depsep::{prefix}depthwise_conv2d_*").

    The forward saves the input only when the weight needs a gradient and the weight only when
    the input does. The two backward ops are linear in both arguments, so their own gradients
    are depthwise ops again: double backward works through the same kernels.
    """
    ns = torch.ops.depsep
    fwd = getattr(ns, f"{prefix}depthwise_conv2d_fwd").default
    bwd_input = getattr(ns, f"{prefix}depthwise_conv2d_bwd_input").default
    bwd_weight = getattr(ns, f"{prefix}depthwise_conv2d_bwd_weight").default

    def fwd_setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation = inputs
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        ctx.geometry = (list(stride), list(padding), list(dilation))
        ctx.input_shape = list(input.shape)
        ctx.input_format = memory_format(input)
        ctx.kernel_size = list(weight.shape[2:])
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)

    def fwd_backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        # The kernels compute in grad_output's layout; the gradients follow the input's.
        grad_output = grad_output.contiguous(memory_format=ctx.input_format)
        if needs_input:
            grad_input = bwd_input(grad_output, weight, ctx.input_shape, *ctx.geometry)
        if needs_weight:
            grad_weight, grad_bias = bwd_weight(
                grad_output, input, ctx.kernel_size, *ctx.geometry, needs_bias
            )
        elif needs_bias:  # the bias alone needs no input
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias if needs_bias else None, None, None, None

    def bwd_input_setup_context(ctx, inputs, output):
        grad_output, weight, input_shape, stride, padding, dilation = inputs
        ctx.geometry = (list(stride), list(padding), list(dilation))
        ctx.kernel_size = list(weight.shape[2:])
        ctx.save_for_backward(grad_output, weight)

    def bwd_input_backward(ctx, grad_grad_input):
        grad_output, weight = ctx.saved_tensors
        needs_grad_output, needs_weight = ctx.needs_input_grad[:2]
        # grad_input = conv_transpose(grad_output, weight): its adjoints are a forward
        # convolution and a weight gradient with grad_grad_input in the input's place.
        d_grad_output = d_weight = None
        if needs_grad_output:
            d_grad_output = fwd(grad_grad_input, weight, None, *ctx.geometry)
        if needs_weight:
            d_weight, _ = bwd_weight(
                grad_output, grad_grad_input, ctx.kernel_size, *ctx.geometry, False
            )
        return d_grad_output, d_weight, None, None, None, None

    def bwd_weight_setup_context(ctx, inputs, output):
        grad_output, input, kernel_size, stride, padding, dilation, compute_bias = inputs
        ctx.geometry = (list(stride), list(padding), list(dilation))
        ctx.input_shape = list(input.shape)
        ctx.kernel_size = list(kernel_size)
        ctx.compute_bias = compute_bias
        ctx.save_for_backward(grad_output, input)

    def bwd_weight_backward(ctx, grad_grad_weight, grad_grad_bias):
        grad_output, input = ctx.saved_tensors
        needs_grad_output, needs_input = ctx.needs_input_grad[:2]
        if grad_grad_weight is None:
            grad_grad_weight = input.new_zeros(input.shape[1], 1, *ctx.kernel_size)
        use_bias = ctx.compute_bias and grad_grad_bias is not None
        d_grad_output = d_input = None
        if needs_grad_output:
            bias = grad_grad_bias if use_bias else None
            d_grad_output = fwd(input, grad_grad_weight, bias, *ctx.geometry)
        if needs_input:
            d_input = bwd_input(grad_output, grad_grad_weight, ctx.input_shape, *ctx.geometry)
        return d_grad_output, d_input, None, None, None, None, None

    torch.library.register_autograd(fwd, fwd_backward, setup_context=fwd_setup_context)
    torch.library.register_autograd(
        bwd_input, bwd_input_backward, setup_context=bwd_input_setup_context
    )
    torch.library.register_autograd(
        bwd_weight, bwd_weight_backward, setup_context=bwd_weight_setup_context
    )


for _prefix in NATIVE_DEPTHWISE_PREFIXES:
    torch.library.register_fake(
        f"depsep::{_prefix}depthwise_conv2d_fwd", _depthwise_conv2d_fwd_fake
    )
    torch.library.register_fake(
        f"depsep::{_prefix}depthwise_conv2d_bwd_input", _depthwise_conv2d_bwd_input_fake
    )
    torch.library.register_fake(
        f"depsep::{_prefix}depthwise_conv2d_bwd_weight", _depthwise_conv2d_bwd_weight_fake
    )
    _register_depthwise_autograd(_prefix)


def _load_triton_ops():
    """Imports the Triton ops (their schemas come from triton_op) and wires their autograd.
    Returns why not when Triton is missing or broken; the other backends do not need it."""
    try:
        from . import triton_depthwise  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return f"Triton is not usable ({type(exc).__name__}: {exc})"
    _register_depthwise_autograd("triton_")
    return None


TRITON_IMPORT_ERROR = _load_triton_ops()
