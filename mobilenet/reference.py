"""The reference MobileNet V1 (arXiv 1704.04861) in plain PyTorch: the oracle of the tests and the
baseline of the benchmarks."""

import torch
from torch import nn


class DepSepConv(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(
                in_channels,
                in_channels,
                3,
                stride=stride,
                padding=1,
                groups=in_channels,
                bias=False,
            ),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
        )
        self.pointwise = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNet(nn.Module):
    """MobileNet V1 with width multiplier `alpha` (channel counts int(c * alpha)).

    `block(in_channels, out_channels, stride)` builds each of the 13 depthwise-separable blocks:
    DepSepConv here, the fused one in mobilenet.MobileNet."""

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, *, block=DepSepConv):
        super().__init__()

        def c(channels: int) -> int:
            return int(channels * alpha)

        self.conv1 = nn.Conv2d(3, c(32), 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = block(c(32), c(64), 1)
        self.conv3 = nn.Sequential(block(c(64), c(128), 2), block(c(128), c(128), 1))
        self.conv4 = nn.Sequential(block(c(128), c(256), 2), block(c(256), c(256), 1))
        self.conv5 = nn.Sequential(
            block(c(256), c(512), 2), *[block(c(512), c(512), 1) for _ in range(5)]
        )
        self.conv6 = nn.Sequential(block(c(512), c(1024), 2), block(c(1024), c(1024), 1))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c(1024), num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def stem_and_first_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv6(self.conv5(self.conv4(self.conv3(self.stem_and_first_block(x)))))
        return self.fc(torch.flatten(self.avg_pool(x), 1))


def mult_adds(model: nn.Module, resolution: int = 224) -> int:
    """Multiply-adds of one image through the model's convolutions and linear layers."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution))
    finally:
        for hook in hooks:
            hook.remove()
    return total
