"""The DepSepConv block (depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU) on MobileNet
V1's 13 blocks; also the module plumbing bench/model.py shares.

"torch" is mobilenet.reference.DepSepConv (eager nn.Conv2d, nn.BatchNorm2d, nn.ReLU); the
compile baselines compile a copy of it; a depsep backend runs mobilenet.DepSepConv(...,
backend=...) with the reference's state_dict, and "<backend>-unchained" and
"<backend>-recompute-all" the same with recompute=None and "all" (CHAIN_VARIANTS), in training.
forward+backward also reports memory (harness.measure_memory): what autograd saved for backward
and the step's peak. In float16/bfloat16 the modules keep float32 parameters and run under
torch.autocast, as mixed-precision training does; the input is in the case's dtype.

Modes as in bench/bn_act.py, for the whole block (train() or eval() mode; "backward" and
"forward+backward" take the gradients of the input and of every parameter). Minimum bytes: the
formulas of bn_act.conv_bn_act_min_bytes with w = both convolutions' weights and c = the block's
per-channel vectors of both BatchNorms (in_channels + out_channels); the depthwise half's output
is not counted, as a whole-block fusion would never write it.
"""

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from bench.bn_act import MODES, bn_dtype, conv_bn_act_min_bytes
from bench.harness import (
    COMPILE_BASELINES,
    COMPILE_MODES,
    REFERENCE,
    Case,
    Op,
    Outputs,
    Runner,
    backend_availability,
    compile_reference,
    layout_format,
)
from bench.shapes import MOBILENET_V1_BLOCKS, BlockLayer, quick_subset, subset

# The chain policies timed beside each depsep backend's default ("depthwise": a chain
# recomputes its depthwise stages' outputs in backward), in training only: "unchained", each
# fused layer keeping its own input (what the recomputation saves is measured against it), and
# "recompute-all", a chain keeping only its input. Named "<backend>-<variant>".
CHAIN_VARIANTS = {"unchained": None, "recompute-all": "all"}
_CHAINED_BACKENDS = ("native", "triton")


def fast_backend(backend: str) -> tuple[str, str | None]:
    """(the depsep backend, the chain policy) a depsep backend or a chain variant of one runs."""
    for variant, recompute in CHAIN_VARIANTS.items():
        if backend.endswith(f"-{variant}"):
            return backend.removesuffix(f"-{variant}"), recompute
    return backend, "depthwise"


def _chain_variant_applies(backend: str):
    def applies(case: Case, device: torch.device) -> str | None:
        if case.mode == "eval":
            return "chains change training only"
        return backend_availability(device)[fast_backend(backend)[0]]

    return applies


# Baselines of the block and the model: torch.compile, and the chain variants.
CHAIN_BASELINES = {
    **COMPILE_BASELINES,
    **{
        f"{backend}-{variant}": _chain_variant_applies(f"{backend}-{variant}")
        for backend in _CHAINED_BACKENDS
        for variant in CHAIN_VARIANTS
    },
}


def parameter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The modules' parameter dtype: float32 (autocast computes in the low precision) or
    float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_for(case: Case, device: torch.device):
    if case.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=case.dtype)
    return nullcontext()


