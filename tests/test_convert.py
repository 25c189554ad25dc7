"""mobilenet.convert()/revert() on the reference MobileNet, plain nn.Sequential stacks,
torchvision-style blocks, every activation the fused ops apply and timm's BatchNormAct2d; and
convert(sync_bn=True) under DistributedDataParallel with two processes. timm's blocks and the
real networks of timm and torchvision: tests/test_models.py."""

import collections
import copy
import os
import sys
import time
import unittest.mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import mobilenet
from kernels._common import ACTIVATION_CODES
from mobilenet import ConvBNAct, DepthwiseConv2d, FusedSequential, convert, reference, revert
from mobilenet.layers import activation_op

from .common import backend_params
from .test_mobilenet import (  # noqa: F401  (one_thread: an autouse fixture, here too)
    MODEL_BACKENDS,
    MODEL_INPUT,
    NATIVE,
    assert_same_training,
    count_fused_calls,
    one_thread,
    sample,
)


def snapshot(model: nn.Module):
    """What revert must give back: each module's name, class and attribute names, and the
    state."""
    modules = [(name, type(m), sorted(vars(m))) for name, m in model.named_modules()]
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_snapshot(before, after):
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for name, value in before[1].items():
        assert torch.equal(after[1][name], value), name


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_reference_mobilenet(backend):
    torch.manual_seed(0)
    model = reference.MobileNet(0.25, num_classes=10)
    before = snapshot(model)
    fast = convert(model, backend=backend, inplace=False)
    assert_same_snapshot(before, snapshot(model))  # inplace=False: the original is untouched
    assert list(fast.state_dict()) == list(model.state_dict())
    # Each block's two halves, exactly; the stem (a full 3x3 conv, attributes) stays as it is.
    converted = [name for name, m in fast.named_modules() if type(m) is ConvBNAct]
    assert len(converted) == 26 and "conv5.3.pointwise" in converted
    assert type(fast.conv1) is nn.Conv2d and type(fast.bn1) is nn.BatchNorm2d
    with count_fused_calls() as calls:
        assert_same_training(model, fast, sample(MODEL_INPUT), steps=1, exact=True)
    assert calls == {("depthwise_bn_act", backend): 26, ("pointwise_bn_act", backend): 26}


def plain_stack() -> nn.Sequential:
    """One of each pattern convert() handles, and of each it must leave alone."""
    return nn.Sequential(
        nn.Conv2d(4, 8, 1, bias=False),  # 0-2: pointwise run
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # 3-5: depthwise run, ReLU6
        nn.BatchNorm2d(8, momentum=0.3),
        nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 1, bias=False),  # 6-7: conv + BN fused; 8: ELU, not fusable, after it
        nn.BatchNorm2d(8, track_running_stats=False),
        nn.ELU(),
        nn.Conv2d(8, 8, 1),  # 9-11: a bias before BN: left alone
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),  # 12-13: grouped, not depthwise
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8),  # 14: bare depthwise (with bias)
        nn.GELU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),  # 16-18: dilated run
        nn.BatchNorm2d(8, affine=False),
        nn.Identity(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False, padding_mode="reflect"),  # 19: alone
        nn.BatchNorm2d(8),
    )


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_plain_sequential_stack(backend):
    torch.manual_seed(0)
    model = plain_stack()
    fast = convert(plain_stack(), backend=backend)
    fast.load_state_dict(model.state_dict())
    assert type(fast) is FusedSequential
    assert fast.fused_runs == {
        "0": ("0", "1", "2"),
        "3": ("3", "4", "5"),
        "6": ("6", "7"),
        "16": ("16", "17", "18"),
    }
    assert type(fast[14]) is DepthwiseConv2d
    assert all(type(fast[i]) is nn.Conv2d for i in (0, 3, 6, 9, 12, 16, 19))
    steps = 2
    with count_fused_calls() as calls:
        assert_same_training(model, fast, sample((2, 4, 7, 6)), steps=steps)
    forwards = steps + 1
    assert calls == {
        ("pointwise_bn_act", backend): 2 * forwards,
        ("depthwise_bn_act", backend): 2 * forwards,
        ("depthwise_conv2d", backend): forwards,
    }


