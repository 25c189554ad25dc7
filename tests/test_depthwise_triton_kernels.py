"""The three Triton depthwise ops, called directly, against F.conv2d(groups=C) and its autograd.

On CPU they run under TRITON_INTERPRET=1 (~25 ms per program instance, so shapes stay tiny);
on a GPU the same checks run in float16/bfloat16/float32 at larger shapes, plus opcheck.
"""

import dataclasses
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
if not (CUDA or INTERPRET):
    pytest.skip(
        "Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True
    )

importlib.import_module("kernels.triton_depthwise")
from kernels._layout import memory_format  # noqa: E402

ops = torch.ops.depsep

requires_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and no interpreter)")


def gpu_test(fn):
    """The project's `gpu` marker, plus a skip when the interpreter is on despite a GPU."""
    return pytest.mark.gpu(requires_cuda(fn))


# (atol, rtol) per dtype; weight gradients sum many products, so they get a relative scale.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    bias: bool = True
    channels_last: bool = False

    def __str__(self):
        layout = "nhwc" if self.channels_last else "nchw"
        return (
            f"{self.n}x{self.c}x{self.h}x{self.w}-k{self.kernel[0]}x{self.kernel[1]}"
            f"-s{self.stride[0]}{self.stride[1]}-d{self.dilation[0]}{self.dilation[1]}"
            f"-p{''.join(map(str, self.padding))}-{'bias' if self.bias else 'nobias'}-{layout}"
        )


def sample_inputs(case: Case, device, dtype):
    """(input, weight, bias) for `case`; input in the case's memory format."""
    x = torch.randn(case.n, case.c, case.h, case.w, device=device, dtype=dtype)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(case.c, 1, *case.kernel, device=device, dtype=dtype)
    bias = torch.randn(case.c, device=device, dtype=dtype) if case.bias else None
    return x, weight, bias


def reference(x, weight, bias, grad_output, stride, padding, dilation):
    """(output, grad_input, grad_weight, grad_bias) from F.conv2d in float64 (never TF32)."""
    leaves = [
        t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias)
    ]
    top, bottom, left, right = padding
    out = F.conv2d(
        F.pad(leaves[0], (left, right, top, bottom)),
        leaves[1],
        leaves[2],
        stride,
        0,
        dilation,
        groups=x.shape[1],
    )
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_output.double())
    return (out.detach(), *grads) + ((None,) if bias is None else ())


def assert_close(actual, expected, dtype, scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol * scale, rtol=rtol)


