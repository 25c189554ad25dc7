"""Every bad input raises an exception naming the argument; odd but valid inputs
(empty batch, non-contiguous, channels_last, NaN) are computed like the reference."""

import pytest
import torch

import kernels

from .common import backend_param, backend_params, ops

x = torch.randn(2, 4, 8, 8)
w = torch.randn(4, 1, 3, 3)
b = torch.randn(4)

BAD = [
    # (description, args, kwargs, exception type, words the message must contain)
    ("input rank", (x[0], w), {}, ValueError, ["input", "4-D"]),
    ("weight rank", (x, w[:, 0]), {}, ValueError, ["weight", "4-D"]),
    ("channel mismatch", (x, torch.randn(3, 1, 3, 3)), {}, ValueError, ["weight", "channels"]),
    ("grouped weight", (x, torch.randn(4, 2, 3, 3)), {}, ValueError, ["weight", "[C, 1, kH, kW]"]),
    ("bias shape", (x, w, torch.randn(5)), {}, ValueError, ["bias"]),
    ("integer dtype", (x.long(), w.long()), {}, TypeError, ["input", "dtype"]),
    ("mixed dtypes", (x, w.double()), {}, TypeError, ["weight", "dtype"]),
    ("mixed bias dtype", (x, w, b.half()), {}, TypeError, ["bias", "dtype"]),
    ("not a tensor", (x.numpy(), w), {}, TypeError, ["input", "Tensor"]),
    ("zero stride", (x, w), {"stride": 0}, ValueError, ["stride", "positive"]),
    ("negative stride", (x, w), {"stride": (1, -1)}, ValueError, ["stride"]),
    ("zero dilation", (x, w), {"dilation": 0}, ValueError, ["dilation", "positive"]),
    ("negative padding", (x, w), {"padding": -1}, ValueError, ["padding", "non-negative"]),
    ("bad padding string", (x, w), {"padding": "full"}, ValueError, ["padding"]),
    ("same with stride", (x, w), {"padding": "same", "stride": 2}, ValueError, ["same", "stride"]),
    ("float stride", (x, w), {"stride": 1.5}, TypeError, ["stride"]),
    ("three strides", (x, w), {"stride": (1, 1, 1)}, TypeError, ["stride"]),
    (
        "kernel larger than padded input",
        (torch.randn(1, 4, 2, 2), torch.randn(4, 1, 5, 5)),
        {"padding": 1},
        ValueError,
        ["kernel", "padded input"],
    ),
    ("empty spatial size", (torch.randn(1, 4, 0, 8), w), {}, ValueError, ["padded input"]),
    ("unknown backend", (x, w), {"backend": "cudnn"}, ValueError, ["backend"]),
]


@pytest.mark.parametrize("backend", [None, "torch", "native"])
@pytest.mark.parametrize("what,args,kwargs,exc,words", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(what, args, kwargs, exc, words, backend):
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(exc) as info:
        kernels.depthwise_conv2d(*args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="weight is on cuda"):
        kernels.depthwise_conv2d(x, w.cuda())


@pytest.mark.parametrize("backend", backend_params("cpu")[:1])
def test_empty_spatial_output_with_1x1_kernel_and_empty_batch(backend):
    out = kernels.depthwise_conv2d(
        torch.randn(0, 4, 3, 3), torch.randn(4, 1, 1, 1), backend=backend
    )
    assert out.shape == (0, 4, 3, 3)


# An empty input whose padded output is not: the native CPU loops, the CUDA thread programs on
# the host, and the CUDA kernels (where a launch of 0 blocks is an invalid configuration).
EMPTY_INPUT_BACKENDS = [
    backend_param("native", "cpu"),
    pytest.param("host_programs", "cpu", id="host_programs-cpu"),
    backend_param("native", "cuda"),
]


@pytest.mark.parametrize("backend,device", EMPTY_INPUT_BACKENDS)
def test_empty_input_with_a_padded_output(backend, device):
    """Input [1, 4, 0, 5], a 1x1 kernel, padding 1: the output [1, 4, 2, 7] is the bias, the
    input gradient is empty (its kernel has no thread to run) and the weight gradient zero."""
    x = torch.randn(1, 4, 0, 5, device=device, requires_grad=True)
    w = torch.randn(4, 1, 1, 1, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    out = kernels.depthwise_conv2d(x, w, b, padding=1, backend=backend)
    # F.conv2d refuses an empty spatial input; padded first, the input is not empty.
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), w, b, groups=4)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    for name, g, r in zip(("input", "weight", "bias"), got, want):
        torch.testing.assert_close(g, r, msg=name)
    op = ops(backend).depthwise_conv2d_bwd_input
    assert op(grad, w, [1, 4, 0, 5], [1, 1], [1, 1, 1, 1], [1, 1]).shape == (1, 4, 0, 5)


@pytest.mark.parametrize("backend,device", EMPTY_INPUT_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_depthwise_ops_of_an_empty_input_with_a_padded_output(backend, device, layout):
    """The same geometry through the fused depthwise ops (called directly: the public function
    gives an empty input to the reference), a training step: the convolution is zero, so BN's
    variance is 0 and the output beta; the input gradient is empty."""
    x = torch.randn(2, 4, 0, 5, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 1, 1, device=device)
    bn_w, bn_b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])
    fwd, bwd = ops(backend).depthwise_bn_act_fwd, ops(backend).depthwise_bn_act_bwd
    out, stats = fwd(x, w, *geometry, bn_w, bn_b, rm, rv, None, True, 0.1, 1e-5, "relu")
    grad = torch.randn_like(out)
    grads = bwd(grad, x, w, *geometry, bn_w, bn_b, stats, True, 1e-5, "relu", [True] * 4)

    leaves = [t.clone().requires_grad_() for t in (x, w, bn_w, bn_b)]
    want_rm, want_rv = torch.zeros_like(rm), torch.ones_like(rv)
    want = kernels.depthwise_bn_act(
        torch.nn.functional.pad(leaves[0], (1, 1, 1, 1)),
        leaves[1],
        want_rm,
        want_rv,
        leaves[2],
        leaves[3],
        training=True,
        backend="torch",
    )
    want_grads = torch.autograd.grad(want, leaves, grad)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close((rm, rv), (want_rm, want_rv))
    for name, got, expected in zip(("input", "weight", "bn_weight", "bn_bias"), grads, want_grads):
        torch.testing.assert_close(got, expected, msg=name)
    assert grads[0].shape == (2, 4, 0, 5)


def test_direct_op_call_with_bad_geometry_raises_instead_of_crashing():
    """The C++ ops check for themselves: torch.ops users bypass the Python validation."""
    op = ops("native").depthwise_conv2d_fwd
    with pytest.raises(RuntimeError, match="stride must be positive"):
        op(x, w, None, [0, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="weight must be"):
        op(x, torch.randn(3, 1, 3, 3), None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        op(x, torch.randn(4, 1, 9, 9), None, [1, 1], [0, 0, 0, 0], [1, 1])


@pytest.mark.parametrize("backend", backend_params("cpu")[:1])
def test_expanded_and_sliced_tensors_are_computed_correctly(backend):
    """Stride-0 (expanded) input and bias, and a strided weight, give the reference result."""
    x = torch.randn(1, 4, 6, 7).expand(3, 4, 6, 7)
    weight = torch.randn(4, 1, 3, 6)[..., ::2]
    bias = torch.randn(1).expand(4)
    out = kernels.depthwise_conv2d(x, weight, bias, padding=1, backend=backend)
    ref = torch.nn.functional.conv2d(x, weight, bias, 1, 1, 1, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
