"""Whole networks end to end: inference and training-step throughput in images/s, and the memory
of a training step. By default MobileNet V1; `--model` takes others, by name:

  mobilenet_v1         the built-in MobileNet V1 (width multiplier 1)
  timm:<model>         timm.create_model(<model>, pretrained=False): random weights
  torchvision:<model>  torchvision.models.get_model(<model>, weights=None)

Modes:
  eval              inference: model.eval() forward of a batch under torch.no_grad()
  forward+backward  one training step: forward, cross-entropy loss on random labels, backward,
                    SGD (momentum 0.9) step; the gradients are set to None before each step
"torch" is the network itself, eager (mobilenet.reference.MobileNet for MobileNet V1); the
compile baselines compile a copy of it (the loss and the optimizer step stay eager); a depsep
backend runs mobilenet.convert(copy, backend=...) of it (mobilenet.MobileNet(...,
backend=...) for MobileNet V1) with its state_dict; the chain variants as in bench/block.py.
The tables note how many of its BatchNorms
convert() fused. Mixed precision as in bench/block.py.

The check compares the logits (eval), or the loss and every running statistic after one step
from the same state. Not the gradients: rounding noise dominates those of a randomly initialised
deep network (measured on MobileNet V1 on CPU, batch 8: float32 gradients differ from a float64
run by 3% in relative L2 norm, bfloat16 ones by over 100%, while the loss and running
statistics agree to 1e-5 and 1e-2); the layer and block benchmarks check every layer's
gradients. Memory of the training step: see harness.measure_memory. No bandwidth: the layer
tables give it.
"""

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.block import (
    CHAIN_BASELINES,
    autocast_for,
    fast_backend,
    module_for_backend,
    runnable,
    running_statistics,
    runs_reference,
    seeded_module,
)
from bench.harness import Case, Op, Outputs, Runner, layout_format
from bench.shapes import MOBILENET_V1, MOBILENET_V1_QUICK, QUICK_RESOLUTION, ModelConfig

LEARNING_RATE, MOMENTUM = 0.01, 0.9
BUILT_IN = MOBILENET_V1.name
SOURCES = ("timm", "torchvision")


@dataclass(frozen=True)
class ModelInputs:
    module: nn.Module  # the reference model, on the device
    images: torch.Tensor
    labels: torch.Tensor


def _library(source: str):
    if source == "timm":
        import timm

        return timm
    import torchvision.models

    return torchvision.models


def _known(source: str, name: str) -> bool:
    library = _library(source)
    return library.is_model(name) if source == "timm" else name in library.list_models()


def model_configs(names: list[str], resolution: int) -> tuple[ModelConfig, ...]:
    """The networks named as --model takes them, at `resolution`; a ValueError names a bad one."""
    if resolution < 1:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    configs = []
    for name in names:
        source, _, model = name.partition(":")
        if name != BUILT_IN and (source not in SOURCES or not model):
            raise ValueError(
                f"--model: expected {BUILT_IN}, timm:<model> or torchvision:<model>, got {name!r}"
            )
        if name != BUILT_IN:
            try:
                known = _known(source, model)
            except ImportError as error:
                raise ValueError(f"--model {name}: {source} is not installed ({error})") from None
            if not known:
                raise ValueError(f"--model {name}: {source} has no model {model!r}")
        configs.append(dataclasses.replace(MOBILENET_V1, name=name, resolution=resolution))
    return tuple(configs)


def with_models(op: Op, names: list[str] | None, resolution: int | None, quick: bool) -> Op:
    """The model op over the networks named (default: MobileNet V1) at `resolution` (default:
    224, --quick 64)."""
    size = resolution or (QUICK_RESOLUTION if quick else MOBILENET_V1.resolution)
    configs = model_configs(names or [BUILT_IN], size)
    return dataclasses.replace(op, layers=configs, subset_layers=configs, quick_layers=configs)