class ConvNormActivation(nn.Sequential):
    """Shaped like torchvision.ops.Conv2dNormActivation: a Sequential subclass without its own
    forward, with extra attributes."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, act=nn.ReLU6):
        layers = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
        ]
        super().__init__(*layers, nn.BatchNorm2d(cout), act(inplace=True))
        self.out_channels = cout


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: the input is used twice (the residual)."""

    def __init__(self, channels, expand):
        super().__init__()
        hidden = channels * expand
        self.conv = nn.Sequential(
            ConvNormActivation(channels, hidden, 1),
            ConvNormActivation(hidden, hidden, 3, groups=hidden),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.conv(x)


class AttributeBlock(nn.Module):
    """A custom forward using conv and bn as attributes, the conv output used twice: only the
    bare depthwise conv may be swapped."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CustomSequential(nn.Sequential):
    """A Sequential subclass with its own forward: its children may not feed each other."""

    def forward(self, x):
        return self[1](self[0](x)) + self[0](x)


def mobile_blocks() -> nn.Sequential:
    return nn.Sequential(
        ConvNormActivation(3, 8, stride=2),  # full 3x3 conv: left alone
        InvertedResidual(8, 2),
        AttributeBlock(8),
        CustomSequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)),
        ConvNormActivation(8, 16, 1, act=nn.ELU),  # conv + BN fused, ELU apart
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_torchvision_style_blocks(backend):
    torch.manual_seed(0)
    model = mobile_blocks()
    before = snapshot(model)
    fast = convert(copy.deepcopy(model), backend=backend)
    assert type(fast[0]) is ConvNormActivation
    inverted = fast[1].conv
    assert type(inverted) is FusedSequential and inverted.fused_runs == {"2": ("2", "3")}
    assert type(inverted[0]) is ConvBNAct and type(inverted[1]) is ConvBNAct
    assert inverted[0].out_channels == 16  # the subclass's attributes stay
    assert type(fast[2].conv) is DepthwiseConv2d and type(fast[2].bn) is nn.BatchNorm2d
    assert type(fast[3]) is CustomSequential and type(fast[3][0]) is nn.Conv2d
    assert type(fast[4]) is FusedSequential and fast[4].fused_runs == {"0": ("0", "1")}
    assert_same_training(model, fast, sample((2, 3, 8, 8)), steps=2)
    revert(fast)
    revert(model)  # nothing converted there: a no-op
    assert snapshot(fast)[0] == before[0] == snapshot(model)[0]


def test_filter_fn_chooses_by_module_and_name():
    model = reference.MobileNet(0.25, num_classes=10)
    seen = []

    def only_conv3(conv, fqn):
        assert isinstance(conv, nn.Conv2d) and model.get_submodule(fqn) is conv
        seen.append(fqn)
        return fqn.startswith("conv3.")

    convert(model, filter_fn=only_conv3)
    assert "conv2.depthwise.0" in seen and "conv6.1.pointwise.0" in seen
    converted = sorted(name for name, m in model.named_modules() if isinstance(m, ConvBNAct))
    assert converted == [f"conv3.{i}.{half}" for i in (0, 1) for half in ("depthwise", "pointwise")]


def test_keeps_dtype_device_training_flag_requires_grad_and_parameters():
    torch.manual_seed(0)
    model = plain_stack().double().eval()
    model[1].train()  # mixed training flags stay mixed
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    reference_model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    convert(model, backend="torch")
    assert all(p is params[name] for name, p in model.named_parameters())  # the same objects
    for (name, a), b in zip(reference_model.named_modules(), model.modules()):
        assert a.training == b.training, name
    for name, p in model.named_parameters():
        assert p.requires_grad == reference_model.get_parameter(name).requires_grad, name
    x = sample((2, 4, 7, 6), dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_model(x))
    torch.testing.assert_close(model[1].running_mean, reference_model[1].running_mean)


def test_hooked_modules_are_not_fused():
    model = plain_stack()
    calls = []
    model[4].register_forward_hook(lambda module, args, out: calls.append(1))
    convert(model, backend="torch")
    assert "3" not in model.fused_runs and "0" in model.fused_runs
    assert type(model[3]) is DepthwiseConv2d  # no longer in a run: a bare depthwise conv
    model(sample((2, 4, 7, 6)))
    assert calls == [1]


def test_convert_twice_and_revert():
    torch.manual_seed(0)
    model = mobile_blocks()
    before = snapshot(model)
    convert(model, sync_bn=True)
    once = snapshot(model)
    convert(model, backend="torch", sync_bn=True)  # nothing left to convert
    assert snapshot(model)[0] == once[0]
    fused = [m for m in model.modules() if isinstance(m, FusedSequential)]
    assert len(fused) == 4 and all(m.sync_bn for m in fused)
    # The BNs outside fused runs: the stem's, AttributeBlock's, CustomSequential's.
    synced = [name for name, m in model.named_modules() if type(m) is nn.SyncBatchNorm]
    assert synced == ["0.1", "2.bn", "3.1"]
    revert(model)
    assert_same_snapshot(before, snapshot(model))


def test_sync_bn_of_layers_built_fast_is_reverted():
    model = nn.Sequential(mobilenet.DepSepConv(4, 8), nn.BatchNorm2d(8))
    convert(model, sync_bn=True)
    assert model[0].depthwise.sync_bn and type(model[1]) is nn.SyncBatchNorm
    revert(model)
    assert not model[0].depthwise.sync_bn and type(model[1]) is nn.BatchNorm2d
    assert type(model[0].depthwise) is ConvBNAct


def test_sync_bn_without_process_group_is_plain_batchnorm():
    """Outside torch.distributed, SyncBatchNorm semantics are BatchNorm's."""
    torch.manual_seed(0)
    model = ddp_model()
    fast = convert(copy.deepcopy(model), backend="torch", sync_bn=True)
    assert fast[0].pointwise.sync_bn and type(fast[0].pointwise[1]) is nn.BatchNorm2d
    assert_same_training(model, fast, sample((2, 3, 8, 8)), steps=2)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        convert(plain_stack(), backend="cuda")


# --- every activation the fused ops apply; timm's BatchNormAct2d ---


def test_activation_modules_and_their_op_names():
    assert activation_op(None) == activation_op(nn.Identity()) == "none"
    assert activation_op(nn.ReLU(inplace=True)) == "relu"
    assert activation_op(nn.ReLU6()) == activation_op(nn.Hardtanh(0.0, 6.0)) == "relu6"
    assert activation_op(nn.SiLU()) == "silu" and activation_op(nn.Hardswish()) == "hardswish"
    for other in (nn.Hardtanh(-1.0, 1.0), nn.GELU(), nn.ELU(), nn.Sigmoid()):
        assert activation_op(other) is None, other

    class MyReLU(nn.ReLU):  # a subclass may compute something else
        pass

    assert activation_op(MyReLU()) is None
    named = {activation_op(m()) for m in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Identity)}
    assert named == set(ACTIVATION_CODES)  # every activation of the ops has its module


ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}


