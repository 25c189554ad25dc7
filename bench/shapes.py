"""Layer shapes of MobileNet V1 (alpha = 1.0, 224x224 input), the benchmark workload (SPEC §3, §6).

Both tables derive from the block list, so the depthwise and pointwise shapes cannot drift apart.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DepthwiseLayer:
    """A 3x3 depthwise convolution, padding 1, on a square input."""

    name: str
    channels: int
    size: int  # input height = width
    stride: int
    kernel_size: int = 3

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel_size) // self.stride + 1


@dataclass(frozen=True)
class PointwiseLayer:
    """A 1x1 convolution on a square input."""

    name: str
    in_channels: int
    out_channels: int
    size: int


# (in_channels, out_channels, stride) of the 13 DepSepConv blocks, conv2 through conv6.
_BLOCKS = (
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    *[(512, 512, 1)] * 5,
    (512, 1024, 2),
    (1024, 1024, 1),
)
_FIRST_BLOCK_SIZE = 112  # conv1 (stride 2) halves the 224x224 image


def _mobilenet_v1_layers() -> tuple[tuple[DepthwiseLayer, ...], tuple[PointwiseLayer, ...]]:
    depthwise, pointwise = [], []
    size = _FIRST_BLOCK_SIZE
    for index, (cin, cout, stride) in enumerate(_BLOCKS, start=1):
        dw = DepthwiseLayer(f"dw{index}", cin, size, stride)
        depthwise.append(dw)
        # The pointwise half runs on the depthwise output.
        pointwise.append(PointwiseLayer(f"pw{index}", cin, cout, dw.out_size))
        size = dw.out_size
    return tuple(depthwise), tuple(pointwise)


MOBILENET_V1_DEPTHWISE, MOBILENET_V1_POINTWISE = _mobilenet_v1_layers()


def quick_subset(layers: tuple) -> tuple:
    """The layers --quick runs: the first (largest), a stride-2, a mid-network and the last one."""
    return tuple(layers[index] for index in (0, 1, 6, 12))