def build_reference(config: ModelConfig) -> nn.Module:
    """The network as its library builds it, random weights."""
    if config.name == BUILT_IN:
        from mobilenet.reference import MobileNet

        return MobileNet(config.alpha, config.num_classes)
    source, _, model = config.name.partition(":")
    if source == "timm":
        return _library(source).create_model(
            model, pretrained=False, num_classes=config.num_classes
        )
    return _library(source).get_model(model, weights=None, num_classes=config.num_classes)


def make_case(layer: ModelConfig, batch: int, dtype: torch.dtype, layout: str, mode: str) -> Case:
    width = f" alpha {layer.alpha}" if layer.name == BUILT_IN else ""
    shape = f"{layer.name}{width}, {batch}x3x{layer.resolution}x{layer.resolution}"
    return Case("model", mode, layer, batch, dtype, layout, shape, None, images=batch)


def make_inputs(case: Case, device: torch.device) -> ModelInputs:
    config = case.layer
    generator = torch.Generator(device).manual_seed(0)
    size = (case.batch, 3, config.resolution, config.resolution)
    # Drawn in float32 whatever the dtype, so that every dtype sees the same images.
    images = torch.randn(size, generator=generator, device=device).to(case.dtype)
    labels = torch.randint(config.num_classes, (case.batch,), generator=generator, device=device)
    return ModelInputs(
        module=seeded_module(lambda: build_reference(config), case, device),
        images=images.contiguous(memory_format=layout_format(case.layout)),
        labels=labels,
    )


def _fast_model(config: ModelConfig, reference: nn.Module, backend: str) -> nn.Module:
    import mobilenet

    backend, recompute = fast_backend(backend)
    if config.name == BUILT_IN:
        return mobilenet.MobileNet(
            config.alpha, config.num_classes, backend=backend, recompute=recompute
        )
    return mobilenet.convert(reference, backend=backend, inplace=False, recompute=recompute)


def make_runner(case: Case, inputs: ModelInputs, backend: str) -> Runner:
    def build_fast(backend: str) -> nn.Module:
        return _fast_model(case.layer, inputs.module, backend)

    module = module_for_backend(inputs.module, case, backend, build_fast)
    module.train(case.mode != "eval")
    model = runnable(module, backend)
    device = inputs.images.device
    if case.mode == "eval":

        def infer() -> Outputs:
            with torch.no_grad(), autocast_for(case, device):
                return {"output": model(inputs.images)}

        return infer

    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def train_step() -> Outputs:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(case, device):
            loss = F.cross_entropy(model(inputs.images), inputs.labels)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), **running_statistics(module)}

    return train_step


def describe_fusion(case: Case, inputs: ModelInputs, backend: str) -> str:
    """How many of the network's BatchNorms the fast model computes in fused runs."""
    if runs_reference(backend):
        return ""
    from mobilenet.layers import FusedRuns

    fast = _fast_model(case.layer, copy.deepcopy(inputs.module), backend)
    fused = {
        id(module._modules[run[1]])
        for module in fast.modules()
        if isinstance(module, FusedRuns)
        for run in module.fused_runs.values()
    }
    norms = [module for module in fast.modules() if isinstance(module, nn.BatchNorm2d)]
    return f"{len(fused)} of its {len(norms)} BatchNorms in fused runs"


OP = Op(
    name="model",
    modes=("eval", "forward+backward"),
    layers=(MOBILENET_V1,),
    subset_layers=(MOBILENET_V1,),
    quick_layers=(MOBILENET_V1_QUICK,),
    make_case=make_case,
    make_inputs=make_inputs,
    make_runner=make_runner,
    baselines=CHAIN_BASELINES,
    # A small CPU batch: a 2-core training step of 8 images takes seconds.
    default_batch={"cpu": 2, "cuda": 128},
    describe_kernel=describe_fusion,
    memory_modes=("forward+backward",),
    whole_network=True,
    tolerance_scale=5.0,  # 28 layers deep and more: rounding differences compound
)