def activation_cases(backends, names=tuple(ACTIVATIONS)):
    """(backend, activation name) params: each activation on each backend."""
    return [
        pytest.param(backend.values[0], name, marks=backend.marks, id=f"{backend.id}-{name}")
        for name in names
        for backend in backends
    ]


@pytest.mark.parametrize("backend,activation", activation_cases(MODEL_BACKENDS))
def test_conv_norm_activation_runs_of_every_activation(backend, activation):
    """torchvision's Conv2dNormActivation pattern (1x1 expansion, depthwise, projection) with each
    activation: the activation is fused with its conv and BN and applied by the fused op, on
    every backend (never by a PyTorch op after it)."""
    torch.manual_seed(0)
    act = ACTIVATIONS[activation]
    model = nn.Sequential(
        ConvNormActivation(4, 12, 1, act=act),
        ConvNormActivation(12, 12, 3, stride=2, groups=12, act=act),
        nn.Conv2d(12, 6, 1, bias=False),
        nn.BatchNorm2d(6),
    )
    fast = convert(copy.deepcopy(model), backend=backend)
    assert type(fast[0]) is ConvBNAct and fast[0].fused_runs == {"0": ("0", "1", "2")}
    assert type(fast[1]) is ConvBNAct and fast.fused_runs == {"2": ("2", "3")}
    seen = []  # the activation of each 1x1 run, whether it ran alone or in a chain
    with count_fused_calls() as calls:
        counted, chain = kernels.pointwise_bn_act, kernels.bn_act_chain

        def spy(*args, **kwargs):
            seen.append(kwargs["activation"])
            return counted(*args, **kwargs)

        def chain_spy(input, stages, **kwargs):
            seen.extend(stage.activation for stage in stages if not stage.depthwise)
            return chain(input, stages, **kwargs)

        with (
            unittest.mock.patch.object(kernels, "pointwise_bn_act", spy),
            unittest.mock.patch.object(kernels, "bn_act_chain", chain_spy),
            unittest.mock.patch.object(mobilenet.layers, "apply_activation", None),
        ):
            assert_same_training(model, fast, sample((2, 4, 7, 6)), steps=2)
    assert calls == {("pointwise_bn_act", backend): 6, ("depthwise_bn_act", backend): 3}
    assert seen == [activation, None] * 3


