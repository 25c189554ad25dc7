"""MobileNet V1 end to end: inference and training-step throughput in images/s, and the memory
of a training step.

Modes:
  eval              inference: model.eval() forward of a batch under torch.no_grad()
  forward+backward  one training step: forward, cross-entropy loss on random labels, backward,
                    SGD (momentum 0.9) step; the gradients are set to None before each step
"torch" is mobilenet.reference.MobileNet, eager; the compile baselines compile a copy of it (the
loss and the optimizer step stay eager); a depsep backend runs mobilenet.MobileNet(...,
backend=...) with the reference's state_dict. Mixed precision as in bench/block.py.

The check compares the logits (eval), or the loss and every running statistic after one step
from the same state. Not the gradients: rounding noise dominates those of a randomly initialised
28-layer network (measured on CPU, batch 8: float32 gradients differ from a float64 run by 3% in
relative L2 norm, bfloat16 ones by over 100%, while the loss and running statistics agree to
1e-5 and 1e-2); the layer and block benchmarks check every layer's gradients. Memory of the
training step: see harness.measure_memory. No bandwidth: the layer tables give it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.block import (
    autocast_for,
    module_for_backend,
    runnable,
    running_statistics,
    seeded_module,
)
from bench.harness import COMPILE_BASELINES, Case, Op, Outputs, Runner, layout_format
from bench.shapes import MOBILENET_V1, MOBILENET_V1_QUICK, ModelConfig

LEARNING_RATE, MOMENTUM = 0.01, 0.9


@dataclass(frozen=True)
class ModelInputs:
    module: nn.Module  # the reference model, on the device
    images: torch.Tensor
    labels: torch.Tensor


def make_case(layer: ModelConfig, batch: int, dtype: torch.dtype, layout: str, mode: str) -> Case:
    shape = f"{batch}x3x{layer.resolution}x{layer.resolution} alpha {layer.alpha}"
    return Case("model", mode, layer, batch, dtype, layout, shape, None, images=batch)


def make_inputs(case: Case, device: torch.device) -> ModelInputs:
    from mobilenet.reference import MobileNet

    config = case.layer
    generator = torch.Generator(device).manual_seed(0)
    size = (case.batch, 3, config.resolution, config.resolution)
    # Drawn in float32 whatever the dtype, so that every dtype sees the same images.
    images = torch.randn(size, generator=generator, device=device).to(case.dtype)
    labels = torch.randint(config.num_classes, (case.batch,), generator=generator, device=device)
    return ModelInputs(
        module=seeded_module(lambda: MobileNet(config.alpha, config.num_classes), case, device),
        images=images.contiguous(memory_format=layout_format(case.layout)),
        labels=labels,
    )


def make_runner(case: Case, inputs: ModelInputs, backend: str) -> Runner:
    config = case.layer

    def build_fast(backend: str) -> nn.Module:
        from mobilenet import MobileNet  # the fast model, written beside these benchmarks

        return MobileNet(config.alpha, config.num_classes, backend=backend)

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


OP = Op(
    name="model",
    modes=("eval", "forward+backward"),
    layers=(MOBILENET_V1,),
    subset_layers=(MOBILENET_V1,),
    quick_layers=(MOBILENET_V1_QUICK,),
    make_case=make_case,
    make_inputs=make_inputs,
    make_runner=make_runner,
    baselines=COMPILE_BASELINES,
    # A small CPU batch: a 2-core training step of 8 images takes seconds.
    default_batch={"cpu": 2, "cuda": 128},
    memory_modes=("forward+backward",),
    tolerance_scale=5.0,  # 28 layers deep: rounding differences compound
)