def check_against_torch(x, weight, bias, stride, padding, dilation, grad_output=None):
    """Runs the three ops and compares each with the reference; checks layouts and dtypes."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    dtype = x.dtype
    out = ops.triton_depthwise_conv2d_fwd(x, weight, bias, stride, padding, dilation)
    if grad_output is None:
        grad_output = torch.randn_like(out)
    ref_out, ref_gi, ref_gw, ref_gb = reference(
        x, weight, bias, grad_output, stride, padding, dilation
    )
    fmt = memory_format(x)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, ref_out, dtype)

    grad_input = ops.triton_depthwise_conv2d_bwd_input(
        grad_output, weight, list(x.shape), stride, padding, dilation
    )
    assert grad_input.shape == x.shape and grad_input.dtype == dtype
    assert grad_input.is_contiguous(memory_format=memory_format(grad_output))
    assert_close(grad_input, ref_gi, dtype)

    grad_weight, grad_bias = ops.triton_depthwise_conv2d_bwd_weight(
        grad_output, x, list(weight.shape[-2:]), stride, padding, dilation, bias is not None
    )
    assert grad_weight.shape == weight.shape and grad_weight.is_contiguous()
    assert grad_weight.dtype == dtype and grad_bias.dtype == dtype
    scale = max(1.0, ref_gw.abs().max().item())
    assert_close(grad_weight, ref_gw, dtype, scale)
    if bias is None:
        assert grad_bias.shape == (0,)
    else:
        assert_close(grad_bias, ref_gb, dtype, max(1.0, ref_gb.abs().max().item()))


def run_case(case: Case, device, dtype):
    x, weight, bias = sample_inputs(case, device, dtype)
    check_against_torch(x, weight, bias, case.stride, case.padding, case.dilation)


# Tiny shapes: every NCHW (n, c) plane and every channels_last pixel block is one interpreted
# program. Odd C (3, 5) leaves a partial channel block; 16 and 24 fill or straddle it.
CPU_CASES = [
    Case(2, 5, 7, 9, (3, 3), padding=(1, 1, 1, 1)),
    Case(2, 16, 7, 9, (3, 3), padding=(1, 1, 1, 1), channels_last=True),
    Case(1, 3, 9, 8, (5, 5), stride=(2, 2), padding=(2, 2, 2, 2), bias=False),
    Case(2, 8, 9, 9, (5, 5), stride=(2, 2), padding=(0, 1, 2, 1), channels_last=True),
    Case(2, 3, 6, 7, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(0, 2, 3, 1)),
    Case(
        2,
        5,
        6,
        7,
        (3, 2),
        stride=(2, 1),
        dilation=(1, 2),
        padding=(0, 2, 3, 1),
        bias=False,
        channels_last=True,
    ),
    Case(2, 24, 8, 9, (3, 3), dilation=(2, 2), padding=(2, 2, 2, 2), channels_last=True),
    Case(
        2,
        5,
        5,
        6,
        (3, 3),
        stride=(2, 2),
        padding=(4, 3, 0, 5),  # padding beyond reach
        channels_last=True,
    ),
    Case(1, 3, 5, 4, (1, 1), padding=(1, 0, 0, 2), bias=False),  # 1x1 with padding
    Case(2, 5, 7, 7, (1, 1), stride=(2, 2), channels_last=True),
    Case(1, 4, 1, 1, (3, 3), padding=(1, 1, 1, 1)),  # 1x1 spatial
    Case(1, 16, 8, 8, (3, 3), stride=(2, 2), padding=(0, 1, 0, 1), channels_last=True),  # "same"
    Case(1, 4, 9, 9, (3, 3), bias=False),  # "valid"
]


@requires_interpreter
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_matches_torch_cpu(case):
    run_case(case, "cpu", torch.float32)


@requires_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_float64_cpu(channels_last):
    run_case(
        Case(1, 3, 5, 6, (3, 3), stride=(1, 2), padding=(1, 2, 0, 1), channels_last=channels_last),
        "cpu",
        torch.float64,
    )


@requires_interpreter
def test_noncontiguous_inputs_cpu():
    # A sliced NCHW view (strided in every dim, with strided weight and bias) and a sliced
    # channels_last view, each with a grad_output in the other layout.
    x = torch.randn(3, 10, 11, 19)[2:, ::2, 1:-2, ::2]
    weight = torch.randn(5, 1, 3, 6)[..., ::2]
    grad_output = torch.randn(1, 5, 4, 5).to(memory_format=torch.channels_last)
    check_against_torch(x, weight, torch.randn(10)[::2], (2, 2), (1, 0, 1, 1), (1, 1), grad_output)

    x_cl = torch.randn(2, 9, 12, 16).to(memory_format=torch.channels_last)[:, 1:7, ::2, 3:12]
    assert memory_format(x_cl) == torch.channels_last
    grad_output = torch.randn(2, 6, 6, 9)
    check_against_torch(
        x_cl, torch.randn(6, 1, 3, 3), None, (1, 1), (1, 1, 1, 1), (1, 1), grad_output
    )


@requires_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_empty_batch_cpu(channels_last):
    x = torch.randn(0, 4, 5, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(4, 1, 3, 3), torch.randn(4)
    args = ([1, 1], [1, 1, 1, 1], [1, 1])
    out = ops.triton_depthwise_conv2d_fwd(x, weight, bias, *args)
    assert out.shape == (0, 4, 5, 5)
    assert out.is_contiguous(memory_format=memory_format(x))
    grad_input = ops.triton_depthwise_conv2d_bwd_input(out, weight, [0, 4, 5, 5], *args)
    assert grad_input.shape == (0, 4, 5, 5)
    grad_weight, grad_bias = ops.triton_depthwise_conv2d_bwd_weight(out, x, [3, 3], *args, True)
    torch.testing.assert_close(grad_weight, torch.zeros_like(weight))
    torch.testing.assert_close(grad_bias, torch.zeros_like(bias))


@requires_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_weight_grad_deterministic_cpu(channels_last):
    # 2 x 17 x 17 output pixels: more than one chunk of the two-pass reduction in both layouts.
    case = Case(2, 5, 17, 17, (3, 3), padding=(1, 1, 1, 1), channels_last=channels_last)
    x, weight, _ = sample_inputs(case, "cpu", torch.float32)
    grad_output = torch.randn_like(x)
    args = (grad_output, x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], True)
    first = ops.triton_depthwise_conv2d_bwd_weight(*args)
    second = ops.triton_depthwise_conv2d_bwd_weight(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    _, _, ref_gw, ref_gb = reference(
        x, weight, torch.zeros(5), grad_output, [1, 1], [1, 1, 1, 1], [1, 1]
    )
    assert_close(first[0], ref_gw, torch.float32, ref_gw.abs().max().item())
    assert_close(first[1], ref_gb, torch.float32, ref_gb.abs().max().item())


# GPU: MobileNet-like layers plus odd shapes, all in bfloat16 (the target dtype); float16 and
# float32 on one layer per layout. Each new shape autotunes, so the grid stays small.
GPU_CASES = [
    Case(8, 32, 56, 56, (3, 3), padding=(1, 1, 1, 1), channels_last=True),
    Case(8, 32, 56, 56, (3, 3), padding=(1, 1, 1, 1)),
    Case(8, 64, 56, 56, (3, 3), stride=(2, 2), padding=(0, 1, 0, 1), channels_last=True),
    Case(4, 1024, 7, 7, (3, 3), padding=(1, 1, 1, 1), channels_last=True),
    Case(3, 37, 33, 29, (5, 5), dilation=(2, 2), padding=(3, 5, 4, 4), channels_last=True),
    Case(3, 37, 33, 29, (3, 2), stride=(2, 1), padding=(0, 2, 3, 1), bias=False),
]
GPU_PARAMS = [(case, torch.bfloat16) for case in GPU_CASES] + [
    (case, dtype) for case in GPU_CASES[:2] for dtype in (torch.float16, torch.float32)
]


@gpu_test
@pytest.mark.parametrize("case, dtype", GPU_PARAMS, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_torch_cuda(case, dtype):
    run_case(case, "cuda", dtype)


@gpu_test
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_weight_grad_deterministic_cuda(channels_last):
    case = Case(16, 64, 56, 56, (3, 3), padding=(1, 1, 1, 1), channels_last=channels_last)
    x, _, _ = sample_inputs(case, "cuda", torch.bfloat16)
    args = (torch.randn_like(x), x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], True)
    first = ops.triton_depthwise_conv2d_bwd_weight(*args)
    second = ops.triton_depthwise_conv2d_bwd_weight(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# opcheck runs on the GPU only: under the interpreter its fake-tensor check cannot run a
# triton_op body.
@gpu_test
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cuda(channels_last):
    case = Case(
        2, 16, 10, 12, (3, 3), stride=(2, 1), padding=(1, 0, 2, 1), channels_last=channels_last
    )
    x, weight, bias = sample_inputs(case, "cuda", torch.float32)
    geometry = ([2, 1], [1, 0, 2, 1], [1, 1])
    out = ops.triton_depthwise_conv2d_fwd(x, weight, bias, *geometry)
    grad_output = torch.randn_like(out)
    torch.library.opcheck(ops.triton_depthwise_conv2d_fwd.default, (x, weight, bias, *geometry))
    torch.library.opcheck(
        ops.triton_depthwise_conv2d_bwd_input.default,
        (grad_output, weight, list(x.shape), *geometry),
    )
    torch.library.opcheck(
        ops.triton_depthwise_conv2d_bwd_weight.default, (grad_output, x, [3, 3], *geometry, True)
    )
