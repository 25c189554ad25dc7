"""kernels.depthwise_conv2d against F.conv2d(groups=C): values, gradients, layouts, compile."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _ops, reference

from .common import (
    ACCURACY,
    HAS_CUDA,
    TOLERANCES,
    DepthwiseCase,
    assert_close_to_exact,
    backend_param,
    backend_params,
    depthwise_cases,
    interpreter_cases,
    misaligned_channels_last,
    ops,
)


def pair(value) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value, value]


def depthwise(case: DepthwiseCase, backend: str, x, w, b):
    """The case's convolution: through the public function where its padding is in F.conv2d's
    form, straight through the backend's op for a (top, bottom, left, right) padding."""
    four_sided = isinstance(case.padding, tuple) and len(case.padding) == 4
    if backend == "torch":
        if four_sided:
            top, bottom, left, right = case.padding
            x = F.pad(x, (left, right, top, bottom))
        args = {**case.conv_args(), "padding": 0} if four_sided else case.conv_args()
        return reference.depthwise_conv(x, w, b, **args)
    if four_sided:
        stride, padding, dilation = pair(case.stride), list(case.padding), pair(case.dilation)
        return _ops.DepthwiseConv2d.apply(ops(backend), x, w, b, stride, padding, dilation)
    return kernels.depthwise_conv2d(x, w, b, **case.conv_args(), backend=backend)


def run_with_grads(case: DepthwiseCase, backend, device="cpu", dtype=torch.float32):
    """Output and (input, weight, bias) gradients of `backend` for one case under a fixed
    upstream gradient, then the same from the reference computed in float64 on the very same
    values (so low-precision results are judged against exact ones), and from the reference in
    the case's dtype (eager PyTorch's own rounding, the yardstick of cancelling sums)."""
    x, w, b = case.make(device, dtype, requires_grad=True)
    inputs = [t for t in (x, w, b) if t is not None]

    def run(backend, tensors):
        out = depthwise(case, backend, *tensors, *([None] * (3 - len(tensors))))
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return out, torch.autograd.grad(out, tensors, grad_out.to(dtype).to(out))

    exact = [t.detach().double().requires_grad_() for t in inputs]
    eager = [t.detach().clone().requires_grad_() for t in inputs]
    return run(backend, inputs), run("torch", exact), run("torch", eager)


def assert_matches_reference(case, backend, device="cpu", dtype=torch.float32):
    (out, grads), (exact_out, exact_grads), (eager_out, eager_grads) = run_with_grads(
        case, backend, device, dtype
    )
    accuracy = ACCURACY[dtype]
    assert_close_to_exact(out, exact_out, accuracy, "output", eager_out)
    for name, got, want, eager in zip(("input", "weight", "bias"), grads, exact_grads, eager_grads):
        assert got.dtype == dtype, name
        assert_close_to_exact(got, want, accuracy, f"grad {name}", eager)
    if case.layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == dtype and out.device.type == device


@pytest.mark.parametrize("case", depthwise_cases(), ids=str)
def test_native_cpu_matches_reference(case):
    if kernels.available_backends("cpu")["native"] is not None:
        pytest.fail(f"native CPU backend missing: {kernels.available_backends('cpu')['native']}")
    assert_matches_reference(case, "native")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", depthwise_cases()[:6], ids=str)
def test_native_cpu_other_dtypes(case, dtype):
    assert_matches_reference(case, "native", dtype=dtype)


ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", depthwise_cases(), ids=str)
def test_cuda_thread_programs_on_host(case, dtype):
    """The CUDA kernels' own thread programs, run for every thread index on the host,
    in every dtype: 16-byte channel vectors (4 floats, 2 doubles, 8 halves) in channels_last
    when C allows, one channel otherwise, the 3x3 and general-kernel paths, the two-pass
    weight gradient."""
    assert_matches_reference(case, "host_programs", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["host_programs", "native"])
