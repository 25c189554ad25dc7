"""depthwise_pointwise_eval, the one-pass depthwise-separable block in eval, where a backend has
it (the native op on the CPU, the Triton op under the interpreter on tiny shapes and on a GPU):
against a float64 run of the reference block (depthwise conv, BN, activation, 1x1 conv, BN,
activation) over geometries, layouts, dtypes, activations and tiles that split the output;
opcheck; the errors of a direct call; and DepSepConv's eval under no_grad running it."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import mobilenet
from kernels import _ops
from kernels._common import memory_format
from kernels.reference import bn_act, depthwise_conv, pointwise_conv

from .common import ACCURACY, TF32_ACCURACY, assert_close_to_exact, backend_param, float32_precision

# Backends whose op set has a CPU kernel of the block op.
BLOCK_BACKENDS = [
    name
    for name in ("native", "triton")
    if _ops.OPS[name].depthwise_pointwise_eval is not None
    and _ops.has_kernel(_ops.OPS[name].depthwise_pointwise_eval, torch.device("cpu"))
]
# (backend, device) of each block op: those with a CPU kernel here (Triton's under the
# interpreter), and the Triton op on a GPU (skipped without one).
BLOCK_OPS = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in BLOCK_BACKENDS]
BLOCK_OPS.append(backend_param("triton", "cuda"))
# How each backend's direct call refuses bad arguments: TORCH_CHECK in C++, kernels/_validate.py
# in Python.
DIRECT_CALL_ERRORS = {"native": RuntimeError, "triton": (ValueError, TypeError)}


def test_native_has_the_block_op_on_cpu():
    assert "native" in BLOCK_BACKENDS


def test_triton_has_the_block_op():
    """Triton registers it with the one schema, for every device type it runs on: on the CPU
    under the interpreter (the tests), and on CUDA."""
    if kernels.available_backends("cpu")["triton"] is not None:
        pytest.skip("Triton cannot run on the CPU here")
    op = _ops.OPS["triton"].depthwise_pointwise_eval
    assert op is not None and op.name() == "depsep::triton_depthwise_pointwise_eval"
    assert "triton" in BLOCK_BACKENDS
    assert _ops.has_kernel(op, torch.device("cuda"))


def _block_tensors(c, c_out, kernel, affine, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def bn(channels):
        return [
            torch.randn(channels, generator=gen) * 0.2,  # running mean
            torch.rand(channels, generator=gen) + 0.5,  # running var
            (torch.rand(channels, generator=gen) + 0.5) if affine else None,
            (torch.randn(channels, generator=gen) * 0.2) if affine else None,
        ]

    def on_device(tensors):
        return [None if t is None else t.to(device) for t in tensors]

    dw_w = (torch.randn(c, 1, *kernel, generator=gen) / kernel[0]).to(device, dtype)
    pw_w = (torch.randn(c_out, c, 1, 1, generator=gen) / c**0.5).to(device, dtype)
    return dw_w, on_device(bn(c)), pw_w, on_device(bn(c_out))


def _block_input(n, c, h, w, dtype, layout, device="cpu"):
    """The block input in `layout`: "nchw", "channels_last", or "sliced" (every other channel
    and a column range of a wider tensor: no layout is contiguous)."""
    gen = torch.Generator().manual_seed(1)
    if layout == "sliced":
        wide = torch.randn(n, 2 * c, h, w + 3, generator=gen).to(device, dtype)
        return wide[:, ::2, :, 2:-1]
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


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
}
# Outputs that each backend's tiles split, the last tile partial.
TILED_GEOMETRIES = {
    # native: 40 x 64 float32 values a row: the 128 KiB tiles hold 512 pixels, 12 rows, so 80
    # rows make 7 tiles, the last partial.
    "many-tiles": (2, 64, 40, 40, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    # Triton under the interpreter, tiles of 32 pixels x 16 output channels, 16 input channels
    # a chunk: 40 pixels (2 images of 20) x 20 output channels in 2 x 2 tiles, each over 3
    # chunks of the 40 input channels, the last partial along each axis.
    "small-tiles": (2, 40, 5, 4, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
}
ALL_GEOMETRIES = {**GEOMETRIES, **TILED_GEOMETRIES}
ACTIVATION_PAIRS = [("relu", "relu"), ("relu6", "none"), ("none", "relu6"), ("silu", "hardswish")]


def _tiled_geometries(backend, device):
    if backend == "native":
        return ["many-tiles"]
    if device == "cpu":  # the interpreter: ~6 s a call for many-tiles
        return ["small-tiles"]
    return ["small-tiles", "many-tiles"]


def _geometry_params():
    for param in BLOCK_OPS:
        backend, device = param.values
        for geometry in [*GEOMETRIES, *_tiled_geometries(backend, device)]:
            yield pytest.param(
                backend, device, geometry, marks=param.marks, id=f"{param.id}-{geometry}"
            )


@pytest.mark.parametrize("backend, device, geometry", list(_geometry_params()))
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
def test_block_matches_the_reference_block(backend, device, geometry, dtype, layout):
    n, c, h, w, c_out, kernel, stride, padding, dilation = ALL_GEOMETRIES[geometry]
    affine = geometry != "3x3-s2"
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, affine, dtype, device=device)
    x = _block_input(n, c, h, w, dtype, layout, device)
    op = _ops.OPS[backend].depthwise_pointwise_eval
    for acts in ACTIVATION_PAIRS:
        args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, acts)
        got = _call(op, x, *args)
        assert got.dtype == dtype and got.device == x.device
        # The input's memory format, as the separate ops return it.
        assert got.is_contiguous(memory_format=memory_format(x))
        exact = _reference(x, *args)
        assert_close_to_exact(got, exact, ACCURACY[dtype], f"{geometry} {acts}")


@pytest.mark.parametrize("backend, device", BLOCK_OPS)
def test_any_input_strides(backend, device):
    """Inputs in neither layout: a batch expanded from one image (stride 0) and columns 2
    elements apart in rows of an odd length (which the Triton kernel's pixel rows do not
    address: it copies them)."""
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s1"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32, device=device)
    image = _block_input(1, c, h, w, torch.float32, "channels_last", device)
    base = torch.randn(n * c * h * (2 * w + 1), device=device)
    odd = base.as_strided((n, c, h, w), (c * h * (2 * w + 1), h * (2 * w + 1), 2 * w + 1, 2))
    op = _ops.OPS[backend].depthwise_pointwise_eval
    for x in (image.expand(n, -1, -1, -1), odd):
        args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, ("relu6", "silu"))
        got = _call(op, x, *args)
        assert got.is_contiguous(memory_format=memory_format(x))
        assert_close_to_exact(got, _reference(x, *args), ACCURACY[torch.float32])


@pytest.mark.parametrize("backend, device", [backend_param("triton", "cuda")])
def test_gpu_float32_through_tf32(backend, device):
    """With TF32 allowed for convolutions (cuDNN's default), the Triton block's float32 1x1
    product runs on tensor cores, as its 1x1 op's: judged with a TF32-sized bound."""
    n, c, h, w, c_out, kernel, stride, padding, dilation = TILED_GEOMETRIES["many-tiles"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32, device=device)
    x = _block_input(n, c, h, w, torch.float32, "channels_last", device)
    args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, ("relu6", "none"))
    with float32_precision("tf32"):
        got = _call(_ops.OPS[backend].depthwise_pointwise_eval, x, *args)
    assert_close_to_exact(got, _reference(x, *args), TF32_ACCURACY)


