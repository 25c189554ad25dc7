"""Sample generators and tolerances shared by the test modules."""

import contextlib
import itertools
import os
from dataclasses import dataclass

import pytest
import torch

import kernels
from kernels import _ops

HAS_CUDA = torch.cuda.is_available()
# The test-only "host_programs" ops: the CUDA kernels' thread and block programs run on the host.
HOST_PROGRAMS = _ops.host_program_ops()


def ops(backend: str) -> _ops.OpSet:
    """The registered ops of a backend ("native", "triton" or "host_programs")."""
    return _ops.OPS[backend]


# Per-dtype tolerances for comparing a backend with the "torch" reference in the same dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
}


@dataclass(frozen=True)
class Accuracy:
    """How far a result computed in a dtype may be from a float64 run of the same values.

    element: each element within element * (max|exact| + |exact|), which catches a wrong
    index or a lost tap anywhere; norm: ||got - exact|| within norm * ||exact||, which catches a
    systematic error such as a gradient scaled by 1.05 that stays below the element bound. Both
    are far above the dtype's rounding (bfloat16: 2^-8 per rounding) and below 5%, so that a 5%
    error in any result fails in every dtype (tests/test_fused.py checks that)."""

    element: float
    norm: float


ACCURACY = {
    torch.float64: Accuracy(element=1e-9, norm=1e-10),
    torch.float32: Accuracy(element=1e-4, norm=2e-5),
    torch.float16: Accuracy(element=1e-2, norm=4e-3),
    torch.bfloat16: Accuracy(element=3e-2, norm=2e-2),
}
# float32 through TF32 tensor cores (10-bit mantissa, as float16's): GPU tests of those paths.
TF32_ACCURACY = Accuracy(element=1e-2, norm=4e-3)


def assert_close_to_exact(
    got: torch.Tensor,
    exact: torch.Tensor,
    accuracy: Accuracy,
    name: str = "",
    reference: torch.Tensor | None = None,
    slack: float = 2.0,
):
    """`got` (computed in a lower precision) against `exact` (float64, from the same values):
    shape, then both bounds of `accuracy`, each widened by `slack` times the error of
    `reference` (eager PyTorch in got's dtype, when given): a result that cancels to nearly zero
    (a BN-invariant weight gradient) carries rounding noise of its terms' size, which no bound
    relative to the result itself allows. NaN and infinities must sit at the same places."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    got, exact = got.detach().double().cpu(), exact.detach().double().cpu()
    special = ~torch.isfinite(exact)
    assert torch.equal(got[special].isnan(), exact[special].isnan()) and torch.equal(
        got[special].nan_to_num(), exact[special].nan_to_num()
    ), f"{name}: NaN/infinity differ"
    finite = ~special
    ref_error = torch.zeros(())
    if reference is not None:
        ref_error = (reference.detach().double().cpu()[finite] - exact[finite]).abs()
    got, exact = got[finite], exact[finite]
    if exact.numel() == 0:
        return
    error = (got - exact).abs()
    bound = accuracy.element * (exact.abs().max() + exact.abs()) + slack * ref_error.max()
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (
        f"{name}: element {worst} is {got[worst].item():.6g}, expected {exact[worst].item():.6g} "
        f"(error {error[worst].item():.3g} > {bound[worst].item():.3g})"
    )
    norm_bound = accuracy.norm * exact.norm() + slack * ref_error.norm()
    assert error.norm() <= norm_bound, (
        f"{name}: error {error.norm().item():.3g} in norm > {norm_bound.item():.3g} "
        f"(|exact| {exact.norm().item():.3g})"
    )


@contextlib.contextmanager
def float32_precision(precision: str):
    """float32 convolutions and matmuls in "ieee" or "tf32" (cuDNN, cuBLAS and the kernels that
    follow cuDNN's setting: the WMMA GEMM, Triton's tl.dot), restored afterwards. Through the
    per-op fp32_precision settings where this torch has them, else the allow_tf32 flags."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None:
        matmul = torch.backends.cuda.matmul
        before = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision = matmul.fp32_precision = precision
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = before
        return
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    allowed = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _backend_marks(name: str, device: str):
    """gpu on cuda; a skip with the reason where the backend cannot run."""
    marks = [pytest.mark.gpu] if device == "cuda" else []
    why = kernels.available_backends(device)[name] if device != "cuda" or HAS_CUDA else None
    if why:
        marks.append(pytest.mark.skip(reason=why))
    return marks


def backend_param(name: str, device: str):
    """A (backend, device) pytest param for one backend on one device."""
    return pytest.param(name, device, marks=_backend_marks(name, device), id=f"{name}-{device}")


def backend_params(device: str):
    """A pytest param for each fast backend on `device`."""
    return [
        pytest.param(name, marks=_backend_marks(name, device), id=name)
        for name in ("native", "triton")
    ]


