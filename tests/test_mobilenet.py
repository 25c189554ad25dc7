"""mobilenet.DepSepConv and mobilenet.MobileNet against the reference block and model: same
structure and state_dict, same outputs, gradients and running statistics in train and eval mode,
computed by the fused ops of every backend."""

import collections
import contextlib
import copy
import re
import unittest.mock

import pytest
import torch
from torch import nn

import kernels
import mobilenet
from mobilenet import reference, train
from mobilenet.reference import mult_adds

from .common import TOLERANCES, backend_params

TORCH = pytest.param("torch", id="torch")
NATIVE, TRITON = backend_params("cpu")
# Whole-model tests skip Triton: the interpreter runs each program instance in Python.
CPU_BACKENDS = [TORCH, NATIVE, TRITON]
MODEL_BACKENDS = [TORCH, NATIVE]
# Whole-model input. Training-mode BatchNorm over few values per channel amplifies rounding
# through the 27 layers: at 32x32 the last blocks normalise 2 values per channel and the
# reference's own float32 outputs are ~1e-3 off float64; at 64x64, ~1e-5 (gradients ~1e-4 of
# their largest value). Whole models are therefore judged against float64 (exact=True).
MODEL_INPUT = (2, 3, 64, 64)


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are tiny: on a shared 2-core machine a second OpenMP thread only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def count_fused_calls():
    """Counts the fused ops' calls per (op, backend) inside the block, a chain's stages each
    as the op that computes it: proof that the fast layers ran them rather than falling back to
    their child modules."""
    calls = collections.Counter()
    patches = contextlib.ExitStack()
    for name in ("pointwise_bn_act", "depthwise_bn_act", "depthwise_conv2d"):
        op = getattr(kernels, name)

        def spy(*args, _op=op, _name=name, **kwargs):
            calls[_name, kwargs.get("backend")] += 1
            return _op(*args, **kwargs)

        patches.enter_context(unittest.mock.patch.object(kernels, name, spy))
    chain = kernels.bn_act_chain

    def chain_spy(input, stages, **kwargs):
        for stage in stages:
            name = "depthwise_bn_act" if stage.depthwise else "pointwise_bn_act"
            calls[name, kwargs.get("backend")] += 1
        return chain(input, stages, **kwargs)

    patches.enter_context(unittest.mock.patch.object(kernels, "bn_act_chain", chain_spy))
    with patches:
        yield calls


def assert_as_accurate(actual, expected, exact, what, slack=4.0, floor=1e-3, zero_scale=0.0):
    """`actual` is as close to the float64 result `exact` as the reference's `expected`, within
    `slack` times (the two round differently), or within `floor` of the result's largest value:
    the order of accumulation alone moves float32 BatchNorm weight gradients (sums of
    dy * x_hat that largely cancel) by up to ~5e-4 of their largest value. A result that is zero
    but for float64 rounding (the gradient of a BN bias whose constant a later training-mode BN
    removes) is float32 rounding of the values it sums, of the size `zero_scale` gives (its
    module's other gradients): within 1e-4 of that."""
    if exact.numel() == 0:
        return
    exact = exact.to(torch.float64)
    error = (actual.to(torch.float64) - exact).abs().max().item()
    reference_error = (expected.to(torch.float64) - exact).abs().max().item()
    scale = exact.abs().max().item()
    bound = max(slack * reference_error, floor * scale)
    if scale <= 1e-9 * zero_scale:
        bound = max(bound, 1e-4 * zero_scale)
    assert error <= bound, (
        f"{what}: {error:.3g} off float64, the reference {reference_error:.3g} (scale {scale:.3g})"
    )


def module_gradient_scales(results: dict) -> dict[str, float]:
    """The largest gradient of each module's parameters, by module name, of _run_step's
    results."""
    scales = collections.defaultdict(float)
    for name, value in results.items():
        if name.startswith("grad of ") and value is not None and value.numel():
            module = name.removeprefix("grad of ").rpartition(".")[0]
            scales[module] = max(scales[module], value.abs().max().item())
    return scales


