"""The fused conv + BatchNorm + activation ops against the "torch" reference (F.conv2d ->
F.batch_norm -> activation) and against nn.Conv2d + nn.BatchNorm2d + activation modules: outputs,
running statistics after several steps, and every gradient, in train and eval mode."""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels._common import ACTIVATION_CODES
from kernels.reference import apply_activation

from .common import (
    ACCURACY,
    HAS_CUDA,
    TF32_ACCURACY,
    TOLERANCES,
    assert_close_to_exact,
    backend_param,
    float32_precision,
    misaligned_channels_last,
    ops,
    skip_unless_cuda_build,
)

FUNCTIONS = {"pointwise": kernels.pointwise_bn_act, "depthwise": kernels.depthwise_bn_act}


@dataclass(frozen=True)
class FusedCase:
    """One fused layer: a 1x1 conv from c_in to c_out channels, or a depthwise conv (c_out is
    c_in) with a k x k kernel, stride and padding."""

    conv: str  # pointwise | depthwise
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    layout: str = "nchw"  # nchw | channels_last | sliced
    kernel: int = 3
    stride: int = 1
    padding: int = 1

    def __str__(self):
        geometry = (
            "" if self.conv == "pointwise" else f"-k{self.kernel}s{self.stride}p{self.padding}"
        )
        shape = f"{self.n}x{self.c_in}x{self.h}x{self.w}-{self.c_out}"
        return f"{self.conv}-{shape}{geometry}-{self.layout}"

    def conv_args(self):
        if self.conv == "pointwise":
            return {}
        return dict(stride=self.stride, padding=self.padding)

    def make(self, device="cpu", dtype=torch.float32, affine=True, seed=0):
        """(input, weight, bn_weight, bn_bias, running_mean, running_var): BN tensors in float32
        (float64 for float64), as nn.BatchNorm2d keeps them under mixed precision."""
        gen = torch.Generator().manual_seed(seed)
        if self.layout == "sliced":
            wide = torch.randn(self.n, 2 * self.c_in, self.h, self.w + 2, generator=gen)
            x = wide[:, ::2, :, 1:-1]
        else:
            x = torch.randn(self.n, self.c_in, self.h, self.w, generator=gen)
        shape = (self.c_out, self.c_in, 1, 1)
        if self.conv == "depthwise":
            shape = (self.c_in, 1, self.kernel, self.kernel)
        weight = torch.randn(shape, generator=gen) / (shape[1] * shape[2] * shape[3]) ** 0.5
        bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        c = self.c_out
        bn = [
            torch.rand(c, generator=gen) + 0.5,
            torch.randn(c, generator=gen),
            torch.randn(c, generator=gen) * 0.1,
            torch.rand(c, generator=gen) + 0.5,
        ]
        x = x.to(device, dtype)
        if self.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        bn = [t.to(device, bn_dtype) for t in bn]
        if not affine:
            bn[0] = bn[1] = None
        return (x, weight.to(device, dtype), *bn)


def fused_cases() -> list[FusedCase]:
    """Channel counts 1 to 1024 (odd ones too), batch 1 and more, spatial 1x1 to 56x56, both
    layouts and a non-contiguous view; depthwise with stride 1 and 2."""
    cases = []
    for layout in ("nchw", "channels_last", "sliced"):
        cases += [
            FusedCase("pointwise", 2, 3, 5, 4, 4, layout),
            FusedCase("pointwise", 1, 17, 33, 7, 6, layout),
            FusedCase("depthwise", 2, 7, 7, 6, 5, layout, 3, 1, 1),
            FusedCase("depthwise", 1, 16, 16, 9, 9, layout, 3, 2, 1),
        ]
    cases += [
        # One output channel. (Not one input channel: BN would make each output channel
        # independent of its weight's one scalar in training, leaving an eps-sized gradient
        # that is all rounding noise.)
        FusedCase("pointwise", 4, 2, 1, 3, 3),
        FusedCase("pointwise", 3, 64, 128, 1, 1, "channels_last"),
        # Two values per channel make BN output +-1 and its input gradient zero up to rounding:
        # four keep the gradients meaningful.
        FusedCase("pointwise", 4, 1024, 1024, 1, 1, "channels_last"),
        FusedCase("pointwise", 1, 8, 16, 56, 56, "channels_last"),
        FusedCase("pointwise", 2, 32, 24, 14, 14),
        FusedCase("depthwise", 3, 1, 1, 5, 5),
        FusedCase("depthwise", 2, 1024, 1024, 2, 3, "channels_last", 3, 1, 1),
        FusedCase("depthwise", 1, 32, 32, 56, 56, "channels_last", 3, 2, 1),
        FusedCase("depthwise", 2, 33, 33, 14, 14, "nchw", 3, 1, 1),
        FusedCase("depthwise", 2, 5, 5, 7, 8, "channels_last", 5, 2, 2),
    ]
    return cases