@pytest.mark.parametrize("backend, device", BLOCK_OPS)
def test_an_error_in_one_output_channel_fails(backend, device):
    """The comparison can fail: 5% off in one BN scale of the 1x1 stage is caught."""
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s1"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32, device=device)
    x = _block_input(n, c, h, w, torch.float32, "nchw", device)
    args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, ("relu", "none"))
    exact = _reference(x, *args)
    got = _call(_ops.OPS[backend].depthwise_pointwise_eval, x, *args)
    assert_close_to_exact(got, exact, ACCURACY[torch.float32])
    pw_bn[2][3] *= 1.05
    got = _call(_ops.OPS[backend].depthwise_pointwise_eval, x, *args)
    with pytest.raises(AssertionError):
        assert_close_to_exact(got, exact, ACCURACY[torch.float32])


def _opcheck_samples(device):
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s2"]
    geometry = (list(stride), list(padding), list(dilation))
    for layout, affine, acts in (
        ("channels_last", True, ("relu", "relu6")),
        ("nchw", False, ("none", "silu")),
    ):
        dw_w, dw_bn, pw_w, pw_bn = _block_tensors(
            c, c_out, kernel, affine, torch.float32, device=device
        )
        x = _block_input(n, c, h, w, torch.float32, layout, device)
        dw_rm, dw_rv, dw_g, dw_b = dw_bn
        pw_rm, pw_rv, pw_g, pw_b = pw_bn
        yield (
            *(x, dw_w, *geometry, dw_g, dw_b, dw_rm, dw_rv, 1e-5, acts[0]),
            *(pw_w, pw_g, pw_b, pw_rm, pw_rv, 1e-3, acts[1]),
        )