class OpCalls(TorchDispatchMode):
    """Counts the operators called from Python (not those an operator calls inside itself)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


# What an activation, or its gradient, is in PyTorch's operators.
ACTIVATION_OPERATORS = {
    f"aten::{name}{suffix}"
    for name in ("relu", "hardtanh", "clamp", "clamp_min", "silu", "hardswish", "sigmoid")
    for suffix in ("", "_", "_backward")
} | {"aten::threshold_backward"}


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_activation_is_computed_inside_the_fused_op(backend, conv, training):
    """Each activation of the ops on each compiled backend: one fused forward and one backward
    operator call compute it and its gradient, no PyTorch activation operator runs beside them,
    and the output and gradients are the reference's."""
    gen = torch.Generator().manual_seed(0)
    c_out = 6 if conv == "pointwise" else 4
    x = torch.randn(2, 4, 3, 3, generator=gen) * 3
    w_shape = (c_out, 4, 1, 1) if conv == "pointwise" else (4, 1, 3, 3)
    w = torch.randn(w_shape, generator=gen)
    running = (torch.randn(c_out, generator=gen), torch.rand(c_out, generator=gen) + 0.5)
    affine = (torch.rand(c_out, generator=gen) + 0.5, torch.randn(c_out, generator=gen))
    fn = getattr(kernels, f"{conv}_bn_act")
    geometry = {} if conv == "pointwise" else {"padding": 1}

    def run(which, activation):
        inputs = [t.clone().requires_grad_() for t in (x, w, *affine)]
        stats = [t.clone() for t in running]
        options = dict(training=training, activation=activation, backend=which, **geometry)
        out = fn(*inputs[:2], *stats, *inputs[2:], **options)
        return out, *torch.autograd.grad(out, inputs, torch.ones_like(out))

    prefix = "depsep::" + ("" if backend == "native" else "triton_")
    for name in ACTIVATION_CODES:
        activation = None if name == "none" else name
        with OpCalls() as counter:
            got = run(backend, activation)
        for g, want in zip(got, run("torch", activation)):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
        fused = {op: n for op, n in counter.calls.items() if op.startswith("depsep::")}
        assert fused == {f"{prefix}{conv}_bn_act_fwd": 1, f"{prefix}{conv}_bn_act_bwd": 1}, name
        assert not ACTIVATION_OPERATORS & set(counter.calls), (name, counter.calls)


def batch_norm_act(channels, act=nn.ReLU, **kwargs):
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.BatchNormAct2d(channels, act_layer=act, **kwargs)


