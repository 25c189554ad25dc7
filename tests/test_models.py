"""convert() on the mobile networks people train, built by timm and torchvision with random
weights (nothing downloaded): each block mobilenet/blocks.py knows against the original, then
whole networks. For each network: the share of its BatchNorm layers that fused ops really
computed (their calls counted per BN module), and one training step and one eval step in
float32 as close to a float64 run of the original as the original's own float32 run."""

import collections
import contextlib
import copy
import inspect
import pickle
import unittest.mock
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import kernels
from mobilenet import DepthwiseConv2d, convert, reference, revert
from mobilenet.blocks import KNOWN_BLOCKS
from mobilenet.layers import FusedRuns, qualified_name

from .test_mobilenet import (  # noqa: F401  (one_thread: an autouse fixture, here too)
    MODEL_BACKENDS,
    TRITON,
    _run_step,
    assert_same_training,
    count_fused_calls,
    one_thread,
    sample,
)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import ConvNormAct  # noqa: E402
from timm.models import _efficientnet_blocks as timm_blocks  # noqa: E402

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish}


@contextlib.contextmanager
def count_fused_batch_norms(model: nn.Module):
    """Counts the fused ops' calls per BatchNorm module of `model` (by name), a chain's stages
    each as one, telling the module by the running_mean or weight tensor the op received."""
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            names.update(
                (id(t), name) for t in (module.running_mean, module.weight) if t is not None
            )
    calls = collections.Counter()
    patches = contextlib.ExitStack()
    for op_name in ("pointwise_bn_act", "depthwise_bn_act"):
        op = getattr(kernels, op_name)
        signature = inspect.signature(op)

        def spy(*args, _op=op, _signature=signature, **kwargs):
            arguments = _signature.bind(*args, **kwargs).arguments
            tensors = (arguments.get("running_mean"), arguments.get("bn_weight"))
            calls[next(names[id(t)] for t in tensors if id(t) in names)] += 1
            return _op(*args, **kwargs)

        patches.enter_context(unittest.mock.patch.object(kernels, op_name, spy))
    chain = kernels.bn_act_chain

    def chain_spy(input, stages, **kwargs):
        for stage in stages:
            tensors = (stage.running_mean, stage.bn_weight)
            calls[next(names[id(t)] for t in tensors if id(t) in names)] += 1
        return chain(input, stages, **kwargs)

    patches.enter_context(unittest.mock.patch.object(kernels, "bn_act_chain", chain_spy))
    with patches:
        yield calls


def randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Random BatchNorm affine terms and statistics: the defaults (1, 0) would hide a wrong use."""
    generator = torch.Generator().manual_seed(1)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d) and bn.affine:
            with torch.no_grad():
                bn.weight.copy_(1 + 0.2 * torch.randn(bn.weight.shape, generator=generator))
                bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=generator))
    return randomise_running_statistics(model)


def randomise_running_statistics(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            bn.running_mean.normal_(0.0, 0.2, generator=generator)
            bn.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


def reseeded(model: nn.Module) -> nn.Module:
    """The same random numbers for each forward: drop_path draws the same samples in the
    original and the fused block."""

    def reseed(module, args):
        torch.manual_seed(0)

    model.register_forward_pre_hook(reseed)
    return model


# --- each known block of timm against the original ---

SE = timm_blocks.SqueezeExcite
# name -> (builder(act_layer), fused runs its conversion plans, fused op calls per forward)
BLOCKS = {
    "depthwise_separable-skip-se-pw_act": (
        lambda act: timm_blocks.DepthwiseSeparableConv(
            8, 8, se_layer=SE, pw_act=True, drop_path_rate=0.5, act_layer=act
        ),
        {"conv_dw": ("conv_dw", "bn1"), "conv_pw": ("conv_pw", "bn2")},
        2,
    ),
    # Space to depth: a 2x2 stride-2 conv + BN first, then a 2x2 depthwise conv whose "same"
    # padding is dynamic (timm's Conv2dSame: not fused); the pointwise conv is fused.
    "depthwise_separable-s2d": (
        lambda act: timm_blocks.DepthwiseSeparableConv(8, 16, s2d=1, act_layer=act),
        {"conv_pw": ("conv_pw", "bn2")},
        1,
    ),
    "inverted_residual-skip-se": (
        lambda act: timm_blocks.InvertedResidual(
            8, 8, exp_ratio=3, se_layer=SE, drop_path_rate=0.5, act_layer=act
        ),
        {n: (n, b) for n, b in (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))},
        3,
    ),
    "inverted_residual-stride2-k5": (
        lambda act: timm_blocks.InvertedResidual(
            8, 12, dw_kernel_size=5, stride=2, exp_ratio=2, act_layer=act
        ),
        {n: (n, b) for n, b in (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))},
        3,
    ),
    "inverted_residual-s2d-noskip": (
        lambda act: timm_blocks.InvertedResidual(8, 8, s2d=1, noskip=True, act_layer=act),
        {"conv_pw": ("conv_pw", "bn1"), "conv_pwl": ("conv_pwl", "bn3")},
        2,
    ),
    "conv_bn_act-skip": (
        lambda act: timm_blocks.ConvBnAct(8, 8, 1, skip=True, drop_path_rate=0.5, act_layer=act),
        {"conv": ("conv", "bn1")},
        1,
    ),
    # A full 3x3 expansion conv (not fused), then SE and the fused projection.
    "edge_residual-se": (
        lambda act: timm_blocks.EdgeResidual(
            8, 8, exp_ratio=2, se_layer=SE, drop_path_rate=0.5, act_layer=act
        ),
        {"conv_pwl": ("conv_pwl", "bn2")},
        1,
    ),
    "conv_norm_act-depthwise-aa": (
        lambda act: ConvNormAct(8, 8, 3, stride=2, groups=8, aa_layer="avg", act_layer=act),
        {"conv": ("conv", "bn")},
        1,
    ),
    "conv_norm_act-pointwise": (
        lambda act: ConvNormAct(8, 16, 1, act_layer=act),
        {"conv": ("conv", "bn")},
        1,
    ),
}


def block_cases():
    cases = []
    for name in BLOCKS:
        # Every activation's fusion is tested in test_convert.py; here one with kinks, one not.
        for activation in ("relu6", "silu"):
            for backend in MODEL_BACKENDS:
                param_id = f"{name}-{activation}-{backend.id}"
                cases.append(pytest.param(name, activation, backend.values[0], id=param_id))
    # Triton under the interpreter on the blocks with both kinds of fused op: the blocks differ
    # only in the fused ops they call, whose Triton kernels test_fused.py and test_mobilenet.py
    # check over their grids, and the interpreter takes seconds per depthwise op.
    for case in (
        ("conv_bn_act-skip", "relu6", "triton"),
        ("depthwise_separable-skip-se-pw_act", "silu", "triton"),
        ("inverted_residual-skip-se", "hardswish", "triton"),
    ):
        cases.append(pytest.param(*case, marks=TRITON.marks, id="-".join(case)))
    return cases


@pytest.mark.parametrize("name,activation,backend", block_cases())
def test_timm_block_matches_original(name, activation, backend):
    build, runs, calls_per_forward = BLOCKS[name]
    torch.manual_seed(0)
    block = reseeded(randomise_batch_norms(build(ACTIVATIONS[activation])))
    fast = convert(copy.deepcopy(block), backend=backend)
    assert isinstance(fast, FusedRuns) and isinstance(fast, type(block))
    assert fast.fused_runs == runs
    assert list(fast.state_dict()) == list(block.state_dict())
    # The interpreter runs each Triton program instance in Python: one small step there.
    steps, shape = (1, (2, 8, 3, 3)) if backend == "triton" else (2, (4, 8, 8, 8))
    with count_fused_calls() as calls:
        assert_same_training(block, fast, sample(shape), steps=steps)
    assert sum(calls.values()) == calls_per_forward * (steps + 1)
    assert {b for _, b in calls} == {backend}
    revert(fast)
    assert type(fast) is type(block)


def test_every_known_block_is_tested():
    tested = {qualified_name(type(build(nn.ReLU))) for build, _, _ in BLOCKS.values()}
    # The networks' own stems and heads: in the network tests, whose head BNs are fused; the
    # reference DepSepConv: in tests/test_convert.py's reference MobileNet.
    networks = {timm.models.efficientnet.EfficientNet, timm.models.mobilenetv3.MobileNetV3}
    others = {qualified_name(cls) for cls in networks} | {qualified_name(reference.DepSepConv)}
    assert set(KNOWN_BLOCKS) == tested | others


def test_known_block_falls_back_and_unknown_block_is_left_alone():
    """A hook registered on a BN after conversion makes that run compute unfused (the hook
    fires); a subclass of a known block, which may have its own forward, is not converted."""
    torch.manual_seed(0)
    block = randomise_batch_norms(timm_blocks.InvertedResidual(8, 8, exp_ratio=2))
    fast = convert(copy.deepcopy(block), backend="torch")
    seen = []
    fast.bn2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with count_fused_calls() as calls:
        assert_same_training(block, fast, sample((2, 8, 6, 6)), steps=1)
    assert len(seen) == 2 and sum(calls.values()) == 2 * 2

    class MyInvertedResidual(timm_blocks.InvertedResidual):
        pass

    mine = convert(MyInvertedResidual(8, 8, exp_ratio=2), backend="torch")
    assert type(mine) is MyInvertedResidual and type(mine.conv_dw) is DepthwiseConv2d


def test_converted_timm_model_pickles_and_copies():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=4).eval()
    fast = convert(copy.deepcopy(model), backend="torch")
    x = sample((1, 3, 32, 32))
    expected = model(x)
    for other in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert [type(m) for m in other.modules()] == [type(m) for m in fast.modules()]
        with count_fused_calls() as calls:
            torch.testing.assert_close(other(x), expected)
        assert sum(calls.values()) > 0
        revert(other)
        assert [type(m) for m in other.modules()] == [type(m) for m in model.modules()]


def test_efficientnet_with_gradient_checkpointing_runs_the_original_features():
    """timm's EfficientNet.forward_features checkpoints its blocks when asked: the fused class
    then runs the original method (its blocks are still fused)."""
    torch.manual_seed(0)
    model = randomise_batch_norms(timm.create_model("mobilenetv2_035", num_classes=4))
    model.set_grad_checkpointing(True)
    fast = convert(copy.deepcopy(model), backend="torch")
    with count_fused_batch_norms(fast) as calls:
        assert_same_training(model, fast, sample((2, 3, 32, 32)), steps=1)
    assert calls["bn2"] == 0 and calls["blocks.1.0.bn1"] > 0


def test_sync_bn_of_timm_batch_norm_act():
    """convert(sync_bn=True): a BatchNormAct2d left unfused becomes timm's SyncBatchNormAct (as
    timm.layers.convert_sync_batchnorm does); fused ones synchronise inside the fused layers."""
    model = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=4)
    convert(model, backend="torch", sync_bn=True)
    assert type(model.bn1) is timm.layers.SyncBatchNormAct  # the stem's: a full 3x3 conv
    assert type(model.bn2) is timm.layers.BatchNormAct2d and model.sync_bn
    assert model.blocks[1][0].sync_bn
    revert(model)
    assert type(model.bn1) is timm.layers.BatchNormAct2d and not hasattr(model, "sync_bn")


# --- whole networks ---


@dataclass(frozen=True)
class Network:
    name: str
    build: object
    batch_norms: int
    unfused: tuple[str, ...]  # the BatchNorms no fused op computes: after full convolutions
    # Whether float32 gradients are comparable: not for a network that normalises pooled
    # features over the batch alone (its head BN), which leaves them rounding noise in every
    # implementation (the original's own are 4e-4 off float64).
    float32: bool = True

    def __str__(self):
        return self.name


def _timm(name: str):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


def _torchvision(name: str, **kwargs):
    # No dropout, no stochastic depth: random numbers that the float64 run would draw apart.
    return lambda: torchvision.models.get_model(
        name, weights=None, num_classes=10, dropout=0.0, **kwargs
    )


MODELS = [
    Network("timm:mobilenetv1_100", _timm("mobilenetv1_100"), 27, ("bn1",)),
    Network("timm:mobilenetv2_100", _timm("mobilenetv2_100"), 52, ("bn1",)),
    Network("timm:efficientnet_b0", _timm("efficientnet_b0"), 49, ("bn1",)),
    Network("timm:mobilenetv3_large_100", _timm("mobilenetv3_large_100"), 46, ("bn1",)),
    Network("timm:mnasnet_100", _timm("mnasnet_100"), 52, ("bn1",)),
    # ConvNormAct in its blocks, the fused head of MobileNetV3.forward_head; its first blocks
    # are full 3x3 convolutions.
    Network(
        "timm:mobilenetv4_conv_small",
        _timm("mobilenetv4_conv_small"),
        46,
        ("bn1", "blocks.0.0.bn1", "blocks.1.0.bn1"),
        float32=False,
    ),
    Network(
        "torchvision:mobilenet_v3_large", _torchvision("mobilenet_v3_large"), 46, ("features.0.1",)
    ),
    Network(
        "torchvision:efficientnet_b0",
        _torchvision("efficientnet_b0", stochastic_depth_prob=0.0),
        49,
        ("features.0.1",),
    ),
]
# Whole networks at a small resolution: the last blocks see 2x2 pixels.
NETWORK_INPUT = (2, 3, 64, 64)


def network_cases(float32: bool = False):
    """(network, backend) params; for the float32 comparison the compiled backends only: the
    torch backend computes the very ops of the original, bit for bit."""
    cases = []
    for network in MODELS:
        if float32 and not network.float32:
            continue
        for backend in MODEL_BACKENDS:
            if float32 and backend.values[0] == "torch":
                continue
            param_id = f"{network.name}-{backend.id}"
            cases.append(pytest.param(network, backend.values[0], marks=backend.marks, id=param_id))
    return cases


@pytest.mark.parametrize("network,backend", network_cases())
def test_network_is_fused_and_computes_the_original(network, backend):
    """In float64 the converted network computes the original's function: outputs, every
    gradient and buffer after a training step, then an eval step. Fused ops compute at least 90%
    of its BatchNorms (all but those after full convolutions), counted as they run."""
    torch.manual_seed(0)
    model = randomise_batch_norms(network.build()).double()
    fast = convert(copy.deepcopy(model), backend=backend)
    assert list(fast.state_dict()) == list(model.state_dict())
    x = sample(NETWORK_INPUT, dtype=torch.float64)
    with count_fused_batch_norms(fast) as calls:
        for step, training in enumerate((True, False)):
            expected = _run_step(model, x, step, training, None)
            got = _run_step(fast, x, step, training, None)
            assert got.keys() == expected.keys()
            for name, value in expected.items():
                # Relative to the tensor's largest value: rounding through ~50 BatchNorms over
                # 8 values per channel grows to ~1e-9 of it (measured); a wrong layer is O(1).
                # Absolute for gradients that are zero but for rounding (a BN bias before a BN).
                scale = value.abs().max().item() if value.numel() else 0.0
                torch.testing.assert_close(
                    got[name],
                    value,
                    atol=1e-8 * scale + 1e-10,
                    rtol=0,
                    msg=lambda message, n=name, s=step: f"step {s} {n}: {message}",
                )
    batch_norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batch_norms) == network.batch_norms
    # A training and an eval forward: two calls for each BatchNorm computed by a fused op.
    assert set(calls.values()) == {2}
    assert tuple(n for n in batch_norms if n not in calls) == network.unfused
    assert len(calls) / len(batch_norms) >= 0.9
    revert(fast)
    assert [type(m) for m in fast.modules()] == [type(m) for m in model.modules()]


def away_from_kinks(model: nn.Module) -> nn.Module:
    """BatchNorm affine terms that keep the activations' inputs (0.25 * x_hat + 1.5, x_hat within
    a few units) inside the smooth range of ReLU, ReLU6 and Hardswish (0 to 3). At a kink,
    float32 rounding flips the activation's derivative: the original's own float32 step flips
    1-4 of them at this size, and one flip in a late layer moves every upstream gradient by ~2%
    (measured on timm's mobilenetv1_100), far more than rounding does. The kinks themselves are
    checked in float64 (above) and by the blocks' and fused ops' tests."""
    generator = torch.Generator().manual_seed(2)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.copy_(0.25 + 0.05 * torch.randn(bn.weight.shape, generator=generator))
                bn.bias.copy_(1.5 + 0.2 * torch.randn(bn.bias.shape, generator=generator))
    return randomise_running_statistics(model)


@pytest.mark.parametrize("network,backend", network_cases(float32=True))
def test_network_float32_step_as_accurate_as_the_original(network, backend):
    """One float32 training step, then eval: outputs, every gradient and running statistic as
    close to a float64 run of the original as the original's own float32 run (within
    assert_same_training's slack)."""
    torch.manual_seed(0)
    model = away_from_kinks(network.build())
    fast = convert(copy.deepcopy(model), backend=backend)
    assert_same_training(model, fast, sample(NETWORK_INPUT), steps=1, exact=True)