@pytest.mark.parametrize("backend, device", BLOCK_OPS)
def test_opcheck(backend, device):
    # Under the interpreter opcheck's fake-tensor checks cannot run a triton_op body (it touches
    # storage): the schema and autograd-registration checks there, all of them on the GPU.
    interpreted = backend == "triton" and device == "cpu"
    options = {"test_utils": ("test_schema", "test_autograd_registration")} if interpreted else {}
    for args in _opcheck_samples(device):
        torch.library.opcheck(_ops.OPS[backend].depthwise_pointwise_eval, args, **options)


@pytest.mark.parametrize("backend, device", BLOCK_OPS)
def test_empty_batch(backend, device):
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s2"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32, device=device)
    x = _block_input(0, c, h, w, torch.float32, "channels_last", device)
    args = (dw_w, dw_bn, pw_w, pw_bn, stride, padding, dilation, ("relu", "relu"))
    got = _call(_ops.OPS[backend].depthwise_pointwise_eval, x, *args)
    assert got.shape == (0, c_out, 5, 5) and got.dtype == x.dtype


@pytest.mark.parametrize("backend, device", BLOCK_OPS)
def test_direct_call_errors_name_the_argument(backend, device):
    n, c, h, w, c_out, kernel, stride, padding, dilation = GEOMETRIES["3x3-s1"]
    dw_w, dw_bn, pw_w, pw_bn = _block_tensors(c, c_out, kernel, True, torch.float32, device=device)
    x = _block_input(n, c, h, w, torch.float32, "nchw", device)
    op = _ops.OPS[backend].depthwise_pointwise_eval
    geometry = (stride, padding, dilation)
    relu = ("relu", "relu")
    error = DIRECT_CALL_ERRORS[backend]
    with pytest.raises(error, match=r"pw_weight (must be|has 7 input channels)"):
        _call(op, x, dw_w, dw_bn, pw_w[:, :-1], pw_bn, *geometry, relu)
    with pytest.raises(error, match="pw_weight"):
        _call(op, x, dw_w, dw_bn, pw_w.double(), pw_bn, *geometry, relu)
    with pytest.raises(error, match=r"weight (must be|has 7 filters)"):
        _call(op, x, dw_w[:-1], dw_bn, pw_w, pw_bn, *geometry, relu)
    with pytest.raises(error, match="pw_running_var must have shape"):
        short = [pw_bn[0], pw_bn[1][:-1], *pw_bn[2:]]
        _call(op, x, dw_w, dw_bn, pw_w, short, *geometry, relu)
    with pytest.raises(error, match="dw_bn_weight must have shape"):
        short = [*dw_bn[:2], dw_bn[2][:-1], dw_bn[3]]
        _call(op, x, dw_w, short, pw_w, pw_bn, *geometry, relu)
    with pytest.raises(error, match="activation must be"):
        _call(op, x, dw_w, dw_bn, pw_w, pw_bn, *geometry, ("gelu", "relu"))
    with pytest.raises(error, match="padding must be"):
        _call(op, x, dw_w, dw_bn, pw_w, pw_bn, stride, (1, 1), dilation, relu)
    with pytest.raises(error, match="stride must be positive"):
        _call(op, x, dw_w, dw_bn, pw_w, pw_bn, (0, 1), padding, dilation, relu)
    with pytest.raises(error, match="kernel"):
        _call(op, x[:, :, :1, :1], dw_w, dw_bn, pw_w, pw_bn, stride, (0,) * 4, dilation, relu)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend, device", BLOCK_OPS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_depsepconv_eval_runs_the_block_op(backend, device, layout):
    """DepSepConv in eval under no_grad is the one op, with the result of its two fused halves."""
    torch.manual_seed(0)
    block = mobilenet.DepSepConv(8, 16, 2, backend=backend).to(device).eval()
    for bn in (block.depthwise[1], block.pointwise[1]):
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    x = _block_input(2, 8, 10, 10, torch.float32, layout, device)
    with torch.no_grad():
        with _OpNames() as mode:
            got = block(x)
        halves = block.pointwise(block.depthwise(x))
    assert mode.names == [_ops.OPS[backend].depthwise_pointwise_eval.name()]
    assert got.is_contiguous(memory_format=memory_format(x))
    torch.testing.assert_close(got, halves, atol=1e-5, rtol=1e-5)
