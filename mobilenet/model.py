"""MobileNet V1 (arXiv 1704.04861) built from the fast DepSepConv block."""

import torch
from torch import nn

from .layers import DepSepConv

PAPER_RESOLUTION = 224


class MobileNet(nn.Module):
    """MobileNet V1 with width multiplier `alpha` (channel counts int(c * alpha)), the module tree
    and state_dict keys of mobilenet.reference.MobileNet (SPEC §3), so a reference checkpoint
    loads with strict=True. Its 13 blocks run the fused ops (`backend`: their backend, None for
    auto); the stem (a full 3x3 convolution) and the classifier are plain PyTorch.

    The modules are created in the reference's order, so under the same seed both models start
    from the same parameters.
    """

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, *, backend: str | None = None):
        super().__init__()

        def c(channels: int) -> int:
            return int(channels * alpha)

        def block(in_channels: int, out_channels: int, stride: int = 1) -> DepSepConv:
            return DepSepConv(in_channels, out_channels, stride, backend=backend)

        self.conv1 = nn.Conv2d(3, c(32), 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = block(c(32), c(64))
        self.conv3 = nn.Sequential(block(c(64), c(128), stride=2), block(c(128), c(128)))
        self.conv4 = nn.Sequential(block(c(128), c(256), stride=2), block(c(256), c(256)))
        self.conv5 = nn.Sequential(
            block(c(256), c(512), stride=2), *[block(c(512), c(512)) for _ in range(5)]
        )
        self.conv6 = nn.Sequential(block(c(512), c(1024), stride=2), block(c(1024), c(1024)))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c(1024), num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.conv6(self.conv5(self.conv4(self.conv3(self.conv2(x)))))
        return self.fc(torch.flatten(self.avg_pool(x), 1))


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
