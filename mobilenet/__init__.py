"""MobileNet V1 and its depthwise-separable block, and drop-in fast layers for any model.

- `DepSepConv`, `MobileNet`: the depthwise-separable block and MobileNet V1 computed by the
  fused ops, with the reference's constructor, module tree and state_dict keys
  (`mobilenet.reference` holds the plain-PyTorch originals: the oracle of the tests and the
  baseline of the benchmarks).
- `ConvBNAct`, `FusedSequential`, `DepthwiseConv2d`: the fast layers themselves.
- `convert(model)` swaps them into any model (torchvision's and timm's mobile networks
  included); `revert(model)` takes them out.
- `input_size(rho)`: the input side for the paper's resolution multiplier.
"""

from . import reference
from .convert import convert, revert
from .layers import ConvBNAct, DepSepConv, DepthwiseConv2d, FusedSequential
from .model import MobileNet, input_size

__all__ = [
    "ConvBNAct",
    "DepSepConv",
    "DepthwiseConv2d",
    "FusedSequential",
    "MobileNet",
    "convert",
    "input_size",
    "reference",
    "revert",
]
