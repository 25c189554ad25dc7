"""kernels.bn_act_chain: a run of fused stages as one autograd unit gives the results of the
unchained fused ops (outputs, every gradient, running statistics, num_batches_tracked) while
keeping only what its backward cannot cheaply recompute."""

import copy

import pytest
import torch

import kernels
from kernels import BnActStage

from .common import ACCURACY, assert_close_to_exact, backend_params

BACKENDS = [pytest.param("torch", id="torch"), *backend_params("cpu")]
# An inverted residual (1x1 expand, depthwise stride 2, 1x1 project) and a depthwise-separable
# block (depthwise, then 1x1).
CHAINS = {
    "expand-dw-project": [("pointwise", 8, 16), ("depthwise", 16, 16), ("pointwise", 16, 8)],
    "dw-pw": [("depthwise", 8, 8), ("pointwise", 8, 12)],
}


def _chain_tensors(kinds, seed=0, dtype=torch.float32):
    """Per stage: (weight, running_mean, running_var, bn_weight, bn_bias, num_batches_tracked)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for kind, c_in, c_out in kinds:
        shape = (c_in, 1, 3, 3) if kind == "depthwise" else (c_out, c_in, 1, 1)
        fan_in = shape[1] * shape[2] * shape[3]
        weight = (torch.randn(shape, generator=gen) / fan_in**0.5).to(dtype)
        bn = [
            torch.randn(c_out, generator=gen) * 0.1,
            torch.rand(c_out, generator=gen) + 0.5,
            torch.rand(c_out, generator=gen) + 0.5,
            torch.randn(c_out, generator=gen) * 0.1,
        ]
        bn = [t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in bn]
        tensors.append([weight, *bn, torch.zeros((), dtype=torch.long)])
    return tensors


def _stages(kinds, tensors, training, momentum=0.1, activations=("relu6", "relu", None)):
    return [
        BnActStage(
            weight,
            rm,
            rv,
            bn_w,
            bn_b,
            training=training,
            depthwise=kind == "depthwise",
            stride=2 if kind == "depthwise" else 1,
            padding=1 if kind == "depthwise" else 0,
            momentum=momentum,
            activation=activations[index % len(activations)],
            num_batches_tracked=nbt,
        )
        for index, ((kind, _, _), (weight, rm, rv, bn_w, bn_b, nbt)) in enumerate(
            zip(kinds, tensors)
        )
    ]


def _unchained(x, stages, backend):
    for stage in stages:
        geometry = {}
        fn = kernels.pointwise_bn_act
        if stage.depthwise:
            fn = kernels.depthwise_bn_act
            geometry = dict(stride=stage.stride, padding=stage.padding)
        x = fn(
            x,
            stage.weight,
            stage.running_mean,
            stage.running_var,
            stage.bn_weight,
            stage.bn_bias,
            training=stage.training,
            momentum=stage.momentum,
            activation=stage.activation,
            backend=backend,
            num_batches_tracked=stage.num_batches_tracked,
            **geometry,
        )
    return x


SMOOTH = ("silu", "hardswish", "silu")  # the stages' activations of a chain of the smooth ones


def _run(
    chained,
    kinds,
    backend,
    training,
    recompute,
    momentum,
    steps=2,
    dtype=torch.float32,
    activations=("relu6", "relu", None),
):
    """`steps` calls, then the gradients of the input and of every weight and BN parameter.
    Returns the output, the gradients and every stage's buffers after the steps."""
    tensors = _chain_tensors(kinds, dtype=dtype)
    x = torch.randn(2, kinds[0][1], 9, 9, generator=torch.Generator().manual_seed(5)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    leaves = [x] + [t.requires_grad_() for stage in tensors for t in (stage[0], stage[3], stage[4])]
    stages = _stages(kinds, tensors, training, momentum, activations)
    for _ in range(steps):
        if chained:
            out = kernels.bn_act_chain(x, stages, recompute=recompute, backend=backend)
        else:
            out = _unchained(x, stages, backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    buffers = [t for stage in tensors for t in (stage[1], stage[2], stage[5])]
    return out, grads, buffers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("recompute", ["depthwise", "all"])
@pytest.mark.parametrize("training, momentum", [(True, 0.1), (True, None), (False, 0.1)])
def test_chain_matches_the_unchained_ops(backend, chain, recompute, training, momentum):
    kinds = CHAINS[chain]
    out, grads, buffers = _run(True, kinds, backend, training, recompute, momentum)
    want_out, want_grads, want_buffers = _run(False, kinds, backend, training, recompute, momentum)
    # Bit for bit: the chain runs the same ops on the same values, its recomputed stage
    # inputs included (over 9x9 pixels, BN would amplify any difference).
    torch.testing.assert_close(out, want_out, atol=0, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for index, (got, want) in enumerate(zip(grads, want_grads)):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"gradient {index}")
    for index, (got, want) in enumerate(zip(buffers, want_buffers)):
        assert torch.equal(got, want), f"buffer {index}: the running statistics moved differently"
    assert int(buffers[2]) == (2 if training else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_chain_of_smooth_activations_matches_the_unchained_ops(backend, training):
    """silu and hardswish stages, their pre-activations recomputed in backward."""
    kinds = CHAINS["expand-dw-project"]
    runs = [
        _run(chained, kinds, backend, training, "all", 0.1, activations=SMOOTH)
        for chained in (True, False)
    ]
    (out, grads, buffers), (want_out, want_grads, want_buffers) = runs
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for index, (got, want) in enumerate(zip(grads, want_grads)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"gradient {index}")
    for index, (got, want) in enumerate(zip(buffers, want_buffers)):
        assert torch.equal(got, want), f"buffer {index}"


@pytest.mark.parametrize("activations", [("relu6", "relu", None), SMOOTH], ids=str)
def test_chain_is_as_accurate_as_float64(activations):
    """Against a float64 run of the same values: the chain's recomputation changes nothing."""
    kinds = CHAINS["expand-dw-project"]
    out, grads, _ = _run(True, kinds, "native", True, "all", 0.1, activations=activations)
    exact_out, exact_grads, _ = _run(
        True, kinds, "torch", True, "all", 0.1, dtype=torch.float64, activations=activations
    )
    assert_close_to_exact(out, exact_out, ACCURACY[torch.float32], "output")
    for index, (got, exact) in enumerate(zip(grads, exact_grads)):
        assert_close_to_exact(got, exact, ACCURACY[torch.float32], f"gradient {index}")


@pytest.mark.parametrize("backend", backend_params("cpu")[:1])
@pytest.mark.parametrize(
    "recompute, kept",
    [
        # The chain input and the expand stage's output (the depthwise stage's input).
        ("depthwise", [(2, 8, 9, 9), (2, 16, 9, 9)]),
        ("all", [(2, 8, 9, 9)]),
    ],
)
def test_what_a_chain_keeps(backend, recompute, kept):
    """saved_tensors_hooks count what autograd keeps: activations as the recompute policy says,
    the weights and the per-channel statistics, nothing else."""
    kinds = CHAINS["expand-dw-project"]
    tensors = _chain_tensors(kinds)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    for stage in tensors:
        stage[0].requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = kernels.bn_act_chain(
            x, _stages(kinds, tensors, True), recompute=recompute, backend=backend
        )
    activations = [tuple(t.shape) for t in saved if t.dim() == 4 and t.shape[0] == 2]
    assert activations == kept
    assert saved[0].data_ptr() == x.data_ptr()
    weights = sum(stage[0].numel() + stage[3].numel() + stage[4].numel() for stage in tensors)
    small = sum(t.numel() for t in saved if not (t.dim() == 4 and t.shape[0] == 2))
    assert small == weights + sum(2 * stage[1].numel() for stage in tensors)  # + [2, C] stats
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backend", backend_params("cpu")[:1])
def test_a_chain_given_its_input_recomputation_keeps_no_input(backend):
    """With recompute_input the chain keeps no activation at all (recompute="all"), calls the
    callable once in backward, and gives the results of the chain that keeps its input."""
    kinds = CHAINS["expand-dw-project"]
    base = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(5))
    base = base.contiguous(memory_format=torch.channels_last).requires_grad_()

    def run(given: bool):
        tensors = _chain_tensors(kinds)
        tensors[0][0].requires_grad_()
        x = base * 2  # the chain input: an intermediate, as a stem's output is
        calls, saved = [], []

        def again():
            calls.append(1)
            return x.detach() * 1  # a new tensor of the same values

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = kernels.bn_act_chain(
                x,
                _stages(kinds, tensors, True),
                recompute="all",
                backend=backend,
                recompute_input=again if given else None,
            )
        activations = [t for t in saved if t.dim() == 4 and t.shape[0] == 2]
        assert len(activations) == (0 if given else 1)
        grads = torch.autograd.grad(out.square().sum(), [base, tensors[0][0]])
        assert len(calls) == (1 if given else 0)
        return [out, *grads, *(t for stage in tensors for t in stage[1:3])]

    for got, expected in zip(run(True), run(False)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", backend_params("cpu")[:1])
def test_gradcheck_float64(backend):
    kinds = [("pointwise", 3, 4), ("depthwise", 4, 4), ("pointwise", 4, 3)]
    tensors = _chain_tensors(kinds, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    params = [x] + [t for stage in tensors for t in (stage[0], stage[3], stage[4])]
    params = [t.requires_grad_() for t in params]

    def chain(x, *weights):
        fresh = copy.deepcopy([[t.detach() for t in stage] for stage in tensors])
        for stage, (w, bn_w, bn_b) in zip(fresh, zip(*[iter(weights)] * 3)):
            stage[0], stage[3], stage[4] = w, bn_w, bn_b
        stages = _stages(kinds, fresh, True)
        return kernels.bn_act_chain(x, stages, recompute="all", backend=backend)

    torch.autograd.gradcheck(chain, params)


def test_compile_fullgraph():
    kinds = CHAINS["dw-pw"]
    tensors = _chain_tensors(kinds)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    weight = tensors[1][0].requires_grad_()
    stages = _stages(kinds, tensors, True)

    def chain(x):
        return kernels.bn_act_chain(x, stages, backend="native")

    torch._dynamo.reset()
    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), weight)
    eager_tensors = _chain_tensors(kinds)
    eager_weight = eager_tensors[1][0].requires_grad_()
    eager = kernels.bn_act_chain(x, _stages(kinds, eager_tensors, True), backend="native")
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), eager_weight)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_bad_recompute_and_stage_errors_name_the_argument():
    kinds = CHAINS["dw-pw"]
    stages = _stages(kinds, _chain_tensors(kinds), True)
    x = torch.randn(2, 8, 9, 9)
    with pytest.raises(ValueError, match="recompute"):
        kernels.bn_act_chain(x, stages, recompute="some")
    with pytest.raises(ValueError, match="stage 2: weight has 8 input channels but input has 12"):
        kernels.bn_act_chain(x, [stages[0], stages[1], stages[1]])
    with pytest.raises(ValueError, match="stages"):
        kernels.bn_act_chain(x, [])
    with pytest.raises(TypeError, match="recompute_input must be a callable"):
        kernels.bn_act_chain(x, stages, recompute_input=x)