def _run_step(model, x, seed, training, autocast):
    """One forward, and in training a backward of a fixed random projection of the output:
    {name: tensor} of the output, input and parameter gradients, and buffers."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(training)
    cast = torch.autocast(x.device.type, autocast) if autocast else contextlib.nullcontext()
    with cast:
        y = model(xi)
    results = {"output": y.detach()}
    if training:
        projection = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
        (y * projection).sum().backward()
        results["input grad"] = xi.grad
        results.update((f"grad of {name}", p.grad) for name, p in model.named_parameters())
    results.update((name, b.clone()) for name, b in model.named_buffers())
    return results


def assert_same_training(
    reference_model: nn.Module,
    fast_model: nn.Module,
    x: torch.Tensor,
    *,
    steps: int = 2,
    autocast: torch.dtype | None = None,
    exact: bool = False,
):
    """`steps` training steps, then one in eval mode: outputs and their memory format, input and
    parameter gradients, and every buffer (running statistics, num_batches_tracked) must match
    the reference's after each, within the TOLERANCES of the dtype. With exact=True they are
    judged instead by their distance to a float64 copy of the reference, against the reference's
    own distance: for whole models and low precision, where rounding grows large."""
    tol = TOLERANCES[x.dtype if autocast is None else autocast]
    truth = copy.deepcopy(reference_model).double() if exact else None
    for step in range(steps + 1):
        training = step < steps
        what = f"step {step} ({'train' if training else 'eval'})"
        expected = _run_step(reference_model, x, step, training, autocast)
        got = _run_step(fast_model, x, step, training, autocast)
        assert got.keys() == expected.keys()
        assert got["output"].dtype == expected["output"].dtype
        cl = [r["output"].is_contiguous(memory_format=torch.channels_last) for r in (got, expected)]
        assert cl[0] == cl[1], f"{what}: memory format differs from the reference's"
        if truth is None:
            for name, value in expected.items():
                torch.testing.assert_close(
                    got[name], value, **tol, msg=lambda m, n=f"{what} {name}": f"{n}: {m}"
                )
        else:
            exact_results = _run_step(truth, x.double(), step, training, None)
            scales = module_gradient_scales(exact_results)
            for name, value in expected.items():
                module = name.removeprefix("grad of ").rpartition(".")[0]
                zero_scale = scales.get(module, 0.0) if name.startswith("grad of ") else 0.0
                assert_as_accurate(
                    got[name], value, exact_results[name], f"{what} {name}", zero_scale=zero_scale
                )


def block_pair(in_channels=4, out_channels=8, stride=1, backend="torch", seed=0):
    torch.manual_seed(seed)
    ref = reference.DepSepConv(in_channels, out_channels, stride)
    torch.manual_seed(seed)
    return ref, mobilenet.DepSepConv(in_channels, out_channels, stride, backend=backend)


def sample(shape, device="cpu", dtype=torch.float32, layout="nchw", seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def test_block_structure_and_init_match_reference():
    ref, fast = block_pair(8, 16, stride=2)
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fast.named_modules()]
    for (name, a), b in zip(ref.named_modules(), fast.modules()):
        if not list(a.children()):  # the leaves: the very same conv, BN and ReLU modules
            assert type(a) is type(b) and repr(a) == repr(b), name
    states = [m.state_dict() for m in (ref, fast)]
    assert list(states[0]) == list(states[1])
    for name, value in states[0].items():  # the same seed gives the same parameters
        assert torch.equal(states[1][name], value), name
    assert isinstance(fast.depthwise, mobilenet.ConvBNAct)
    assert isinstance(fast.pointwise, mobilenet.ConvBNAct)


def _block_cases():
    cases = []
    for backend in CPU_BACKENDS:
        for stride in (1, 2):
            for layout in ("nchw", "channels_last"):
                if backend.id == "triton" and (stride, layout) not in ((2, "channels_last"),):
                    continue  # one interpreter case; the others differ only in the kernels
                marks = backend.marks
                cases.append(pytest.param(backend.values[0], stride, layout, marks=marks))
    return cases


@pytest.mark.parametrize("backend,stride,layout", _block_cases())
def test_block_matches_reference(backend, stride, layout):
    ref, fast = block_pair(4, 8, stride, backend)
    if layout == "channels_last":
        ref.to(memory_format=torch.channels_last)
        fast.to(memory_format=torch.channels_last)
    x = sample((2, 4, 6, 5), layout=layout)
    with count_fused_calls() as calls:
        assert_same_training(ref, fast, x, steps=2)
    # Every forward ran both fused ops, on the asked backend: 2 training steps and 1 eval.
    assert calls == {("depthwise_bn_act", backend): 3, ("pointwise_bn_act", backend): 3}


def _momentum_none(block):
    block.depthwise[1].momentum = None
    block.pointwise[1].momentum = None


def _eps_and_momentum(block):
    block.depthwise[1].eps = 1e-3
    block.pointwise[1].momentum = 0.5


def _no_affine(block):
    block.depthwise[1] = nn.BatchNorm2d(4, affine=False)
    block.pointwise[1] = nn.BatchNorm2d(8, affine=False, momentum=0.3)


def _no_running_stats(block):
    # Batch statistics in eval mode too; no buffers at all.
    block.depthwise[1] = nn.BatchNorm2d(4, track_running_stats=False)
    block.pointwise[1] = nn.BatchNorm2d(8, affine=False, track_running_stats=False)


def _relu6_and_identity(block):
    block.depthwise[2] = nn.ReLU6()
    block.pointwise[2] = nn.Identity()


def _silu_and_hardswish(block):
    block.depthwise[2] = nn.SiLU()
    block.pointwise[2] = nn.Hardswish()


BN_VARIANTS = {
    "momentum_none": _momentum_none,
    "eps_momentum": _eps_and_momentum,
    "no_affine": _no_affine,
    "no_running_stats": _no_running_stats,
    "relu6_identity": _relu6_and_identity,
    "silu_hardswish": _silu_and_hardswish,
}
ACTIVATION_VARIANTS = ("relu6_identity", "silu_hardswish")


def _variant_cases():
    cases = []
    for backend in CPU_BACKENDS:
        for variant in BN_VARIANTS:
            # Triton: the settings its kernels see (momentum and the running-statistics update
            # are applied in Python, alike for every backend).
            if backend.id == "triton" and variant not in ("no_running_stats", *ACTIVATION_VARIANTS):
                continue
            cases.append(pytest.param(backend.values[0], variant, marks=backend.marks))
    return cases


@pytest.mark.parametrize("backend,variant", _variant_cases())
def test_block_honours_batchnorm_settings(backend, variant):
    ref, fast = block_pair(4, 8, 1, backend)
    for block in (ref, fast):
        BN_VARIANTS[variant](block)
    steps, shape = (1, (1, 4, 4, 4)) if backend == "triton" else (3, (2, 4, 5, 5))
    with count_fused_calls() as calls:
        assert_same_training(ref, fast, sample(shape), steps=steps)
    assert sum(calls.values()) == 2 * (steps + 1)
    if variant == "momentum_none":
        assert fast.pointwise[1].num_batches_tracked.item() == 3


@pytest.mark.parametrize("backend", [TORCH, NATIVE])
def test_block_float64(backend):
    ref, fast = block_pair(4, 8, 2, backend)
    ref.double()
    fast.double()
    assert_same_training(ref, fast, sample((2, 4, 7, 6), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_low_precision_cpu(dtype):
    """.half()/.bfloat16() on CPU, where only the torch backend computes those dtypes."""
    ref, fast = block_pair(4, 8, 1, "torch")
    ref.to(dtype)
    fast.to(dtype)
    assert_same_training(ref, fast, sample((2, 4, 5, 5), dtype=dtype), steps=1)


def test_block_autocast_cpu():
    """Under autocast the second layer gets a bfloat16 input with float32 weights, as every
    layer after the first does in a model: the fused ops cast like F.conv2d."""
    ref, fast = block_pair(4, 8, 1, "torch")
    assert_same_training(ref, fast, sample((2, 4, 5, 5)), steps=1, autocast=torch.bfloat16)


def test_block_falls_back_for_hooks_and_changed_children():
    """A hook on a child, or a child replaced by an unfusable module, makes that half run its
    modules one by one: the hook fires and the result stays the reference's."""
    ref, fast = block_pair(4, 8, 1, "torch")
    seen = []
    fast.depthwise[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    for block in (ref, fast):
        block.pointwise[2] = nn.ELU()
    with count_fused_calls() as calls:
        assert_same_training(ref, fast, sample((2, 4, 5, 5)), steps=1)
    assert len(seen) == 2
    assert sum(calls.values()) == 0


def test_conv_bn_act_rejects_what_it_cannot_fuse():
    bn = nn.BatchNorm2d(8)
    with pytest.raises(ValueError, match="ConvBNAct"):
        mobilenet.ConvBNAct(nn.Conv2d(8, 8, 3, padding=1, bias=False), bn, nn.ReLU())
    with pytest.raises(ValueError, match="ConvBNAct"):
        mobilenet.ConvBNAct(nn.Conv2d(8, 8, 1), bn, nn.ReLU())  # bias
    with pytest.raises(ValueError, match="ConvBNAct"):
        mobilenet.ConvBNAct(nn.Conv2d(8, 8, 1, bias=False), bn, nn.GELU())
    fused = mobilenet.ConvBNAct(nn.Conv2d(4, 8, 1, bias=False), bn)  # no activation
    assert fused.fused_runs == {"0": ("0", "1")}
    assert list(fused.state_dict()) == [
        "0.weight",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    ]


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_depthwise_conv2d_module_matches_conv2d(backend):
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=6)
    fast = mobilenet.DepthwiseConv2d(
        6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), backend=backend
    )
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    with count_fused_calls() as calls:
        assert_same_training(ref, fast, sample((2, 6, 7, 9), layout="channels_last"))
    assert calls == {("depthwise_conv2d", backend): 3}