def interpreter_cases() -> list[FusedCase]:
    """Tiny cases for the Triton interpreter."""
    return [
        FusedCase("pointwise", 2, 5, 7, 3, 3, "nchw"),
        FusedCase("pointwise", 1, 16, 8, 4, 5, "channels_last"),
        FusedCase("depthwise", 2, 5, 5, 5, 4, "channels_last", 3, 1, 1),
        FusedCase("depthwise", 1, 8, 8, 6, 6, "nchw", 3, 2, 1),
    ]


def run_steps(case, backend, tensors, training, activation="relu", steps=2, momentum=0.1):
    """`steps` calls on the same running statistics, then a backward of the last output with
    a fixed gradient (drawn in the input's dtype, so that a float64 run of the same values sees
    the same gradient). Returns (output, running_mean, running_var, grads of input, weight,
    bn_weight, bn_bias)."""
    x, w, bn_w, bn_b, rm, rv = (None if t is None else t.detach().clone() for t in tensors)
    x = x.contiguous(memory_format=torch.channels_last) if case.layout == "channels_last" else x
    params = [t.requires_grad_() for t in (x, w, bn_w, bn_b) if t is not None]
    for _ in range(steps):
        out = FUNCTIONS[case.conv](
            x,
            w,
            rm,
            rv,
            bn_w,
            bn_b,
            training=training,
            momentum=momentum,
            activation=activation,
            backend=backend,
            **case.conv_args(),
        )
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, params, grad_out.to(case_dtype(tensors)).to(out))
    return out, rm, rv, grads


def case_dtype(tensors) -> torch.dtype:
    return tensors[0].dtype


def exact_run(case, tensors, training, activation, **options):
    """run_steps of the "torch" reference in float64 on the very same values."""
    exact = tuple(None if t is None else t.detach().double() for t in tensors)
    got = run_steps(case, "torch", exact, training, activation, **options)
    return got


def assert_matches_reference(
    case, backend, device, dtype, training, activation, affine=True, accuracy=None
):
    """The backend's outputs, running statistics and gradients against a float64 run of the
    same values, within the dtype's ACCURACY."""
    tensors = case.make(device, dtype, affine)
    got = run_steps(case, backend, tensors, training, activation)
    want = exact_run(case, tensors, training, activation)
    eager = run_steps(case, "torch", tensors, training, activation)
    accuracy = accuracy or ACCURACY[dtype]
    out = got[0]
    assert out.dtype == dtype and out.shape == want[0].shape
    expected_format = (
        torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    )
    if case.layout != "sliced":
        assert out.is_contiguous(memory_format=expected_format)
    assert_close_to_exact(out, want[0], accuracy, "output", eager[0])
    assert_close_to_exact(got[1], want[1], accuracy, "running_mean", eager[1])
    assert_close_to_exact(got[2], want[2], accuracy, "running_var", eager[2])
    names = ("input", "weight", "bn_weight", "bn_bias")
    for name, g, w, e in zip(names, got[3], want[3], eager[3]):
        assert g.dtype == e.dtype, name
        assert_close_to_exact(g, w, accuracy, f"grad {name}", e)


NATIVE_CPU = backend_param("native", "cpu")