@dataclass(frozen=True)
class DepthwiseCase:
    """One depthwise convolution: shapes, geometry and how the input is laid out in memory."""

    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: object = 1
    padding: object = 0  # as F.conv2d takes it, or (top, bottom, left, right): the ops' own form
    dilation: object = 1
    bias: bool = True
    layout: str = "nchw"  # nchw | channels_last | sliced (a non-contiguous view)

    def __str__(self):
        k = "x".join(map(str, self.kernel))
        return (
            f"{self.n}x{self.c}x{self.h}x{self.w}-k{k}-s{self.stride}-p{self.padding}"
            f"-d{self.dilation}-{'b' if self.bias else 'nb'}-{self.layout}"
        )

    def make(self, device="cpu", dtype=torch.float32, requires_grad=False, seed=0):
        """(input, weight, bias) drawn from a fixed seed, laid out as `layout` says."""
        gen = torch.Generator().manual_seed(seed)
        shape = (self.n, self.c, self.h, self.w)
        if self.layout == "sliced":
            # Every other channel and a column offset of a wider tensor: no layout is contiguous.
            wide = torch.randn(self.n, 2 * self.c, self.h, self.w + 3, generator=gen)
            x = wide[:, ::2, :, 2:-1]
        else:
            x = torch.randn(shape, generator=gen)
        weight = torch.randn(self.c, 1, *self.kernel, generator=gen)
        bias = torch.randn(self.c, generator=gen) if self.bias else None
        x = x.to(device=device, dtype=dtype)
        if self.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        tensors = [x, weight.to(device, dtype), None if bias is None else bias.to(device, dtype)]
        if requires_grad:
            tensors = [t if t is None else t.detach().requires_grad_() for t in tensors]
        return tuple(tensors)

    def conv_args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


def depthwise_cases() -> list[DepthwiseCase]:
    """The correctness grid: odd sizes, kernels 1/3/5/7 and non-square, strides 1/2, asymmetric
    and "same"/"valid" padding, dilation, bias or not, batch 1, all three layouts, and channel
    counts with and without a full 16-byte vector."""
    cases = []
    for kernel, stride, layout in itertools.product(
        [(3, 3), (1, 1), (5, 5), (7, 7), (3, 2)], [1, 2], ["nchw", "channels_last", "sliced"]
    ):
        pad = (kernel[0] // 2, kernel[1] // 2 + 1)  # asymmetric in H and W
        cases.append(DepthwiseCase(2, 8, 11, 9, kernel, stride, pad, 1, True, layout))
    cases += [
        DepthwiseCase(1, 5, 7, 6, (3, 3), 1, 1, 1, False, "channels_last"),
        DepthwiseCase(1, 3, 10, 13, (3, 3), 2, 0, 2, True, "nchw"),
        DepthwiseCase(2, 12, 9, 9, (3, 3), (2, 1), (2, 0), (1, 2), False, "channels_last"),
        DepthwiseCase(2, 16, 8, 8, (3, 3), 1, "same", 1, True, "channels_last"),
        DepthwiseCase(2, 4, 8, 7, (4, 2), 1, "same", (2, 1), True, "nchw"),
        DepthwiseCase(2, 4, 6, 6, (3, 3), 1, "valid", 1, True, "sliced"),
        DepthwiseCase(1, 8, 1, 1, (3, 3), 1, 1, 1, True, "channels_last"),
        DepthwiseCase(2, 6, 5, 5, (3, 3), 3, 4, 1, True, "nchw"),  # padding wider than the kernel
        DepthwiseCase(2, 8, 9, 7, (3, 3), 2, (0, 2, 3, 1), 1, True, "channels_last"),
        DepthwiseCase(2, 5, 6, 7, (3, 2), (2, 1), (0, 2, 3, 1), (1, 2), False, "sliced"),
        # NCHW planes at least 28 wide take the CPU plane loops instead of a transpose.
        DepthwiseCase(2, 3, 5, 33, (3, 3), 1, 1, 1, True, "nchw"),
        DepthwiseCase(1, 4, 6, 31, (3, 3), 2, (0, 1), 1, False, "sliced"),
        DepthwiseCase(2, 2, 7, 30, (5, 3), (1, 2), (2, 0, 1, 3), (2, 1), True, "nchw"),
        DepthwiseCase(1, 3, 4, 29, (1, 7), 1, "same", (1, 2), True, "nchw"),
    ]
    return cases


def interpreter_cases() -> list[DepthwiseCase]:
    """Tiny cases for the Triton interpreter (~25 ms per program instance): every NCHW plane
    and channels_last pixel block is one program. Odd C leaves a partial channel block."""
    return [
        DepthwiseCase(1, 8, 6, 5, (3, 3), 1, (1, 2), 1, True, "channels_last"),
        DepthwiseCase(2, 3, 5, 6, (3, 2), 2, 1, (1, 2), False, "nchw"),
        DepthwiseCase(1, 4, 5, 5, (5, 5), 1, "same", 1, True, "sliced"),
        DepthwiseCase(2, 16, 7, 9, (3, 3), 1, 1, 1, True, "channels_last"),
        DepthwiseCase(2, 8, 9, 9, (5, 5), 2, (0, 1, 2, 1), 1, True, "channels_last"),
        DepthwiseCase(2, 5, 6, 7, (3, 2), (2, 1), (0, 2, 3, 1), (1, 2), False, "channels_last"),
        DepthwiseCase(2, 24, 8, 9, (3, 3), 1, 2, 2, True, "channels_last"),
        DepthwiseCase(2, 5, 5, 6, (3, 3), 2, (4, 3, 0, 5), 1, True, "channels_last"),
        DepthwiseCase(1, 3, 5, 4, (1, 1), 1, (1, 0, 0, 2), 1, False, "nchw"),
        DepthwiseCase(1, 4, 1, 1, (3, 3), 1, 1, 1, True, "nchw"),
    ]


def misaligned_channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same values in a channels_last tensor whose data starts one element past a 16-byte
    boundary: contiguous, so no copy realigns it."""
    n, c, h, w = x.shape
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    view = storage[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    view.copy_(x)
    assert view.is_contiguous(memory_format=torch.channels_last) and view.data_ptr() % 16 != 0
    return view


def skip_unless_cuda_build():
    """CI compiles the CUDA sources whenever torch is a CUDA build and nvcc is there."""
    return torch.version.cuda is None or os.environ.get("DEPSEP_SKIP_CUDA_BUILD") == "1"