def model_pair(alpha=0.25, num_classes=10, backend="torch"):
    torch.manual_seed(0)
    ref = reference.MobileNet(alpha, num_classes)
    torch.manual_seed(1)  # different parameters until the checkpoint is loaded
    fast = mobilenet.MobileNet(alpha, num_classes, backend=backend)
    return ref, fast


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_mobilenet_loads_reference_checkpoint(backend):
    ref, fast = model_pair(backend=backend)
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fast.named_modules()]
    fast.load_state_dict(ref.state_dict(), strict=True)
    with count_fused_calls() as calls:
        assert_same_training(ref, fast, sample(MODEL_INPUT), steps=1, exact=True)
    assert calls == {("depthwise_bn_act", backend): 26, ("pointwise_bn_act", backend): 26}


class _Stem(nn.Module):
    """A full-convolution stem as nn.Modules: conv (bias and groups as given) -> BN -> ReLU."""

    def __init__(self, bias=False, groups=1, affine=True, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias, groups=groups)
        self.bn = nn.BatchNorm2d(6, affine=affine, momentum=momentum)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _RecomputedStem(_Stem):
    def forward(self, x):
        return mobilenet.layers.run_recomputed(x, self.conv, self.bn, self.act)[0]


@pytest.mark.parametrize(
    "options",
    [{}, {"bias": True, "groups": 2}, {"affine": False, "momentum": None}],
    ids=["plain", "bias-groups", "no-affine-cumulative"],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_recomputed_run_matches_the_modules(options, layout):
    """run_recomputed computes the modules' outputs, gradients and buffers over two training
    steps and an eval step: the running statistics move once per step, not again in backward."""
    torch.manual_seed(0)
    ref = _Stem(**options)
    fast = _RecomputedStem(**options)
    fast.load_state_dict(ref.state_dict())
    assert_same_training(ref, fast, sample((2, 4, 9, 8), layout=layout))


def test_recomputed_run_keeps_only_its_input():
    """Autograd keeps the input and the parameters, no convolution or BN output; the backward
    still gives every gradient."""
    stem = _RecomputedStem(bias=True)
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = stem(x)
    parameters = {p.data_ptr() for p in stem.parameters()}
    activations = [t for t in saved if t.data_ptr() not in parameters]
    assert [t.data_ptr() for t in activations] == [x.data_ptr()]
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in stem.parameters())