@pytest.mark.parametrize("case", fused_cases(), ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_cpu_float32(case, training):
    assert_matches_reference(case, "native", "cpu", torch.float32, training, "relu")


def _aten_ops_of(fn, *args, **kwargs) -> set[str]:
    """The names of the ops that fn(*args, **kwargs) dispatches, nested ones included."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    return {event.name for event in prof.events()}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch with oneDNN")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_cpu_large_pointwise_takes_onednn(training):
    """A float32 channels_last 1x1 of 2^24 multiply-adds and at most 256 input channels runs
    ATen's (oneDNN's) convolution, forward and backward, with the reference's results; one of
    2^22 runs the direct BLAS GEMMs."""
    large = FusedCase("pointwise", 1, 64, 64, 64, 64, "channels_last")
    assert_matches_reference(large, "native", "cpu", torch.float32, training, "relu")
    for case, onednn in (
        (large, True),
        (FusedCase("pointwise", 1, 64, 64, 32, 32, "channels_last"), False),
    ):
        tensors = case.make()
        ops = _aten_ops_of(run_steps, case, "native", tensors, training, steps=1)
        assert ("aten::mkldnn_convolution" in ops) == onednn, case
        assert ("aten::convolution_backward" in ops) == onednn, case


@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
@pytest.mark.parametrize(
    "training, activation, affine, dtype",
    [
        (True, "relu6", True, torch.float64),
        (False, "relu6", False, torch.float64),
        (True, None, False, torch.float32),
        (False, None, True, torch.float32),
        (True, "relu", True, torch.bfloat16),
        (False, "relu6", True, torch.bfloat16),
        (True, "silu", True, torch.float64),
        (False, "silu", True, torch.float32),
        (True, "silu", False, torch.bfloat16),
        (True, "hardswish", False, torch.float32),
        (False, "hardswish", True, torch.float64),
        (False, "hardswish", True, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_native_cpu_options(conv, training, activation, affine, dtype, layout):
    """Each activation in train and eval, BN without affine parameters, float64 and bfloat16."""
    case = FusedCase(conv, 2, 6, 6 if conv == "depthwise" else 10, 5, 7, layout, 3, 2, 1)
    assert_matches_reference(case, "native", "cpu", dtype, training, activation, affine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case", [c for c in fused_cases() if c.conv == "depthwise" and c.c_in < 1024], ids=str
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_fused_depthwise_programs_on_host(case, dtype, training):
    """The CUDA kernels' fused depthwise programs (statistics recomputed without
    writing the convolution, then the forward with the BN and activation epilogue), run for
    every thread index on the host, in every dtype; backward through the same programs."""
    assert_matches_reference(case, "host_programs", "cpu", dtype, training, "relu6")


POINTWISE_HOST_CASES = [c for c in fused_cases() if c.conv == "pointwise" and c.c_in < 1024] + [
    # Two 64-row tiles, the second partial; K = 40, a full and a partial 32-deep step of
    # 16-byte loads; 72 output channels, a partial second column of blocks.
    FusedCase("pointwise", 2, 40, 72, 7, 9, "channels_last"),
]


def host_programs_precision(case, dtype):
    """(float32 precision, accuracy): float32 in channels_last takes the TF32 GEMM programs
    where TF32 is allowed (cuDNN's default); other layouts and dtypes take ATen's GEMM or are
    judged by their own accuracy."""
    if dtype == torch.float32 and case.layout == "channels_last":
        return "tf32", TF32_ACCURACY
    return "ieee", ACCURACY[dtype]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("case", POINTWISE_HOST_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_fused_pointwise_programs_on_host(case, dtype, training):
    """The CUDA pointwise op's code path run on the host, against the float64 reference of the
    same values: in channels_last float16, bfloat16 and float32 (as TF32), the GEMM block
    programs (tiles staged through shared memory, zero-filled edges, warp matrix steps, the
    statistics and apply epilogues) for every thread and warp of every block; ATen's GEMM and
    the BN thread programs otherwise. Backward as the CUDA op's."""
    precision, accuracy = host_programs_precision(case, dtype)
    with float32_precision(precision):
        assert_matches_reference(
            case, "host_programs", "cpu", dtype, training, "relu6", accuracy=accuracy
        )


HOST_ACTIVATION_CASES = [
    FusedCase("depthwise", 2, 7, 7, 6, 5, "channels_last", 3, 1, 1),
    FusedCase("depthwise", 1, 16, 16, 9, 9, "nchw", 3, 2, 1),
    FusedCase("pointwise", 2, 40, 72, 7, 9, "channels_last"),
    FusedCase("pointwise", 1, 17, 33, 7, 6, "nchw"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", HOST_ACTIVATION_CASES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["silu", "hardswish"])
def test_cuda_fused_programs_on_host_activations(case, dtype, training, activation):
    """The smooth activations through the CUDA code paths run on the host (the depthwise
    epilogue, the GEMM programs' apply epilogue, the BN thread programs and the gradient
    passes), on a subset of the host-program grids above. hardswish's gradient jumps at -3 and
    3, across which TF32's rounding moves some pre-activations: it runs float32 in IEEE (the GEMM
    programs still run for bfloat16)."""
    precision, accuracy = host_programs_precision(case, dtype)
    if activation == "hardswish":
        precision, accuracy = "ieee", ACCURACY[dtype]
    with float32_precision(precision):
        assert_matches_reference(
            case, "host_programs", "cpu", dtype, training, activation, accuracy=accuracy
        )


HOST_PROGRAMS_POINTWISE_FWD = ops("host_programs").pointwise_bn_act_fwd
TF32_CASE = FusedCase("pointwise", 2, 40, 24, 5, 7, "channels_last")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pointwise_programs_misaligned_input_loads_elements(dtype, training):
    """An input off a 16-byte boundary: the GEMM programs load it element by element (the host
    run throws on a misaligned vector access), to the same bits as the 16-byte loads."""
    x, w, bn_w, bn_b, rm, rv = TF32_CASE.make(dtype=dtype)
    args = (w, bn_w, bn_b, rm, rv, None, training, 0.1, 1e-5, "relu")
    with float32_precision("tf32"):
        got = HOST_PROGRAMS_POINTWISE_FWD(misaligned_channels_last(x), *args)
        want = HOST_PROGRAMS_POINTWISE_FWD(x, *args)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def _bn_reference(x, w, bn_w, bn_b):
    return F.batch_norm(
        F.conv2d(x.double(), w.double()), None, None, bn_w.double(), bn_b.double(), True
    )


def test_pointwise_programs_statistics_blocks_of_several_tiles():
    """Past 1024 row tiles a statistics block reduces several tiles and merges their moments:
    66049 rows, blocks of two 64-row tiles, the last block one partial tile. float16 products
    are exact and sum in float32: the batch statistics are float32-accurate."""
    case = FusedCase("pointwise", 1, 8, 8, 257, 257, "channels_last")
    x, w, bn_w, bn_b, _, _ = case.make(dtype=torch.float16)
    _, (mean, var) = HOST_PROGRAMS_POINTWISE_FWD(
        x, w, bn_w, bn_b, None, None, None, True, 0.1, 1e-5, "none"
    )
    y = x.permute(0, 2, 3, 1).reshape(-1, case.c_in).double() @ w.flatten(1).double().t()
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(mean.double(), y.mean(0), **tol)
    torch.testing.assert_close(var.double(), y.var(0, unbiased=False), **tol)


def test_depthwise_programs_statistics_of_many_chunks():
    """Past 32 statistics chunks, groups of 32 merge level by level (a tree fixed by the chunk
    count) before the per-channel merge: 64 images of 20 output rows make 1280 one-row chunks,
    two levels. float32 statistics of float32 values, float32-accurate."""
    case = FusedCase("depthwise", 64, 8, 8, 20, 20, "channels_last", 3, 1, 1)
    x, w, bn_w, bn_b, _, _ = case.make()
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1])
    _, (mean, var) = ops("host_programs").depthwise_bn_act_fwd(
        x, w, *geometry, bn_w, bn_b, None, None, None, True, 0.1, 1e-5, "none"
    )
    y = F.conv2d(x.double(), w.double(), None, 1, 1, 1, case.c_in)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(mean.double(), y.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(var.double(), y.var((0, 2, 3), unbiased=False), **tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_native_cpu_bn_passes_do_not_depend_on_the_thread_count(layout, activation):
    """The native CPU BN passes (the CPU loops) split the positions into chunks by the shape
    alone: one thread and two give the same bits, forward and backward (through the depthwise
    convolution, whose CPU loops are thread-count independent too). 2x19x20x20 makes 13 chunks
    of 64 positions (NCHW chunks crossing an image plane's end) and 19 channels (two 8-lane
    vectors and 3 single lanes)."""
    case = FusedCase("depthwise", 2, 19, 19, 20, 20, layout, 3, 1, 1)
    tensors = case.make()
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(run_steps(case, "native", tensors, True, activation))
    finally:
        torch.set_num_threads(threads)
    (out1, rm1, rv1, grads1), (out2, rm2, rv2, grads2) = runs
    for a, b in zip((out1, rm1, rv1, *grads1), (out2, rm2, rv2, *grads2)):
        assert torch.equal(a, b)


def _tf32_ties(t):
    """Values halfway between two neighbouring TF32 numbers, the neighbour away from zero and
    the one towards zero."""
    toward = t.view(torch.int32) & ~0x1FFF
    tie = toward | 0x1000
    away = toward + 0x2000
    return tuple(b.view(torch.float32) for b in (tie, away, toward))


def test_pointwise_programs_round_float32_to_tf32_ties_away():
    """float32 runs as TF32 in channels_last: an operand halfway between two TF32 numbers
    rounds to the one away from zero, as cvt.rna.tf32.f32 does. The products are then exact, so
    the output matches the float64 reference of those operands to float32 accumulation, and
    misses the reference of the other neighbours."""
    x, w, bn_w, bn_b, _, _ = TF32_CASE.make()
    (x, x_away, x_toward), (w, w_away, w_toward) = _tf32_ties(x), _tf32_ties(w)
    with float32_precision("tf32"):
        out, _ = HOST_PROGRAMS_POINTWISE_FWD(
            x, w, bn_w, bn_b, None, None, None, True, 0.1, 1e-5, "none"
        )
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), _bn_reference(x_away, w_away, bn_w, bn_b), **tol)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            out.double(), _bn_reference(x_toward, w_toward, bn_w, bn_b), **tol
        )