def test_misaligned_views_take_the_scalar_programs(backend, dtype):
    """A channels_last view off a 16-byte boundary: the plan falls back to one channel per
    thread (the host run throws on any misaligned vector access), results still exact."""
    case = DepthwiseCase(2, 16, 7, 6, (3, 3), 1, 1, 1, True, "channels_last")
    x, w, b = case.make(dtype=dtype)
    x_odd = misaligned_channels_last(x).requires_grad_()
    x = x.detach().requires_grad_()
    padding = [1, 1, 1, 1]
    fwd = ops(backend).depthwise_conv2d_fwd
    out = fwd(x_odd, w, b, [1, 1], padding, [1, 1])
    want = fwd(x, w, b, [1, 1], padding, [1, 1])
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    grad = misaligned_channels_last(torch.randn_like(want))
    bwd_input = ops(backend).depthwise_conv2d_bwd_input(
        grad, w, list(x.shape), [1, 1], padding, [1, 1]
    )
    aligned_grad = grad.clone(memory_format=torch.channels_last)
    want_input = ops(backend).depthwise_conv2d_bwd_input(
        aligned_grad, w, list(x.shape), [1, 1], padding, [1, 1]
    )
    torch.testing.assert_close(bwd_input, want_input, atol=0, rtol=0)
    bwd_weight = ops(backend).depthwise_conv2d_bwd_weight(
        grad, x_odd, [3, 3], [1, 1], padding, [1, 1], True
    )
    want_weight = ops(backend).depthwise_conv2d_bwd_weight(
        aligned_grad, x, [3, 3], [1, 1], padding, [1, 1], True
    )
    torch.testing.assert_close(bwd_weight, want_weight, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", backend_params("cpu")[1:])
@pytest.mark.parametrize("case", interpreter_cases(), ids=str)
def test_triton_interpreter_matches_reference(case, backend):
    assert_matches_reference(case, backend)


@pytest.mark.parametrize("backend", backend_params("cpu")[1:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("case", interpreter_cases()[:2], ids=str)
def test_triton_interpreter_other_dtypes(case, dtype, backend):
    assert_matches_reference(case, backend, dtype=dtype)


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", depthwise_cases(), ids=str)
def test_native_cuda_matches_reference(case, dtype):
    assert_matches_reference(case, "native", "cuda", dtype)


# Every new shape compiles the Triton kernels again: the interpreter's grid keeps it short.
@pytest.mark.parametrize("backend", backend_params("cuda")[1:])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", interpreter_cases(), ids=str)
def test_triton_cuda_matches_reference(case, dtype, backend):
    assert_matches_reference(case, backend, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_mobilenet_layer_bf16_channels_last(backend):
    """A full-size MobileNet layer (the benchmark's shapes) in the fast configuration."""
    case = DepthwiseCase(8, 128, 56, 56, (3, 3), 2, 1, 1, False, "channels_last")
    assert_matches_reference(case, backend, "cuda", torch.bfloat16)


def test_gradcheck_native_float64():
    case = DepthwiseCase(2, 3, 6, 5, (3, 2), (2, 1), (1, 2), (1, 2), True, "channels_last")
    x, w, b = case.make(dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda *t: kernels.depthwise_conv2d(*t, **case.conv_args(), backend="native"), (x, w, b)
    )


def test_gradgradcheck_native_float64():
    """Double backward goes through the backward ops' own autograd formulas."""
    case = DepthwiseCase(1, 2, 5, 4, (3, 3), (2, 1), (1, 0), (1, 1), True, "nchw")
    x, w, b = case.make(dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(
        lambda *t: kernels.depthwise_conv2d(*t, **case.conv_args(), backend="native"), (x, w, b)
    )


def test_bias_gradient_alone():
    """Only the bias requires grad: no input is saved, the bias gradient still comes out."""
    case = DepthwiseCase(2, 4, 5, 5, (3, 3), 1, 1, 1, True)
    x, w, b = case.make()
    b.requires_grad_()
    out = kernels.depthwise_conv2d(x, w, b, padding=1, backend="native")
    (grad,) = torch.autograd.grad(out.sum() * 2, b)
    torch.testing.assert_close(grad, torch.full_like(b, 2 * 5 * 5 * 2))


def _opcheck_samples(backend, device):
    case = DepthwiseCase(2, 8, 7, 6, (3, 3), 2, 1, 1, True, "channels_last")
    x, w, b = case.make(device, requires_grad=True)
    geometry = ([2, 2], [1, 0, 2, 1], [1, 1])
    go = torch.randn(2, 8, 3, 4, device=device)
    return [
        (ops(backend).depthwise_conv2d_fwd, (x, w, b, *geometry)),
        (ops(backend).depthwise_conv2d_fwd, (x.contiguous(), w, None, *geometry)),
        (ops(backend).depthwise_conv2d_bwd_input, (go, w, [2, 8, 7, 6], *geometry)),
        (ops(backend).depthwise_conv2d_bwd_weight, (go, x.detach(), [3, 3], *geometry, True)),
    ]


# Triton under the interpreter is left out: opcheck's fake-tensor check cannot run a
# triton_op body there (it touches storage); its opcheck runs on the GPU.
@pytest.mark.parametrize(
    "backend,device",
    [
        backend_param("native", "cpu"),
        backend_param("native", "cuda"),
        backend_param("triton", "cuda"),
    ],
)
def test_opcheck(backend, device):
    for operator, args in _opcheck_samples(backend, device):
        torch.library.opcheck(operator, args)


@pytest.mark.parametrize("backend", [None, "native"])
def test_compile_fullgraph_cpu(backend):
    """torch.compile traces backend choice and the op (through its fake kernel): no graph
    break, same numbers."""
    case = DepthwiseCase(2, 8, 9, 9, (3, 3), 1, 1, 1, True, "channels_last")
    x, w, b = case.make()

    def block(x, w, b):
        return torch.relu(kernels.depthwise_conv2d(x, w, b, padding=1, backend=backend)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), block(x, w, b))
    torch.testing.assert_close(
        compiled(x, w, b), torch.relu(F.conv2d(x, w, b, 1, 1, 1, 8)) * 2, **TOLERANCES[x.dtype]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_compile_inductor_cuda(backend):
    """Inductor compiles a block with the fast op, forward and backward, without graph breaks;
    with the Triton backend the generated code launches our Triton kernels themselves."""
    from torch._inductor.utils import run_and_get_code

    case = DepthwiseCase(4, 32, 16, 16, (3, 3), 1, 1, 1, True, "channels_last")
    x, w, b = case.make("cuda", requires_grad=True)

    def block(x, w, b):
        return torch.relu(kernels.depthwise_conv2d(x, w, b, padding=1, backend=backend))

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)

    def step():
        out = compiled(x, w, b)
        out.sum().backward()
        return out

    out, code = run_and_get_code(step)
    torch.testing.assert_close(
        out, torch.relu(F.conv2d(x, w, b, 1, 1, 1, 32)), **TOLERANCES[x.dtype]
    )
    assert x.grad is not None and w.grad is not None and b.grad is not None
    if backend == "triton":
        generated = "\n".join(code)
        for kernel in ("_depthwise_gather_nhwc_kernel", "_depthwise_wgrad_partial_nhwc_kernel"):
            assert kernel in generated, f"{kernel} missing from the compiled code"


def test_weight_gradient_is_deterministic_across_thread_counts():
    """Two-pass fixed-order reduction: bitwise the same whatever the thread pool does."""
    case = DepthwiseCase(4, 16, 24, 24, (3, 3), 1, 1, 1, True, "channels_last")
    x, w, _ = case.make()
    go = torch.randn(4, 16, 24, 24).contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for backend in ("native", "host_programs"):
            for n in (1, max(2, threads)):
                torch.set_num_threads(n)
                grads = ops(backend).depthwise_conv2d_bwd_weight(
                    go, x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], True
                )
                results.append((backend, grads))
    finally:
        torch.set_num_threads(threads)
    for backend, (grad_weight, grad_bias) in results:
        first = next(g for name, g in results if name == backend)
        assert torch.equal(grad_weight, first[0]) and torch.equal(grad_bias, first[1]), backend


@pytest.mark.parametrize(
    "backend,device",
    [backend_param(name, device) for device in ("cpu", "cuda") for name in ("native", "triton")],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weight_gradient_is_deterministic(backend, device, layout):
    """Run twice, bitwise equal; on a GPU at a size with many partial chunks."""
    big = device == "cuda"
    case = DepthwiseCase(
        16 if big else 2,
        64 if big else 5,
        56 if big else 17,
        56 if big else 17,
        (3, 3),
        1,
        1,
        1,
        True,
        layout,
    )
    dtype = torch.bfloat16 if big else torch.float32
    x, _, _ = case.make(device, dtype)
    go = torch.randn_like(x)
    args = (go, x, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], True)
    first, second = (
        ops(backend).depthwise_conv2d_bwd_weight(*args),
        ops(backend).depthwise_conv2d_bwd_weight(*args),
    )
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch_returns_empty_result_and_zero_grads(backend, layout):
    case = DepthwiseCase(0, 4, 5, 5, (3, 3), 1, 1, 1, True, layout)
    x, w, b = case.make(requires_grad=True)
    out = kernels.depthwise_conv2d(x, w, b, padding=1, backend=backend)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.zeros_like(w))
    torch.testing.assert_close(b.grad, torch.zeros_like(b))


def test_nan_and_inf_propagate_like_the_reference():
    x = torch.randn(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    w = torch.randn(4, 1, 3, 3)
    out = kernels.depthwise_conv2d(x, w, padding=1, backend="native")
    torch.testing.assert_close(out, F.conv2d(x, w, None, 1, 1, 1, 4), equal_nan=True)


def test_autocast_casts_like_conv2d():
    case = DepthwiseCase(2, 8, 7, 7, (3, 3), 1, 1, 1, True, "channels_last")
    x, w, b = case.make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.depthwise_conv2d(x, w, b, padding=1, backend="native")
        ref = F.conv2d(x, w, b, 1, 1, 1, 8)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_tensor_past_2_to_the_31_elements():
    """64-bit offsets: a channels_last input of 2^31 + some elements, checked on its last rows."""
    n, c, h, w = 1, 8, 8192, 32769  # 2,147,549,184 elements
    try:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c, 1, 3, 3, device="cuda", dtype=torch.float16)
    out = kernels.depthwise_conv2d(x, wt, padding=1, backend="native")
    tail = x[:, :, -4:, :]
    ref = F.conv2d(tail.float(), wt.float(), None, 1, (0, 1), 1, c)
    torch.testing.assert_close(out[:, :, -3:-1, :].float(), ref, atol=2e-2, rtol=2e-2)