def test_run_recomputed_computes_its_output_again_bit_for_bit():
    """The second result of run_recomputed computes the run's output again, equal to the
    forward's bit for bit in training (the batch's statistics, the running ones moved once) and
    in eval, in both layouts and under autocast; it refuses once a parameter changed in place."""
    torch.manual_seed(0)
    stem = _Stem(bias=True)
    for layout in ("nchw", "channels_last"):
        x = sample((2, 4, 9, 8), layout=layout)
        for training, dtype in ((True, None), (False, None), (True, torch.bfloat16)):
            stem.train(training)
            buffers = [b.clone() for b in stem.bn.buffers()]
            with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
                out, again = mobilenet.layers.run_recomputed(x, stem.conv, stem.bn, stem.act)
            moved = [b.clone() for b in stem.bn.buffers()]
            assert not training or not torch.equal(moved[0], buffers[0])
            recomputed = again()
            assert recomputed.dtype == out.dtype and torch.equal(recomputed, out)
            assert all(torch.equal(a, b) for a, b in zip(stem.bn.buffers(), moved))
    with torch.no_grad():
        stem.conv.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        again()


def _model_saved_bytes(model, x, stem_plain: bool = False) -> int:
    """What autograd keeps of a call of `model` (any callable), once per storage."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with contextlib.ExitStack() as stack:
        if stem_plain:
            stack.enter_context(
                unittest.mock.patch.object(mobilenet.model, "recomputable_run", lambda *a: False)
            )
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        model(x)
    return sum(storages.values())


def test_mobilenet_stem_and_first_block_keep_only_the_image():
    """In training the fused MobileNet keeps the image alone of its stem and first block: what
    the whole model saves drops by the stem's convolution output (its BN's input) and by the
    stem's output (the first block's chain input) against the same model with a plain stem,
    and the training step is the plain stem's (the chain computes the stem's output again)."""
    torch.manual_seed(0)
    model = mobilenet.MobileNet(0.25, 10, backend="native")
    x = torch.randn(2, 3, 64, 64)
    conv_output = stem_output = 2 * 8 * 32 * 32 * 4
    saved = _model_saved_bytes(model, x)
    assert _model_saved_bytes(model, x, stem_plain=True) - saved >= conv_output + stem_output
    # All that autograd keeps of the stem and the first block is the image (beside parameters
    # and per-channel statistics).
    first = _model_saved_bytes(model.stem_and_first_block, x)
    assert x.numel() * 4 <= first < x.numel() * 4 + 4096
    # Two training steps give the plain stem's outputs, gradients and buffers bit for bit.
    plain = mobilenet.MobileNet(0.25, 10, backend="native")
    plain.load_state_dict(model.state_dict())
    x.requires_grad_(True)
    for step in range(2):
        results = []
        for m, stem_plain in ((model, False), (plain, True)):
            m.zero_grad()
            x.grad = None
            with unittest.mock.patch.object(
                mobilenet.model,
                "recomputable_run",
                (lambda *a: False) if stem_plain else (mobilenet.layers.recomputable_run),
            ):
                out = m(x)
            out.square().sum().backward()
            results.append([out, x.grad, *(p.grad for p in m.parameters()), *m.buffers()])
        for got, expected in zip(*results):
            assert torch.equal(got, expected), f"step {step}"


def test_mobilenet_same_init_as_reference():
    torch.manual_seed(0)
    ref = reference.MobileNet(0.5)
    torch.manual_seed(0)
    fast = mobilenet.MobileNet(0.5)
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name


PAPER = [  # alpha, parameters (millions), mult-adds at 224 (millions)
    (1.0, 4.2, 569),
    (0.75, 2.6, 325),
    (0.5, 1.3, 149),
    (0.25, 0.5, 41),
]


@pytest.mark.parametrize("alpha,params_m,mult_adds_m", PAPER)
def test_mobilenet_paper_counts(alpha, params_m, mult_adds_m):
    model = mobilenet.MobileNet(alpha)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m
    assert round(mult_adds(model) / 1e6) == pytest.approx(mult_adds_m, abs=1)


@pytest.mark.parametrize(
    "rho,resolution,mult_adds_m",
    [(1.0, 224, 569), (0.857, 192, 418), (0.714, 160, 290), (0.571, 128, 186)],
)
def test_resolution_multiplier(rho, resolution, mult_adds_m):
    assert mobilenet.input_size(rho) == resolution
    if rho != 1.0:  # 224 is in test_mobilenet_paper_counts
        mult = mult_adds(mobilenet.MobileNet(1.0), mobilenet.input_size(rho))
        assert round(mult / 1e6) == pytest.approx(mult_adds_m, abs=1)


def test_input_size_exact_fractions_and_bad_values():
    assert [mobilenet.input_size(k / 7) for k in (7, 6, 5, 4)] == [224, 192, 160, 128]
    for bad in (0, -0.5, "1", True):
        with pytest.raises(ValueError, match="resolution_multiplier"):
            mobilenet.input_size(bad)


@pytest.mark.parametrize("backend", [NATIVE])
def test_compiled_converted_model_has_no_graph_breaks(backend):
    """fullgraph=True fails on any graph break: the fused ops (through their fake kernels), the
    running-statistics update and num_batches_tracked (default momentum) trace into one graph,
    forward and backward. One training step against the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        reference.DepSepConv(8, 16),
        reference.DepSepConv(16, 16, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    ref = copy.deepcopy(model)
    fast = mobilenet.convert(model, backend=backend)
    fast.compile(fullgraph=True, backend="aot_eager")  # in place: same parameter names
    x = sample((2, 3, 8, 8))
    try:
        got = _run_step(fast, x, 0, True, None)
    finally:
        torch._dynamo.reset()
    expected = _run_step(ref, x, 0, True, None)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_train_example(backend, capsys):
    # 64x64, not less: at 32x32 the last blocks normalise 2 values per channel and the first
    # loss of any two float32 implementations (the reference against float64 too) differs by
    # ~1e-3 (MODEL_INPUT's note).
    argv = ["--synthetic", "--alpha", "0.25", "--batch", "2", "--resolution", "64"]
    argv += ["--steps", "2", "--warmup", "1", "--device", "cpu", "--backend", backend]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    rates = dict(re.findall(r"(reference|fast):\s+([0-9.]+) images/s", out))
    assert set(rates) == {"reference", "fast"} and all(float(r) > 0 for r in rates.values())
    # Same parameters, same batch: the same loss before any update (later ones drift apart).
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+) \(first step\)", out)]
    assert len(losses) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4), out
    assert "speed-up" in out