@pytest.mark.skipif(
    not hasattr(torch.backends.cudnn, "conv"), reason="torch before 2.9 has no per-op TF32 flag"
)
def test_pointwise_programs_follow_the_conv_tf32_flag():
    """float32 channels_last runs as TF32 while convolutions may (cuDNN's default): it misses
    the float64 reference by more than float32 rounding. With
    torch.backends.cudnn.conv.fp32_precision = "ieee" (after which asking cuDNN's TF32 flag
    without an operator raises) the CUDA op takes ATen's GEMM and the BN thread programs:
    within float32 rounding."""
    x, w, bn_w, bn_b, _, _ = TF32_CASE.make()
    want = _bn_reference(x, w, bn_w, bn_b)
    tol = TOLERANCES[torch.float32]

    def output():
        out, _ = HOST_PROGRAMS_POINTWISE_FWD(
            x, w, bn_w, bn_b, None, None, None, True, 0.1, 1e-5, "none"
        )
        return out.double()

    with float32_precision("tf32"), pytest.raises(AssertionError):
        torch.testing.assert_close(output(), want, **tol)
    with float32_precision("ieee"):
        torch.testing.assert_close(output(), want, **tol)


@pytest.mark.parametrize("backend, device", [backend_param("triton", "cpu")])
@pytest.mark.parametrize("case", interpreter_cases(), ids=str)
@pytest.mark.parametrize(
    "training, activation",
    [(True, "relu"), (False, "relu6"), (True, None), (True, "silu"), (False, "hardswish")],
    ids=str,
)
def test_triton_interpreter(backend, device, case, training, activation):
    assert_matches_reference(case, backend, device, torch.float32, training, activation)


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(
    "backend, device", [backend_param(b, "cuda") for b in ("native", "triton")]
)
@pytest.mark.parametrize("case", fused_cases(), ids=str)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu(backend, device, case, dtype, training):
    assert_matches_reference(case, backend, device, dtype, training, "relu")


