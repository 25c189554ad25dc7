"""What a fused layer costs the host: the ops it dispatches (one per fused forward, one per
backward: the running statistics are updated inside the op), no host-device synchronisation,
CUDA graph capture, and eval results that follow in-place changes of the BN tensors."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import mobilenet

from .common import HAS_CUDA, backend_param, ops


class DispatchedOps(TorchDispatchMode):
    """Records every op dispatched to Python while active (an op's own internals are not)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _fused_inputs(conv: str, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    shape = (8, 1, 3, 3) if conv == "depthwise" else (12, 8, 1, 1)
    c = shape[0]
    w = torch.randn(shape, generator=gen)
    bn = [torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)]
    running = [torch.zeros(c), torch.ones(c)]
    tensors = [t.to(device) for t in (x, w, *bn, *running)]
    return tensors, torch.zeros((), dtype=torch.long, device=device)


def _call(conv, tensors, nbt, training, backend):
    x, w, bn_w, bn_b, rm, rv = tensors
    fn = kernels.pointwise_bn_act if conv == "pointwise" else kernels.depthwise_bn_act
    geometry = {"padding": 1} if conv == "depthwise" else {}
    return fn(
        x,
        w,
        rm,
        rv,
        bn_w,
        bn_b,
        training=training,
        backend=backend,
        num_batches_tracked=nbt,
        momentum=None,
        **geometry,
    )


@pytest.mark.parametrize("backend, device", [backend_param("native", "cpu")])
@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
def test_a_fused_training_step_dispatches_one_op_each_way(backend, device, conv):
    tensors, nbt = _fused_inputs(conv, device)
    x, w, bn_w, bn_b = (t.requires_grad_() for t in tensors[:4])
    fwd = (
        ops(backend).pointwise_bn_act_fwd
        if conv == "pointwise"
        else ops(backend).depthwise_bn_act_fwd
    )
    bwd = (
        ops(backend).pointwise_bn_act_bwd
        if conv == "pointwise"
        else ops(backend).depthwise_bn_act_bwd
    )
    with DispatchedOps() as forward:
        out = _call(conv, tensors, nbt, True, backend)
    assert forward.ops == [fwd]
    assert int(nbt) == 1
    grad_out = torch.ones_like(out)
    with DispatchedOps() as backward:
        torch.autograd.grad(out, [x, w, bn_w, bn_b], grad_out)
    assert backward.ops == [bwd]
    with torch.no_grad(), DispatchedOps() as evaluation:
        _call(conv, tensors, nbt, False, backend)
    assert evaluation.ops == [fwd]
    assert int(nbt) == 1


@pytest.mark.parametrize("backend, device", [backend_param("native", "cpu")])
@pytest.mark.parametrize("conv", ["pointwise", "depthwise"])
def test_eval_sees_in_place_changes_of_the_bn_tensors(backend, device, conv):
    """Whatever the eval path folds or caches, an in-place change of a BN tensor between two
    calls shows in the second result."""
    tensors, nbt = _fused_inputs(conv, device)
    first = _call(conv, tensors, nbt, False, backend)
    for index in (2, 3, 4, 5):  # bn_weight, bn_bias, running_mean, running_var
        with torch.no_grad():
            tensors[index].mul_(1.5).add_(0.25)
        got = _call(conv, tensors, nbt, False, backend)
        want = _call(conv, tensors, nbt, False, "torch")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, first)
        first = got


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_a_training_step_never_synchronises(backend):
    """No op waits for the device: a DepSepConv training step (forward, loss, backward, SGD
    step) runs under torch.cuda.set_sync_debug_mode("error"), momentum=None included."""
    block = mobilenet.DepSepConv(32, 64, backend=backend).cuda()
    block = block.to(memory_format=torch.channels_last)
    for bn in (block.depthwise[1], block.pointwise[1]):
        bn.momentum = None
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    x = torch.randn(8, 32, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the first step warms the kernels up (autotuning may synchronise)
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.zero_grad(set_to_none=True)
            block(x).square().mean().backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(block.depthwise[1].num_batches_tracked) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_graph_replays_a_training_step(backend):
    """torch.cuda.graphs captures a DepSepConv training step (forward, loss, backward, SGD step)
    and its replays match the same steps run eagerly."""
    torch.manual_seed(0)
    eager = (
        mobilenet.DepSepConv(32, 64, backend=backend).cuda().to(memory_format=torch.channels_last)
    )
    graphed = mobilenet.DepSepConv(32, 64, backend=backend).cuda()
    graphed = graphed.to(memory_format=torch.channels_last)
    graphed.load_state_dict(eager.state_dict())
    inputs = [
        torch.randn(8, 32, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
        for _ in range(3)
    ]
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    graphed_opt = torch.optim.SGD(graphed.parameters(), lr=0.1, capturable=True)
    static_x = inputs[0].clone()

    def step(module, optimizer, x):
        optimizer.zero_grad(set_to_none=False)
        loss = module(x).square().mean()
        loss.backward()
        optimizer.step()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        for _ in range(2):
            step(graphed, graphed_opt, static_x)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(2):
        step(eager, eager_opt, static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(graphed, graphed_opt, static_x)
    for x in inputs:
        static_x.copy_(x)
        graph.replay()
        want = step(eager, eager_opt, x)
        torch.testing.assert_close(static_loss, want, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b), c in zip(graphed.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_reduce_overhead_compile_of_the_converted_model_runs():
    """torch.compile(mode="reduce-overhead") (CUDA graphs) of the reference MobileNet converted
    to the fast layers: training and eval steps run and match the eager converted model."""
    torch.manual_seed(0)
    reference = mobilenet.reference.MobileNet(0.25, num_classes=10).cuda()
    fast = mobilenet.convert(reference, inplace=False).to(memory_format=torch.channels_last)
    compiled = torch.compile(fast, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    fast.eval()
    with torch.no_grad():
        for _ in range(3):
            got = compiled(x)
        want = mobilenet.convert(reference, inplace=False).eval()(x)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    fast.train()
    for _ in range(3):
        compiled(x).square().mean().backward()