def test_train_example_needs_synthetic():
    with pytest.raises(SystemExit):
        train.parse_args(["--alpha", "0.25"])


# --- GPU: every backend, low precision, autocast (run by `make gpu-check`) ---
# Judged against float64 (exact=True): cuDNN may use TF32 for float32 convolutions, and low
# precision rounds differently in every implementation.

CUDA_BACKENDS = [pytest.param("torch", id="torch", marks=pytest.mark.gpu), *backend_params("cuda")]


def assert_cuda_matches_reference(ref, fast, x, mode, layout):
    dtype = getattr(torch, mode) if mode in ("float16", "bfloat16") else torch.float32
    for model in (ref, fast):
        model.cuda().to(dtype)
        if layout == "channels_last":
            model.to(memory_format=torch.channels_last)
    x = x.cuda().to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.float16 if mode == "autocast" else None
    assert_same_training(ref, fast, x, steps=2, autocast=autocast, exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mode", ["float32", "float16", "bfloat16", "autocast"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_block_matches_reference(backend, mode, layout):
    ref, fast = block_pair(16, 32, 2, backend)
    assert_cuda_matches_reference(ref, fast, sample((4, 16, 14, 14)), mode, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mode", ["float32", "autocast"])
def test_cuda_mobilenet_matches_reference(backend, mode):
    ref, fast = model_pair(alpha=0.5, num_classes=100, backend=backend)
    fast.load_state_dict(ref.state_dict())
    assert_cuda_matches_reference(ref, fast, sample((8, 3, 64, 64)), mode, "channels_last")
