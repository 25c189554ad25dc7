"""Layer shapes of MobileNet V1 (alpha = 1.0, 224x224 input), the benchmark workload, and the
whole networks the model benchmark runs.

The depthwise, pointwise and block tables derive from one block list, so they cannot drift apart.
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


@dataclass(frozen=True)
class BlockLayer:
    """A DepSepConv block: its depthwise half, then its pointwise half."""

    name: str
    depthwise: DepthwiseLayer
    pointwise: PointwiseLayer


MOBILENET_V1_BLOCKS = tuple(
    BlockLayer(f"block{index}", dw, pw)
    for index, (dw, pw) in enumerate(zip(MOBILENET_V1_DEPTHWISE, MOBILENET_V1_POINTWISE), 1)
)


@dataclass(frozen=True)
class ModelConfig:
    """A whole network at a square input resolution. `name` is "mobilenet_v1" (the built-in
    MobileNet V1 at width multiplier `alpha`), or "timm:<model>" / "torchvision:<model>": a model
    of that library, with random weights (see bench/model.py)."""

    name: str
    alpha: float
    resolution: int
    num_classes: int = 1000


MOBILENET_V1 = ModelConfig("mobilenet_v1", 1.0, 224)
# --quick only checks that every path runs: a small image keeps its CPU training step short.
QUICK_RESOLUTION = 64
MOBILENET_V1_QUICK = ModelConfig("mobilenet_v1", 1.0, QUICK_RESOLUTION)


def subset(layers: tuple) -> tuple:
    """A representative subset: the first (largest), a stride-2, a mid-network and the last
    layer (the layer tables' repeats, layers 7-11, share one shape)."""
    return tuple(layers[index] for index in (0, 1, 6, 12))


def quick_subset(layers: tuple) -> tuple:
    """The layer --quick runs: the last one (the smallest)."""
    return layers[-1:]
