"""depthwise_pointwise_eval, the one-pass depthwise-separable block in eval, where a backend has
it: against a float64 run of the reference block (depthwise conv, BN, activation, 1x1 conv, BN,
activation) over geometries, layouts, dtypes, activations and tiles that split the output rows;
opcheck; the errors of a direct call; and DepSepConv's eval under no_grad running it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mobilenet
from kernels import _ops
from kernels.reference import bn_act, depthwise_conv, pointwise_conv

from .common import ACCURACY, assert_close_to_exact

# Backends whose op set has a CPU kernel of the block op.
BLOCK_BACKENDS = [
    name
    for name in ("native", "triton")
    if _ops.OPS[name].depthwise_pointwise_eval is not None
    and _ops.has_kernel(_ops.OPS[name].depthwise_pointwise_eval, torch.device("cpu"))
]


def test_native_has_the_block_op_on_cpu():
    assert "native" in BLOCK_BACKENDS


def _block_tensors(c, c_out, kernel, affine, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def bn(channels):
        return [
            torch.randn(channels, generator=gen) * 0.2,  # running mean
            torch.rand(channels, generator=gen) + 0.5,  # running var
            (torch.rand(channels, generator=gen) + 0.5) if affine else None,
            (torch.randn(channels, generator=gen) * 0.2) if affine else None,
        ]

    dw_w = (torch.randn(c, 1, *kernel, generator=gen) / kernel[0]).to(dtype)
    pw_w = (torch.randn(c_out, c, 1, 1, generator=gen) / c**0.5).to(dtype)
    return dw_w, bn(c), pw_w, bn(c_out)


def _call(op, x, dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, acts, eps=(1e-5, 1e-3)):
    dw_rm, dw_rv, dw_g, dw_b = dw_bn
    pw_rm, pw_rv, pw_g, pw_b = pw_bn
    return op(
        *(x, dw_w, stride, padding, dilation, dw_g, dw_b, dw_rm, dw_rv, eps[0], acts[0]),
        *(pw_w, pw_g, pw_b, pw_rm, pw_rv, eps[1], acts[1]),
    )


def _reference(x, dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, acts, eps=(1e-5, 1e-3)):
    def double(t):
        return None if t is None else t.double()

    def bn(y, vectors, eps, act):
        rm, rv, g, b = map(double, vectors)
        return bn_act(y, rm, rv, g, b, None, False, 0.0, eps, act)

    top, bottom, left, right = padding
    x = torch.nn.functional.pad(x.double(), (left, right, top, bottom))
    y = bn(depthwise_conv(x, dw_w.double(), None, stride, 0, dilation), dw_bn, eps[0], acts[0])
    return bn(pointwise_conv(y, pw_w.double()), pw_bn, eps[1], acts[1])


# (N, C, H, W, C_out, kernel, stride, padding [t, b, l, r], dilation)
GEOMETRIES = {
    "3x3-s1": (2, 8, 9, 7, 12, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "3x3-s2": (2, 16, 10, 10, 8, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "5x3-d2-asym": (1, 4, 11, 9, 6, (5, 3), (1, 2), (4, 3, 2, 1), (2, 1)),
    # 40 x 64 float32 values a row: the 128 KiB tiles hold 512 pixels, 12 rows, so 80 rows
    # make 7 tiles, the last partial.
    "many-tiles": (2, 64, 40, 40, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
}
ACTIVATION_PAIRS = [("relu", "relu"), ("relu6", "none"), ("none", "relu6"), ("silu", "hardswish")]


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_block_matches_the_reference_block(backend, geometry, dtype, layout):
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES[geometry]
    affine = geometry != "3x3-s2"
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, affine, dtype)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1)).to(dtype)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    op = _ops.OPS[backend].depthwise_pointwise_eval
    for acts in ACTIVATION_PAIRS:
        args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, acts)
        got = _call(op, x, *args)
        assert got.dtype == dtype
        assert got.is_contiguous(memory_format=memory_format)
        exact = _reference(x, *args)
        assert_close_to_exact(got, exact, ACCURACY[dtype], f"{geometry} {acts}")


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_an_error_in_one_output_channel_fails(backend):
    """The comparison can fail: 5% off in one BN scale of the 1x1 stage is caught."""
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s1"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, ("relu", "none"))
    exact = _reference(x, *args)
    pw_bn[2][3] *= 1.05
    got = _call(_ops.OPS[backend].depthwise_pointwise_eval, x, *args)
    with pytest.raises(AssertionError):
        assert_close_to_exact(got, exact, ACCURACY[torch.float32])


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_opcheck(backend):
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s2"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    dw_rm, dw_rv, dw_g, dw_b = dw_bn
    pw_rm, pw_rv, pw_g, pw_b = pw_bn
    args = (x, dw_w, list(stride), list(padding), list(dilation), dw_g, dw_b, dw_rm, dw_rv, 1e-5)
    args += ("relu", pw_w, pw_g, pw_b, pw_rm, pw_rv, 1e-5, "relu6")
    torch.library.opcheck(_ops.OPS[backend].depthwise_pointwise_eval, args)


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_direct_call_errors_name_the_argument(backend):
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s1"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32)
    x = torch.randn(n, c, h, w)
    op = _ops.OPS[backend].depthwise_pointwise_eval
    geometry = (stride, padding, dilation)
    with pytest.raises(RuntimeError, match="pw_weight must be"):
        _call(op, x, dw_w, dw_bn, pw_w[:, :-1], pw_bn, *geometry, ("relu", "relu"))
    with pytest.raises(RuntimeError, match="pw_running_var must have shape"):
        short = [pw_bn[0], pw_bn[1][:-1], *pw_bn[2:]]
        _call(op, x, dw_w, dw_bn, pw_w, short, *geometry, ("relu", "relu"))
    with pytest.raises(RuntimeError, match="dw_bn_weight must have shape"):
        short = [*dw_bn[:2], dw_bn[2][:-1], dw_bn[3]]
        _call(op, x, dw_w, short, pw_w, pw_bn, *geometry, ("relu", "relu"))
    with pytest.raises(RuntimeError, match="activation must be"):
        _call(op, x, dw_w, dw_bn, pw_w, pw_bn, *geometry, ("gelu", "relu"))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
def test_depsepconv_eval_runs_the_block_op(backend):
    """DepSepConv in eval under no_grad is the one op, with the result of its two fused halves."""
    torch.manual_seed(0)
    block = mobilenet.DepSepConv(8, 16, 2, backend=backend).eval()
    for bn in (block.depthwise[1], block.pointwise[1]):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with _OpNames() as mode:
            got = block(x)
        halves = block.pointwise(block.depthwise(x))
    assert mode.names == [_ops.OPS[backend].depthwise_pointwise_eval.name()]
    torch.testing.assert_close(got, halves, atol=1e-5, rtol=1e-5)
