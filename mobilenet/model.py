"""MobileNet V1 (arXiv 1704.04861) built from the fast DepSepConv block."""

import functools

import torch
from torch import Tensor

from . import reference
from .layers import DepSepConv, recomputable_run, run_recomputed

PAPER_RESOLUTION = 224


class MobileNet(reference.MobileNet):
    """MobileNet V1 with width multiplier `alpha` (channel counts int(c * alpha)): the reference
    model (mobilenet.reference.MobileNet) built with the fused DepSepConv as its block, so its
    module tree and state_dict keys are the reference's and a reference checkpoint loads with
    strict=True. Its 13 blocks run the fused ops (`backend`: their backend, None for auto; each
    block a chain in training, `recompute` as DepSepConv's); the stem (a full 3x3 convolution)
    and the classifier are plain PyTorch. In training (unless recompute is None) the stem keeps
    only the image for backward (layers.run_recomputed: its convolution and BatchNorm run again
    in backward, about 2% of the network's multiply-adds), and the first block's chain computes
    the stem's output again too rather than keep it, so the image is all that autograd keeps of
    the first two layers.

    The modules are created in the reference's order, so under the same seed both models start
    from the same parameters.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        num_classes: int = 1000,
        *,
        backend: str | None = None,
        recompute: str | None = "depthwise",
    ):
        block = functools.partial(DepSepConv, backend=backend, recompute=recompute)
        super().__init__(alpha, num_classes, block=block)
        self.recompute = recompute

    def stem_and_first_block(self, x: Tensor) -> Tensor:
        if not (
            self.recompute is not None
            and torch.is_grad_enabled()
            and recomputable_run(self.conv1, self.bn1, self.relu)
        ):
            return super().stem_and_first_block(x)
        y, again = run_recomputed(x, self.conv1, self.bn1, self.relu)
        if isinstance(self.conv2, DepSepConv) and not torch.compiler.is_compiling():
            # The first block's chain computes the stem's output again rather than keep it.
            return self.conv2(y, recompute_input=again)
        return self.conv2(y)


def input_size(resolution_multiplier: float) -> int:
    """The input image side for the paper's resolution multiplier rho: 224 * rho rounded to the
    nearest integer. The paper's rho = 6/7, 5/7 and 4/7 (often written 0.857, 0.714, 0.571,
    which round the same way) give 192, 160 and 128; rho = 1 gives 224. The model takes any
    size: rho is not a parameter of the network, only of its input."""
    rho = resolution_multiplier
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho:
        raise ValueError(
            f"input_size: resolution_multiplier must be a positive number, got {rho!r}"
        )
    side = round(PAPER_RESOLUTION * rho)
    if side < 1:
        raise ValueError(
            f"input_size: resolution_multiplier {rho!r} gives an empty image ({side} pixels)"
        )
    return side
