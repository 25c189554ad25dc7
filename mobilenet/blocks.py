"""The blocks convert() knows besides nn.Sequential: modules whose own forward calls their conv
and BatchNorm children as attributes (`x = self.bn1(self.conv_pw(x))`), so that only their
source says which children feed each other.

For each known class, by qualified name (nothing here imports timm): the children one method of
it calls one after another, each on the output of the one before and on nothing else, and that
method rewritten to compute those children through FusedRuns.forward_runs. Each was read off the
class's source (timm 1.0): what runs between conv and BN, the residual, squeeze-excite,
drop_path; tests/test_models.py proves every entry equivalent to the original. convert() gives a
known block the fused class that fused_class makes for its class: derived from it, so isinstance
and every other method stay; pickling and deepcopy name the original class. A subclass of a
known class, which may override forward, is not known.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .layers import FusedRuns, qualified_name


@dataclass(frozen=True)
class KnownBlock:
    """children(block) -> the child names `method` calls in order (read at every call);
    `fused` is `method` computing them through forward_runs."""

    children: Callable[[nn.Module], tuple[str, ...]]
    method: str
    fused: Callable


def _residual_forward(self, x):
    """timm's EfficientNet-family blocks: the children in order, then the residual."""
    shortcut = x
    x = self.forward_runs(self.known_block.children(self), x)
    if self.has_skip:
        x = self.drop_path(x) + shortcut
    return x


def _sequence_forward(self, x):
    """timm's ConvNormAct, the reference DepSepConv: the children in order."""
    return self.forward_runs(self.known_block.children(self), x)


def _efficientnet_forward_features(self, x):
    """timm's EfficientNet.forward_features: stem, blocks, head, in order. With gradient
    checkpointing it runs the blocks through timm's checkpoint_seq: the original method then."""
    if self.grad_checkpointing:
        return super(type(self), self).forward_features(x)
    return self.forward_runs(self.known_block.children(self), x)


def _mobilenetv3_forward_head(self, x, pre_logits: bool = False):
    """timm's MobileNetV3.forward_head: pooling, head conv, norm, activation and flatten in
    order, then dropout and the classifier."""
    x = self.forward_runs(self.known_block.children(self), x)
    if self.drop_rate > 0.0:
        x = F.dropout(x, p=self.drop_rate, training=self.training)
    if pre_logits:
        return x
    return self.classifier(x)


def _space_to_depth(block: nn.Module) -> tuple[str, ...]:
    """The optional space-to-depth conv + BN that timm's blocks run first."""
    return ("conv_s2d", "bn_s2d") if block.conv_s2d is not None else ()


_BLOCKS = "timm.models._efficientnet_blocks."
KNOWN_BLOCKS = {
    _BLOCKS + "DepthwiseSeparableConv": KnownBlock(
        lambda b: (*_space_to_depth(b), "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2"),
        "forward",
        _residual_forward,
    ),
    _BLOCKS + "InvertedResidual": KnownBlock(
        lambda b: (
            *_space_to_depth(b),
            *("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3"),
        ),
        "forward",
        _residual_forward,
    ),
    _BLOCKS + "ConvBnAct": KnownBlock(
        lambda b: ("conv", "bn1", "aa"), "forward", _residual_forward
    ),
    _BLOCKS + "EdgeResidual": KnownBlock(
        lambda b: ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2"), "forward", _residual_forward
    ),
    # Its `aa` may be None (no module): forward skips it then.
    "timm.layers.conv_bn_act.ConvNormAct": KnownBlock(
        lambda b: ("conv", "bn") if getattr(b, "aa", None) is None else ("conv", "bn", "aa"),
        "forward",
        _sequence_forward,
    ),
    # The reference depthwise-separable block: its two halves, one after the other.
    "mobilenet.reference.DepSepConv": KnownBlock(
        lambda b: ("depthwise", "pointwise"), "forward", _sequence_forward
    ),
    "timm.models.efficientnet.EfficientNet": KnownBlock(
        lambda m: ("conv_stem", "bn1", "blocks", "conv_head", "bn2"),
        "forward_features",
        _efficientnet_forward_features,
    ),
    "timm.models.mobilenetv3.MobileNetV3": KnownBlock(
        lambda m: ("global_pool", "conv_head", "norm_head", "act2", "flatten"),
        "forward_head",
        _mobilenetv3_forward_head,
    ),
}


def known_block(module: nn.Module) -> KnownBlock | None:
    """The entry of module's exact class, None for a class convert() does not know."""
    return KNOWN_BLOCKS.get(qualified_name(type(module)))


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """The fused class of a known block class (made once per class)."""
    fused = _FUSED_CLASSES.get(cls)
    if fused is None:
        known = KNOWN_BLOCKS[qualified_name(cls)]
        namespace = {
            known.method: known.fused,
            "known_block": known,
            "original_class": cls,
            "__reduce_ex__": _reduce_ex,
            "__module__": __name__,
        }
        fused = _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedRuns, cls), namespace)
    return fused


def _new_fused(cls: type) -> nn.Module:
    """An empty instance of cls's fused class, for pickle and deepcopy to fill in."""
    fused = fused_class(cls)
    return fused.__new__(fused)


def _reduce_ex(self, protocol):
    # The fused class is made at run time: pickles name the original, importable class.
    return _new_fused, (self.original_class,), self.__dict__