@pytest.mark.parametrize(
    "backend, device", [backend_param(b, "cuda") for b in ("native", "triton")]
)
@pytest.mark.parametrize("case", interpreter_cases(), ids=str)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu6", "silu", "hardswish", None])
def test_gpu_activations(backend, device, case, dtype, training, activation):
    assert_matches_reference(case, backend, device, dtype, training, activation)


@pytest.mark.parametrize(
    "backend, device", [backend_param(b, "cuda") for b in ("native", "triton")]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_float32_through_tf32(backend, device, training):
    """With TF32 allowed (cuDNN's default), float32 1x1 layers run on tensor cores: judged
    against float64 with a TF32-sized bound (float16's mantissa), over odd shapes."""
    for case in (
        FusedCase("pointwise", 2, 17, 33, 7, 6, "channels_last"),
        FusedCase("pointwise", 4, 64, 128, 9, 9, "channels_last"),
    ):
        with float32_precision("tf32"):
            assert_matches_reference(
                case, backend, device, torch.float32, training, "relu", accuracy=TF32_ACCURACY
            )


@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu6", None, "silu", "hardswish"])
def test_gradcheck_native_float64(conv, training, activation):
    case = FusedCase(conv, 2, 3, 3 if conv == "depthwise" else 4, 4, 3, "channels_last", 3, 2, 1)
    x, w, bn_w, bn_b, rm, rv = case.make(dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, bn_w, bn_b)]

    def fn(x, w, bn_w, bn_b):
        return FUNCTIONS[conv](
            x,
            w,
            rm.clone(),
            rv.clone(),
            bn_w,
            bn_b,
            training=training,
            activation=activation,
            backend="native",
            **case.conv_args(),
        )

    torch.autograd.gradcheck(fn, inputs)


