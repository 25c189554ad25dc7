"""Host cost per call: every public op, the DepSepConv block and MobileNet V1, on tiny tensors
(so that the kernels' own time is about zero), beside the eager PyTorch code each replaces.

On a GPU the kernels run asynchronously and the host's time per layer is hidden only while it
is shorter than the kernel's: a fused layer that costs the host more than the eager ops it
replaces loses in eager mode however fast its kernel. Rows (each with its own input; --batch does
not apply):
  depthwise_conv2d   2x8x4x4 channels_last, 3x3, padding 1; eager: F.conv2d(groups=8)
  pointwise_bn_act   2x8x4x4 -> 8; eager: F.conv2d -> F.batch_norm -> F.relu
  depthwise_bn_act   2x8x4x4, 3x3, padding 1; eager: F.conv2d(groups=8) -> F.batch_norm -> F.relu
  block              mobilenet.DepSepConv(8, 8) on 2x8x4x4; eager: mobilenet.reference.DepSepConv
  model              mobilenet.MobileNet(alpha=0.25) on 1x3x64x64 (the smallest input whose last
                     blocks still see more than one value per channel in training); eager: the
                     reference MobileNet
Modes: forward (training mode, inputs and parameters requiring gradients: the graph is built),
forward+backward (the gradients of the input and every parameter), eval (eval mode under
torch.no_grad). Timing (bench.harness.make_host_timer): on a CPU one thread; on a GPU the wall
time per call of a loop that synchronises only at its end, which is what an eager user sees.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
import mobilenet
from bench.harness import REFERENCE, Case, Op, Outputs, Runner, layout_format
from mobilenet import reference

MODES = ("forward", "forward+backward", "eval")
CHANNELS, SIZE, BATCH = 8, 4, 2


@dataclass(frozen=True)
class OverheadLayer:
    name: str
    input_shape: tuple[int, int, int, int]


LAYERS = (
    OverheadLayer("depthwise_conv2d", (BATCH, CHANNELS, SIZE, SIZE)),
    OverheadLayer("pointwise_bn_act", (BATCH, CHANNELS, SIZE, SIZE)),
    OverheadLayer("depthwise_bn_act", (BATCH, CHANNELS, SIZE, SIZE)),
    OverheadLayer("block", (BATCH, CHANNELS, SIZE, SIZE)),
    OverheadLayer("model", (1, 3, 64, 64)),
)
MODEL_ALPHA = 0.25


def make_case(layer: OverheadLayer, batch: int, dtype, layout: str, mode: str) -> Case:
    shape = "x".join(map(str, layer.input_shape))
    return Case("overhead", mode, layer, layer.input_shape[0], dtype, layout, shape, None)


@dataclass(frozen=True)
class OverheadInputs:
    input: torch.Tensor
    grad_output: torch.Tensor | None
    module: nn.Module  # the reference: a conv + BN (+ ReLU) Sequential, the block or the model


def _reference_module(layer: OverheadLayer) -> nn.Module:
    if layer.name == "block":
        return reference.DepSepConv(CHANNELS, CHANNELS)
    if layer.name == "model":
        return reference.MobileNet(MODEL_ALPHA)
    groups = 1 if layer.name == "pointwise_bn_act" else CHANNELS
    kernel = 1 if layer.name == "pointwise_bn_act" else 3
    conv = nn.Conv2d(CHANNELS, CHANNELS, kernel, padding=kernel // 2, groups=groups, bias=False)
    if layer.name == "depthwise_conv2d":
        return nn.Sequential(conv)
    return nn.Sequential(conv, nn.BatchNorm2d(CHANNELS), nn.ReLU())


def make_inputs(case: Case, device: torch.device) -> OverheadInputs:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _reference_module(case.layer)
        x = torch.randn(case.layer.input_shape)
    fmt = layout_format(case.layout)
    module = module.to(device=device, dtype=case.dtype, memory_format=fmt)
    x = x.to(device=device, dtype=case.dtype).contiguous(memory_format=fmt)
    grad_output = None
    if case.mode == "forward+backward":
        with torch.no_grad():
            grad_output = torch.randn_like(module.eval()(x))
    return OverheadInputs(x, grad_output, module)


def _functional(layer: OverheadLayer, backend: str, module: nn.Sequential):
    """The row's call on `module`'s tensors: eager PyTorch for the reference, the depsep op for
    a backend; the BatchNorm's training flag is read at each call."""
    conv = module[0]
    if layer.name == "depthwise_conv2d":
        if backend == REFERENCE:
            return lambda x: F.conv2d(x, conv.weight, None, 1, 1, 1, CHANNELS)
        return lambda x: kernels.depthwise_conv2d(x, conv.weight, padding=1, backend=backend)
    bn = module[1]
    bn_tensors = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    if backend == REFERENCE:

        def eager(x):
            y = F.conv2d(x, conv.weight, None, 1, conv.padding, 1, conv.groups)
            return F.relu(F.batch_norm(y, *bn_tensors, bn.training, bn.momentum, bn.eps))

        return eager
    if layer.name == "pointwise_bn_act":
        fused, geometry = kernels.pointwise_bn_act, {}
    else:
        fused, geometry = kernels.depthwise_bn_act, {"padding": 1}

    def depsep(x):
        return fused(x, conv.weight, *bn_tensors, training=bn.training, backend=backend, **geometry)

    return depsep


def _callable(case: Case, inputs: OverheadInputs, backend: str):
    """(the module that holds the parameters, the call): each backend on its own copy."""
    layer = case.layer
    if layer.name not in ("block", "model"):
        module = copy.deepcopy(inputs.module)
        return module, _functional(layer, backend, module)
    if backend == REFERENCE:
        module = copy.deepcopy(inputs.module)
    else:
        if layer.name == "block":
            fast = mobilenet.DepSepConv(CHANNELS, CHANNELS, backend=backend)
        else:
            fast = mobilenet.MobileNet(MODEL_ALPHA, backend=backend)
        parameter = next(inputs.module.parameters())
        module = fast.to(
            device=parameter.device, dtype=parameter.dtype, memory_format=layout_format(case.layout)
        )
        module.load_state_dict(inputs.module.state_dict())
    return module, module


def make_runner(case: Case, inputs: OverheadInputs, backend: str) -> Runner:
    module, call = _callable(case, inputs, backend)
    x = inputs.input
    if case.mode == "eval":
        module.eval()

        def evaluate() -> Outputs:
            with torch.no_grad():
                return {"output": call(x)}

        return evaluate
    module.train()
    x = x.detach().requires_grad_()
    leaves = (x, *module.parameters())
    if case.mode == "forward":
        return lambda: {"output": call(x)}

    def forward_backward() -> Outputs:
        out = call(x)
        grads = torch.autograd.grad(out, leaves, inputs.grad_output)
        return {"output": out.detach(), **{f"grad_{i}": g for i, g in enumerate(grads)}}

    return forward_backward


OP = Op(
    name="overhead",
    modes=MODES,
    layers=LAYERS,
    subset_layers=LAYERS,
    quick_layers=LAYERS[1:2],
    make_case=make_case,
    make_inputs=make_inputs,
    make_runner=make_runner,
    baselines={},
    default_batch={"cpu": BATCH, "cuda": BATCH},
    host_timed=True,
    # The model row at batch 1: its last BatchNorms normalise over 4 values per channel, which
    # amplifies float32 rounding (eager's own float32 result moves between runs by up to 0.07%
    # of the elements beyond the float32 tolerance), as deep networks do in bench/model.py.
    tolerance_scale=5.0,
)