@pytest.mark.parametrize("backend,activation", activation_cases(MODEL_BACKENDS))
def test_timm_batch_norm_act_is_fused_with_its_activation(backend, activation):
    """timm's BatchNormAct2d (BatchNorm2d, then its `drop` and `act` children) after a conv in an
    nn.Sequential: one fused op with its own activation; its BatchNorm settings honoured."""
    torch.manual_seed(0)
    act = ACTIVATIONS[activation]
    model = nn.Sequential(
        nn.Conv2d(4, 8, 1, bias=False),
        batch_norm_act(8, act, momentum=None),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        batch_norm_act(8, act, eps=1e-3, affine=False),
        nn.ReLU(),  # after a BatchNormAct2d: its own module, not fused into the run
        nn.Conv2d(8, 8, 1, bias=False),
        batch_norm_act(8, act, apply_act=False, track_running_stats=False),
    )
    fast = convert(copy.deepcopy(model), backend=backend)
    assert fast.fused_runs == {"0": ("0", "1"), "2": ("2", "3"), "5": ("5", "6")}
    with count_fused_calls() as calls:
        assert_same_training(model, fast, sample((2, 4, 6, 6)), steps=2)
    assert calls == {("pointwise_bn_act", backend): 6, ("depthwise_bn_act", backend): 3}
    assert fast[1].num_batches_tracked.item() == 2


def test_timm_batch_norm_act_left_alone_when_not_fusable():
    """Dropout inside it, an activation the fused ops do not apply, or a hook on its act: the
    run stays unfused (and the hook fires)."""
    timm_layers = pytest.importorskip("timm.layers")
    fired = []
    hooked = batch_norm_act(8)
    hooked.act.register_forward_hook(lambda module, args, out: fired.append(1))
    norms = [
        batch_norm_act(8, drop_layer=lambda: nn.Dropout(0.1)),
        batch_norm_act(8, nn.GELU),
        hooked,
        timm_layers.SyncBatchNormAct(8),  # not BatchNormAct2d: left alone
    ]
    for norm in norms:
        model = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), norm)
        assert type(convert(model, backend="torch")) is nn.Sequential, norm
    norms[2].eval()
    model = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), norms[2]).eval()
    model(sample((1, 4, 3, 3)))
    assert fired == [1]


def test_convert_never_imports_timm(monkeypatch):
    """timm's classes are known by name: converting a model without them imports no timm (with
    timm and its modules hidden, any import of it would raise)."""
    for name in [name for name in sys.modules if name.startswith("timm.")] + ["timm"]:
        monkeypatch.setitem(sys.modules, name, None)
    model = nn.ModuleList([mobile_blocks(), reference.MobileNet(0.25)])
    convert(model, backend="torch", sync_bn=True)
    assert type(model[0][1].conv) is FusedSequential and type(model[1].bn1) is nn.SyncBatchNorm


# --- two processes: DistributedDataParallel with sync_bn ---

DDP_STEPS = 3
DDP_WORLD = 2


def ddp_model() -> nn.Sequential:
    model = nn.Sequential(
        reference.DepSepConv(3, 8, stride=2),
        reference.DepSepConv(8, 16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    model[1].pointwise[1].momentum = None  # the cumulative average, counted in num_batches_tracked
    return model


def ddp_batch():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(8, 3, 8, 8, generator=gen), torch.randint(4, (8,), generator=gen)


def train_steps(model, images, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


def ddp_worker(rank, init_file, out_dir, backend, state):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=DDP_WORLD
    )
    try:
        model = ddp_model()
        model.load_state_dict(state)
        convert(model, backend=backend, sync_bn=True)
        images, labels = ddp_batch()
        share = images.shape[0] // DDP_WORLD
        mine = slice(rank * share, (rank + 1) * share)
        train_steps(DistributedDataParallel(model), images[mine], labels[mine])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", [NATIVE])
def test_sync_bn_under_ddp_matches_single_process(backend, tmp_path):
    """Two processes, each on half of the batch, train as one process on the whole batch does:
    the fused layers' batch statistics (and so outputs, gradients, running statistics) are the
    whole batch's. Per-process statistics would differ in every BN."""
    torch.manual_seed(0)
    model = ddp_model()
    state = copy.deepcopy(model.state_dict())
    # fork: the workers need no imports of their own (seconds each); they use one thread.
    workers = mp.start_processes(
        ddp_worker,
        args=(str(tmp_path / "init"), str(tmp_path), backend, state),
        nprocs=DDP_WORLD,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 120 s")
    train_steps(model, *ddp_batch())
    expected = model.state_dict()
    for rank in range(DDP_WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(
                got[name],
                value,
                atol=1e-5,
                rtol=1e-4,
                msg=lambda m, r=rank, n=name: f"rank {r} {n}: {m}",
            )