def _modules(case, tensors, activation_module):
    """nn.Conv2d + nn.BatchNorm2d + activation holding the case's weights."""
    x, w, bn_w, bn_b, rm, rv = tensors
    if case.conv == "pointwise":
        conv = nn.Conv2d(case.c_in, case.c_out, 1, bias=False)
    else:
        conv = nn.Conv2d(
            case.c_in,
            case.c_in,
            case.kernel,
            case.stride,
            case.padding,
            groups=case.c_in,
            bias=False,
        )
    bn = nn.BatchNorm2d(case.c_out, momentum=None)
    with torch.no_grad():
        conv.weight.copy_(w)
        bn.weight.copy_(bn_w)
        bn.bias.copy_(bn_b)
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
    return nn.Sequential(conv, bn, activation_module)


@pytest.mark.parametrize("backend, device", [NATIVE_CPU])
@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
def test_matches_modules_over_steps(backend, device, conv):
    """Three training steps then eval, against nn.Conv2d + nn.BatchNorm2d(momentum=None) +
    nn.ReLU6: the cumulative running average counted in num_batches_tracked, outputs and the
    gradients of the module parameters."""
    case = FusedCase(conv, 2, 6, 6 if conv == "depthwise" else 9, 6, 6, "channels_last", 3, 1, 1)
    tensors = case.make()
    reference = _modules(case, tensors, nn.ReLU6())
    fused = _modules(case, tensors, nn.ReLU6())
    conv_m, bn = fused[0], fused[1]
    for step in range(4):
        training = step < 3
        reference.train(training)
        x = torch.randn(3, case.c_in, 6, 6, generator=torch.Generator().manual_seed(step))
        x = x.contiguous(memory_format=torch.channels_last)
        want = reference(x)
        got = FUNCTIONS[conv](
            x,
            conv_m.weight,
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            training=training,
            momentum=None,
            eps=bn.eps,
            activation="relu6",
            backend=backend,
            num_batches_tracked=bn.num_batches_tracked,
            **case.conv_args(),
        )
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
        torch.testing.assert_close(bn.running_var, reference[1].running_var)
        assert int(bn.num_batches_tracked) == int(reference[1].num_batches_tracked)
        want.square().sum().backward()
        got.square().sum().backward()
    for p, q in zip(fused.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend, device", [NATIVE_CPU])
@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_autograd_saves_no_activation(backend, device, conv, training):
    """What autograd keeps per fused op: its input, its weights and per-channel statistics;
    no other tensor the size of an activation (the BN output and the activation mask are
    recomputed in backward)."""
    case = FusedCase(conv, 2, 8, 8 if conv == "depthwise" else 16, 16, 16, "channels_last")
    x, w, bn_w, bn_b, rm, rv = case.make()
    x.requires_grad_()
    params = [t.requires_grad_() for t in (w, bn_w, bn_b)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = FUNCTIONS[conv](
            x, w, rm, rv, bn_w, bn_b, training=training, backend=backend, **case.conv_args()
        )
    activation_size = min(x.numel(), out.numel())
    big = [t for t in saved if t.numel() >= activation_size // 8]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    small_bytes = sum(t.numel() * t.element_size() for t in saved if t is not big[0])
    assert small_bytes <= sum(p.numel() * p.element_size() for p in params) + 2 * 8 * out.shape[1]
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in params)


def _opcheck_samples(backend, device):
    for conv, training in itertools.product(("pointwise", "depthwise"), (True, False)):
        case = FusedCase(conv, 2, 4, 4 if conv == "depthwise" else 6, 5, 5, "channels_last")
        x, w, bn_w, bn_b, rm, rv = case.make(device)
        nbt = torch.zeros((), dtype=torch.long, device=device)
        if conv == "pointwise":
            fwd, bwd = ops(backend).pointwise_bn_act_fwd, ops(backend).pointwise_bn_act_bwd
            geometry = []
        else:
            fwd, bwd = ops(backend).depthwise_bn_act_fwd, ops(backend).depthwise_bn_act_bwd
            geometry = [[1, 1], [1, 1, 1, 1], [1, 1]]
        bn = (bn_w, bn_b, rm, rv, nbt)
        yield fwd, (x, w, *geometry, *bn, training, 0.1, 1e-5, "relu")
        if training:
            yield fwd, (x, w, *geometry, *bn, training, None, 1e-5, "relu6")
        out, stats = fwd(x, w, *geometry, *bn, training, 0.1, 1e-5, "relu")
        args = (torch.randn_like(out), x, w, *geometry, bn_w, bn_b, stats)
        yield bwd, (*args, training, 1e-5, "relu6", [True, True, True, True])
        yield bwd, (*args, training, 1e-5, "none", [False, True, False, True])
        yield fwd, (x, w, *geometry, *bn, training, 0.1, 1e-5, "silu" if training else "hardswish")
        yield bwd, (*args, training, 1e-5, "hardswish" if training else "silu", [True] * 4)


@pytest.mark.parametrize("backend, device", [NATIVE_CPU, backend_param("native", "cuda")])
def test_opcheck(backend, device):
    for operator, args in _opcheck_samples(backend, device):
        torch.library.opcheck(operator, args)


@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
def test_compile_fullgraph_cpu(conv):
    """torch.compile traces the fused op (fake kernel) and the running-statistics update with
    no graph break."""
    case = FusedCase(conv, 2, 8, 8 if conv == "depthwise" else 12, 6, 6, "channels_last")
    x, w, bn_w, bn_b, rm, rv = case.make()

    def block(x, w, rm, rv):
        return FUNCTIONS[conv](
            x, w, rm, rv, bn_w, bn_b, training=True, backend="native", **case.conv_args()
        )

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    rm2, rv2 = rm.clone(), rv.clone()
    torch.testing.assert_close(compiled(x, w, rm, rv), block(x, w, rm2, rv2))
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


def test_deterministic_native_cpu():
    """The statistics and gradient sums reduce in a fixed order: same bits every run."""
    case = FusedCase("pointwise", 4, 16, 32, 20, 20, "channels_last")
    tensors = case.make()
    first = run_steps(case, "native", tensors, True)
    second = run_steps(case, "native", tensors, True)
    for a, b in zip([first[0], first[1], *first[3]], [second[0], second[1], *second[3]]):
        assert torch.equal(a, b)


# Pre-activations at every kink of the activations, beside them, and not finite.
ACTIVATION_EDGES = [-math.inf, -6.5, -3.0, -2.75, -0.5, -0.0, 0.0, 0.25, 2.75, 3.0, 3.5, 6.0, 6.5]
ACTIVATION_EDGES += [math.inf, math.nan, -20.0, 20.0, -100.0, 100.0]


@pytest.mark.parametrize(
    "backend, device",
    [
        NATIVE_CPU,
        pytest.param("host_programs", "cpu", marks=NATIVE_CPU.marks, id="host_programs-cpu"),
        backend_param("triton", "cpu"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
def test_activation_edges_like_torch(backend, device, dtype, activation):
    """Each activation and its gradient at its kinks (hardswish's backward is 0 at -3 and passes
    the gradient at 3, relu's 0 at 0, relu6's 0 at 0 and 6), at -0 and +-inf, and the output at
    NaN, as PyTorch's modules and autograd compute them: eval BN that is exactly the identity
    (variance + eps = 1) after a depthwise 1x1 convolution of weight 1, so the activation sees
    the input."""
    x = torch.tensor(ACTIVATION_EDGES, dtype=dtype).view(1, 1, 1, -1).repeat(2, 3, 2, 1)
    c = x.shape[1]
    eps = 2.0**-10
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rm, rv = torch.zeros(c, dtype=bn_dtype), torch.full((c,), 1 - eps, dtype=bn_dtype)
    bn_w, bn_b = torch.ones(c, dtype=bn_dtype), torch.zeros(c, dtype=bn_dtype)
    w = torch.ones(c, 1, 1, 1, dtype=dtype)
    grad_out = torch.linspace(-2, 2, x.numel(), dtype=dtype).view(x.shape)
    name = None if activation == "none" else activation
    x_got, x_want = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = kernels.depthwise_bn_act(
        x_got, w, rm, rv, bn_w, bn_b, training=False, eps=eps, activation=name, backend=backend
    )
    (grad_got,) = torch.autograd.grad(got, x_got, grad_out)
    want = apply_activation(x_want, activation)
    (grad_want,) = torch.autograd.grad(want, x_want, grad_out)
    # silu's exp may differ in the last bit between PyTorch's vectorised loops and libm, and the
    # interpreter may round float32 to bfloat16 differently: by one bfloat16 step.
    tol = dict(atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
    if activation == "silu":
        tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    # At NaN PyTorch's own gradient depends on the loop (its vectorised and scalar loops of
    # hardtanh_backward and hardswish_backward disagree), so NaN inputs are left out here.
    number = ~x.isnan()
    torch.testing.assert_close(grad_got[number], grad_want[number], equal_nan=True, **tol)


@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
def test_empty_batch_like_reference(conv):
    case = FusedCase(conv, 0, 4, 4 if conv == "depthwise" else 6, 5, 5)
    x, w, bn_w, bn_b, rm, rv = case.make()
    rm_before = rm.clone()
    out = FUNCTIONS[conv](
        x, w, rm, rv, bn_w, bn_b, training=True, backend="native", **case.conv_args()
    )
    assert out.shape[0] == 0 and out.shape[1] == case.c_out
    torch.testing.assert_close(rm, rm_before)


def test_autocast_cpu_bfloat16():
    """Under autocast the convolution runs in the autocast dtype with float32 BN statistics, as
    conv + nn.BatchNorm2d do."""
    case = FusedCase("pointwise", 2, 8, 16, 5, 5, "channels_last")
    x, w, bn_w, bn_b, rm, rv = case.make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels.pointwise_bn_act(
            x, w, rm.clone(), rv.clone(), bn_w, bn_b, training=True, backend="native"
        )
        want = F.relu(F.batch_norm(F.conv2d(x, w), rm.clone(), rv.clone(), bn_w, bn_b, True))
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **TOLERANCES[torch.bfloat16])


def test_cuda_kernels_registered():
    if skip_unless_cuda_build():
        pytest.skip("CPU-only build")
    for conv, which in itertools.product(("pointwise", "depthwise"), ("fwd", "bwd")):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(
            f"depsep::{conv}_bn_act_{which}", "CUDA"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_channels_last_half_train_steps(backend):
    """A MobileNet-sized layer in float16 training, against the reference on the GPU."""
    case = FusedCase("pointwise", 8, 128, 256, 28, 28, "channels_last")
    assert_matches_reference(case, backend, "cuda", torch.float16, True, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
def test_a_5_percent_error_fails_in_every_dtype(conv, dtype):
    """The comparison can fail: the results of a real run pass, and the same results with any
    one of them (the output, a running statistic or a gradient) 5% off fail, in every dtype."""
    case = FusedCase(conv, 2, 8, 8 if conv == "depthwise" else 16, 6, 6, "channels_last")
    tensors = case.make("cpu", dtype)
    got = run_steps(case, "native", tensors, True, "relu")
    want = exact_run(case, tensors, True, "relu")
    eager = run_steps(case, "torch", tensors, True, "relu")
    triples = list(zip(got[:3], want[:3], eager[:3])) + list(zip(got[3], want[3], eager[3]))
    assert len(triples) == 7
    for index, (g, w, e) in enumerate(triples):
        assert_close_to_exact(g, w, ACCURACY[dtype], f"result {index}", e)
        off = g * 1.05
        with pytest.raises(AssertionError):
            assert_close_to_exact(off, w, ACCURACY[dtype], f"result {index}", e)


@pytest.mark.parametrize("backend", ["native", "host_programs"])
def test_bn_scale_is_float32_math(backend):
    """1 / sqrt(var + eps) in float32 arithmetic, as the GPU's float sqrt and division give it
    (a double sqrt on the host would round the quotient differently): a 1x1 depthwise
    convolution of ones with weight 1, mean 0 and beta 0 outputs the BN scale itself."""
    c = 4096
    var = torch.rand(c, generator=torch.Generator().manual_seed(0)) * 4
    eps = 1e-5
    x = torch.ones(1, c, 1, 1)
    out = kernels.depthwise_bn_act(
        x,
        torch.ones(c, 1, 1, 1),
        torch.zeros(c),
        var,
        torch.ones(c),
        torch.zeros(c),
        eps=eps,
        training=False,
        activation=None,
        backend=backend,
    )
    # numpy's float32 sqrt and division are IEEE's, correctly rounded (torch's CPU sqrt is not).
    v = var.numpy() + np.float32(eps)
    want = torch.from_numpy(np.float32(1) / np.sqrt(v))
    assert torch.equal(out.flatten(), want)
