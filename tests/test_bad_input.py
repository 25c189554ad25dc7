"""Every bad input raises an exception naming the argument; odd but valid inputs
(empty batch, non-contiguous, channels_last, NaN) are computed like the reference."""

import pytest
import torch

import kernels

from .common import backend_params, ops

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
