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


# The fused convolution + BatchNorm + activation ops, per backend prefix ("" native, "triton_").
# The forward returns the output and the per-channel mean and biased variance it normalised with
# (the batch's in training, the running statistics in eval), in float32 (float64 for float64
# input); the caller updates the running statistics from them. The backward recomputes the
# convolution, the BN output and the activation mask from the input: autograd keeps the input,
# the weights and those two vectors, no other activation-sized tensor.
FUSED_CONVS = {
    "pointwise": "",
    "depthwise": "int[2] stride, int[4] padding, int[2] dilation, ",
}
ACTIVATIONS = ("relu", "relu6", "none")


def define_bn_act_ops(prefix: str, convs=tuple(FUSED_CONVS)) -> None:
    """Defines the schemas of one backend's fused ops (the native ones, or for a test)."""
    for conv in convs:
        geometry = FUSED_CONVS[conv]
        _LIB.define(
            f"{prefix}{conv}_bn_act_fwd(Tensor input, Tensor weight, {geometry}"
            "Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, "
            "bool training, float eps, str activation) -> (Tensor, Tensor, Tensor)",
            tags=_FIXED_LAYOUT,
        )
        _LIB.define(
            f"{prefix}{conv}_bn_act_bwd(Tensor grad_output, Tensor input, Tensor weight, "
            f"{geometry}Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, "
            "bool training, float eps, str activation, bool[4] output_mask) "
            "-> (Tensor, Tensor, Tensor, Tensor)",
            tags=_FIXED_LAYOUT,
        )


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-channel statistics a fused op returns: its accumulation type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_output_shape(conv, input, weight, geometry):
    if conv == "pointwise":
        torch._check(
            tuple(weight.shape[1:]) == (input.shape[1], 1, 1),
            lambda: f"depsep: weight must be [C_out, {input.shape[1]}, 1, 1]",
        )
        return (input.shape[0], weight.shape[0], input.shape[2], input.shape[3])
    torch._check(
        tuple(weight.shape[:2]) == (input.shape[1], 1),
        lambda: f"depsep: weight must be [C, 1, kH, kW], got {tuple(weight.shape)}",
    )
    return _depthwise_output_shape(input.shape, weight.shape[2:], *geometry)


def _bn_act_fwd_fake(conv):
    def fake(input, weight, *args):
        geometry = args[:3] if conv == "depthwise" else ()
        torch._check(input.dim() == 4, lambda: "depsep: input must be 4-D")
        torch._check(weight.dtype == input.dtype, lambda: "depsep: weight dtype must match input")
        shape = _fused_output_shape(conv, input, weight, geometry)
        out = input.new_empty(shape).contiguous(memory_format=memory_format(input))
        stats = input.new_empty((shape[1],), dtype=stats_dtype(input.dtype))
        return out, stats, torch.empty_like(stats)

    return fake


def _bn_act_bwd_fake(conv):
    def fake(grad_output, input, weight, *args):
        geometry = args[:3] if conv == "depthwise" else ()
        bn_weight, bn_bias = args[len(geometry) : len(geometry) + 2]
        output_mask = args[-1]
        expected = _fused_output_shape(conv, input, weight, geometry)
        torch._check(
            tuple(grad_output.shape) == expected,
            lambda: f"depsep: grad_output must be {expected}, got {tuple(grad_output.shape)}",
        )
        channels = expected[1]
        grads = (
            input.new_empty(input.shape).contiguous(memory_format=memory_format(input)),
            torch.empty_like(weight),
            input.new_empty(
                (channels,), dtype=bn_weight.dtype if bn_weight is not None else input.dtype
            ),
            input.new_empty(
                (channels,), dtype=bn_bias.dtype if bn_bias is not None else input.dtype
            ),
        )
        return tuple(g if wanted else g.new_empty((0,)) for g, wanted in zip(grads, output_mask))

    return fake


def _register_bn_act_autograd(prefix: str, conv: str) -> None:
    """Autograd of "depsep::{prefix}{conv}_bn_act_fwd": its backward op computes every gradient
    from the saved input, weights and per-channel statistics (nothing activation-sized saved
    but the input). The statistics outputs are not differentiable."""
    ns = torch.ops.depsep
    fwd = getattr(ns, f"{prefix}{conv}_bn_act_fwd").default
    bwd = getattr(ns, f"{prefix}{conv}_bn_act_bwd").default
    n_geometry = 3 if conv == "depthwise" else 0

    def setup_context(ctx, inputs, output):
        input, weight = inputs[:2]
        geometry = inputs[2 : 2 + n_geometry]
        bn_weight, bn_bias, _, _, training, eps, activation = inputs[2 + n_geometry :]
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.geometry = [list(g) for g in geometry]
        ctx.options = (training, eps, activation)
        ctx.save_for_backward(input, weight, bn_weight, bn_bias, mean, var)

    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, bn_weight, bn_bias, mean, var = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:2]) + list(
            ctx.needs_input_grad[2 + n_geometry : 4 + n_geometry]
        )
        grads = bwd(
            grad_output.contiguous(memory_format=memory_format(input)),
            input,
            weight,
            *ctx.geometry,
            bn_weight,
            bn_bias,
            mean,
            var,
            *ctx.options,
            mask,
        )
        grads = [g if wanted else None for g, wanted in zip(grads, mask)]
        return (*grads[:2], *([None] * n_geometry), *grads[2:], None, None, None, None, None)

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def register_bn_act_ops(prefix: str, fakes: bool = True, convs=tuple(FUSED_CONVS)) -> None:
    """Autograd, and the fakes unless triton_op brings its own, of one backend's fused ops,
    whose schemas exist already."""
    for conv in convs:
        if fakes:
            name = f"depsep::{prefix}{conv}_bn_act"
            torch.library.register_fake(f"{name}_fwd", _bn_act_fwd_fake(conv))
            torch.library.register_fake(f"{name}_bwd", _bn_act_bwd_fake(conv))
        _register_bn_act_autograd(prefix, conv)


define_bn_act_ops("")
register_bn_act_ops("")
# The CUDA ops' code paths run on the host: CPU-only, test-only. Depthwise: the fused thread
# programs; pointwise: the GEMM block programs (or the GEMM fallback the CUDA op takes).
define_bn_act_ops("_host_programs_", convs=("pointwise", "depthwise"))
register_bn_act_ops("_host_programs_", convs=("pointwise", "depthwise"))


def _load_triton_ops():
    """Imports the Triton ops (their schemas come from triton_op) and wires their autograd.
    Returns why not when Triton is missing or broken; the other backends do not need it."""
    try:
        from . import triton_depthwise, triton_fused  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return f"Triton is not usable ({type(exc).__name__}: {exc})"
    _register_depthwise_autograd("triton_")
    register_bn_act_ops("triton_", fakes=False)
    return None


TRITON_IMPORT_ERROR = _load_triton_ops()