def seeded_module(build, case: Case, device: torch.device) -> nn.Module:
    """A module built with a fixed seed and random BatchNorm affine terms and statistics, where
    it has them (the defaults, 1 and 0, would hide a wrong use of them), on the device in the
    case's layout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build()
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d) and bn.affine:
                nn.init.normal_(bn.weight, 1.0, 0.1)
                nn.init.normal_(bn.bias, 0.0, 0.1)
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                bn.running_mean.normal_(0.0, 0.1)
                bn.running_var.uniform_(0.8, 1.2)
    return module.to(
        device=device, dtype=parameter_dtype(case.dtype), memory_format=layout_format(case.layout)
    )


def runs_reference(backend: str) -> bool:
    """Whether `backend` runs the reference module itself: "torch" and the compile baselines
    (which compile a copy of it)."""
    return backend == REFERENCE or backend in COMPILE_MODES


def module_for_backend(reference: nn.Module, case: Case, backend: str, build_fast) -> nn.Module:
    """The module a backend runs, with the reference's parameters and buffers: a copy of the
    reference (see runs_reference) or build_fast(backend), the depsep module."""
    if runs_reference(backend):
        return copy.deepcopy(reference)
    parameter = next(reference.parameters())
    fast = build_fast(backend).to(
        device=parameter.device, dtype=parameter.dtype, memory_format=layout_format(case.layout)
    )
    fast.load_state_dict(reference.state_dict())
    return fast


def runnable(module: nn.Module, backend: str):
    """What a runner calls: the module itself, or its compiled copy for a compile baseline."""
    return compile_reference(module, backend) if backend in COMPILE_MODES else module


def running_statistics(module: nn.Module) -> Outputs:
    return {
        name: buffer
        for name, buffer in module.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


@dataclass(frozen=True)
class BlockInputs:
    module: nn.Module  # the reference block, on the device
    input: torch.Tensor
    grad_output: torch.Tensor | None  # the modes with a backward only


def make_case(layer: BlockLayer, batch: int, dtype: torch.dtype, layout: str, mode: str) -> Case:
    dw, pw = layer.depthwise, layer.pointwise
    weights = dw.channels * dw.kernel_size**2 + pw.out_channels * pw.in_channels
    min_bytes = conv_bn_act_min_bytes(
        mode,
        x=batch * dw.channels * dw.size**2 * dtype.itemsize,
        y=batch * pw.out_channels * pw.size**2 * dtype.itemsize,
        w=weights * parameter_dtype(dtype).itemsize,
        c=(dw.channels + pw.out_channels) * bn_dtype(dtype).itemsize,
    )
    shape = f"{batch}x{dw.channels}x{dw.size}x{dw.size} s{dw.stride} -> {pw.out_channels}"
    return Case("block", mode, layer, batch, dtype, layout, shape, min_bytes)


def _reference_block(layer: BlockLayer) -> nn.Module:
    from mobilenet.reference import DepSepConv

    return DepSepConv(
        layer.depthwise.channels, layer.pointwise.out_channels, layer.depthwise.stride
    )


def make_inputs(case: Case, device: torch.device) -> BlockInputs:
    layer, memory_format = case.layer, layout_format(case.layout)
    # Drawn in float32 whatever the dtype, so that every dtype sees the same values.
    generator = torch.Generator(device).manual_seed(0)

    def randn(*size):
        tensor = torch.randn(size, generator=generator, device=device).to(case.dtype)
        return tensor.contiguous(memory_format=memory_format)

    dw, pw = layer.depthwise, layer.pointwise
    grad_output = None
    if case.mode != "eval":
        grad_output = randn(case.batch, pw.out_channels, pw.size, pw.size)
    return BlockInputs(
        module=seeded_module(lambda: _reference_block(layer), case, device),
        input=randn(case.batch, dw.channels, dw.size, dw.size),
        grad_output=grad_output,
    )


def make_runner(case: Case, inputs: BlockInputs, backend: str) -> Runner:
    layer = case.layer

    def build_fast(backend: str) -> nn.Module:
        from mobilenet import DepSepConv  # the fast block, written beside these benchmarks

        dw, pw = layer.depthwise, layer.pointwise
        backend, recompute = fast_backend(backend)
        return DepSepConv(
            dw.channels, pw.out_channels, dw.stride, backend=backend, recompute=recompute
        )

    module = module_for_backend(inputs.module, case, backend, build_fast)
    module.train(case.mode != "eval")
    block = runnable(module, backend)
    device = inputs.input.device
    if case.mode == "eval":

        def evaluate() -> Outputs:
            with torch.no_grad(), autocast_for(case, device):
                return {"output": block(inputs.input)}

        return evaluate

    input = inputs.input.detach().requires_grad_()
    named = {"grad_input": input} | {f"grad_{n}": p for n, p in module.named_parameters()}

    def forward() -> torch.Tensor:
        with autocast_for(case, device):
            return block(input)

    def gradients(output: torch.Tensor) -> Outputs:
        grads = torch.autograd.grad(
            output, tuple(named.values()), inputs.grad_output, retain_graph=case.mode == "backward"
        )
        return dict(zip(named, grads))

    if case.mode == "forward":
        return lambda: {"output": forward(), **running_statistics(module)}
    if case.mode == "forward+backward":

        def forward_backward() -> Outputs:
            output = forward()
            return {"output": output.detach(), **gradients(output), **running_statistics(module)}

        return forward_backward

    output = forward()
    return lambda: gradients(output)


OP = Op(
    name="block",
    modes=MODES,
    layers=MOBILENET_V1_BLOCKS,
    subset_layers=subset(MOBILENET_V1_BLOCKS),
    quick_layers=quick_subset(MOBILENET_V1_BLOCKS),
    make_case=make_case,
    make_inputs=make_inputs,
    make_runner=make_runner,
    baselines=CHAIN_BASELINES,
    memory_modes=("forward+backward",),
    tolerance_scale=2.0,  # two conv + BN layers deep
)
