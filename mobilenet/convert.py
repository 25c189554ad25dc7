"""convert() swaps the fast layers into any model; revert() takes them out again.

Conversion changes the class of existing module objects in place (as torch.nn.utils.parametrize
does), never the module tree: every module keeps its identity, its children, parameters,
buffers, hooks, training flag and other attributes, so state_dict keys, dtype, device,
requires_grad and optimizers holding the parameters are all untouched. Each converted module
records its original class and attributes, which is what revert() restores.

What is fused: Conv2d -> BatchNorm [-> activation] runs, where the conv is a 1x1 nn.Conv2d
(groups 1, stride 1, no padding) or a depthwise one (groups == in == out channels, any kernel,
stride, padding, dilation), zero padding mode, no bias; the BatchNorm an nn.BatchNorm2d or
nn.SyncBatchNorm followed by an activation module the fused ops apply (nn.ReLU, nn.ReLU6 or
nn.Hardtanh(0, 6), nn.SiLU, nn.Hardswish, nn.Identity; any other, GELU say, is not fused: the run
ends at the BN), or timm's BatchNormAct2d whose `drop` is nn.Identity and whose `act` is one of
those. Such runs are found
- among the children of an nn.Sequential (or a subclass that keeps nn.Sequential.forward, such
  as torchvision's Conv2dNormActivation), which becomes a FusedSequential (a ConvBNAct when the
  run is all it holds);
- among the attributes of a block whose forward convert() knows (mobilenet/blocks.py: timm's
  DepthwiseSeparableConv, InvertedResidual, ConvBnAct, EdgeResidual, ConvNormAct, and the
  stem and head of its EfficientNet and MobileNetV3 models), which gets a fused class derived
  from its own.
Every other depthwise nn.Conv2d (bias allowed) becomes a DepthwiseConv2d.

What is left alone, because it cannot be swapped without changing results:
- modules used through attributes by a forward convert() does not know (e.g.
  `self.bn(self.conv(x))` in a model of your own): only the ordered children of an
  nn.Sequential, and the children a known block calls in order, are known to feed each other
  and nothing else, so a conv whose output is also used elsewhere (a residual) is never fused
  with its BN;
- Sequential subclasses with their own forward, subclasses of known blocks, subclasses of
  Conv2d / BatchNorm2d other than BatchNormAct2d (timm's Conv2dSame, ...), grouped convs that are
  not depthwise, depth multipliers > 1, non-zero padding modes, convs with a bias followed by BN
  (the bias would have to be folded into the running mean: those convs are converted only if
  depthwise, as bare DepthwiseConv2d), and runs with a hooked module (the hooks would not fire
  inside a fused op; a DepthwiseConv2d keeps its hooks firing, so a hooked bare depthwise conv
  is converted).
A BatchNorm without running statistics (track_running_stats=False) is fused: the fused layers
use batch statistics in eval mode then, as nn.BatchNorm2d does.

So in the reference MobileNet every block's two halves fuse (the stem, a full 3x3 conv, stays);
in torchvision's MobileNetV2/V3 and EfficientNet every Conv2dNormActivation but the stem's and
every projection conv + BN fuse; in timm's MobileNet V1/V2/V3, MNASNet and EfficientNet every
conv + BatchNormAct2d of the blocks and of the EfficientNet head fuse. The squeeze-excite convs
(with a bias, no BN) and the stems stay as they are.
"""

import copy

from torch import nn

import kernels

from .blocks import fused_class, known_block
from .layers import (
    ConvBNAct,
    DepthwiseConv2d,
    FusedRuns,
    FusedSequential,
    check_recompute,
    conv_kind,
    find_runs,
    is_timm_batch_norm_act,
)

# On a converted module: (its original class, the attributes conversion added, the previous
# values of those it changed).
_RESTORE = "_depsep_restore"


def _convert_module(module: nn.Module, cls: type, **attributes) -> None:
    """Gives `module` the class `cls` and `attributes`, recording what revert() restores. A
    module converted twice keeps its first record: that one holds the original."""
    original, added, previous = module.__dict__.get(_RESTORE, (type(module), set(), {}))
    for name, value in attributes.items():
        if name not in added and name not in previous:
            if name in module.__dict__:
                previous[name] = module.__dict__[name]
            else:
                added.add(name)
        module.__dict__[name] = value
    module.__dict__[_RESTORE] = (original, added, previous)
    module.__class__ = cls


def _runs_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def convert(
    model: nn.Module,
    *,
    backend: str | None = None,
    filter_fn=None,
    inplace: bool = True,
    sync_bn: bool = False,
    recompute: str | None = "depthwise",
) -> nn.Module:
    """Swaps the fast layers into `model` (see the module docstring for what is swapped and what
    is left alone) and returns it; outputs, gradients, running statistics and state_dict stay
    those of the original model.

    backend: the fused ops' backend ("torch", "native", "triton"; None: auto per call).
    filter_fn(conv, fqn) -> bool: called with the nn.Conv2d that would start each fused run or
        become a DepthwiseConv2d, and its qualified name in `model`; False leaves it alone.
    inplace: False converts a deep copy and leaves `model` as it was.
    sync_bn: SyncBatchNorm semantics. In training under an initialised process group of more
        than one process, every fused layer (those already in the model too) computes its batch
        statistics over all processes of the default group, on CPU (gloo) as on GPU; their BNs
        keep their class, because DistributedDataParallel refuses nn.SyncBatchNorm in CPU
        modules. Every BatchNorm2d left unfused becomes an nn.SyncBatchNorm (same state_dict,
        as nn.SyncBatchNorm.convert_sync_batchnorm does; torch runs it on GPUs only), and every
        timm BatchNormAct2d a timm SyncBatchNormAct, so that none silently keeps per-process
        statistics. Fused layers also honour an nn.SyncBatchNorm (with its process_group)
        however it got into the model.
    recompute: the fused layers' chain policy (FusedRuns): fused runs that follow each other
        (such as an inverted residual's expand, depthwise and project stages) run as one chain
        that keeps for backward only the chain input and, with "depthwise", its 1x1 stages'
        outputs; "all" keeps only the chain input; None runs every run by itself.
    Layers that are already fast (FusedSequential, fused blocks, DepthwiseConv2d) keep their
    backend.
    """
    if backend is not None and backend not in kernels.BACKENDS:
        raise ValueError(
            f"convert: backend must be one of {kernels.BACKENDS} or None, got {backend!r}"
        )
    check_recompute(recompute, "convert")
    if not inplace:
        model = copy.deepcopy(model)

    in_runs = set()  # ids of the convs that fused runs compute
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedRuns):
            in_runs.update(id(module._modules[run[0]]) for run in module.fused_runs.values())
            continue
        known = known_block(module)
        if not (_runs_sequential(module) or known):
            continue
        names = tuple(module._modules) if known is None else known.children(module)
        if not all(child in module._modules for child in names):
            continue  # not the known class's layout (another version of it?): left alone
        runs = find_runs(module, names, filter_fn, f"{name}." if name else "")
        # A known block is converted even without runs of its own: the runs of its fused
        # children then chain through it.
        if not runs and known is None:
            continue
        in_runs.update(id(module._modules[conv_name]) for conv_name in runs)
        if known is not None:
            cls = fused_class(type(module))
        elif len(runs) == 1 and next(iter(runs.values())) == names:
            cls = ConvBNAct
        else:
            cls = FusedSequential
        _convert_module(
            module, cls, backend=backend, sync_bn=False, fused_runs=runs, recompute=recompute
        )

    for name, module in model.named_modules():
        if (
            conv_kind(module) == "depthwise"
            and id(module) not in in_runs
            and (filter_fn is None or filter_fn(module, name))
        ):
            _convert_module(module, DepthwiseConv2d, backend=backend)

    if sync_bn:
        _synchronise_batch_norms(model)
    return model


def _synchronise_batch_norms(model: nn.Module) -> None:
    """convert(sync_bn=True)'s last step: every fused layer synchronises its BatchNorms; every
    BatchNorm left unfused gets the synchronised class of its kind (timm's SyncBatchNormAct for
    its BatchNormAct2d, timm being imported then anyway)."""
    fused_bns = set()
    for module in model.modules():
        if isinstance(module, FusedRuns):
            _convert_module(module, type(module), sync_bn=True)
            fused_bns.update(id(module._modules[run[1]]) for run in module.fused_runs.values())
    for module in model.modules():
        if id(module) in fused_bns:
            continue
        if type(module) is nn.BatchNorm2d:
            _convert_module(module, nn.SyncBatchNorm, process_group=None)
        elif is_timm_batch_norm_act(module):
            from timm.layers.norm_act import SyncBatchNormAct

            _convert_module(module, SyncBatchNormAct, process_group=None)


def revert(model: nn.Module) -> nn.Module:
    """Undoes convert() on `model` in place and returns it: every module it converted gets its
    original class and attributes back. Layers built fast (mobilenet.DepSepConv, MobileNet) are
    not conversions and stay fast (convert(sync_bn=True)'s change to them is undone)."""
    for module in model.modules():
        record = module.__dict__.pop(_RESTORE, None)
        if record is None:
            continue
        original, added, previous = record
        for name in added:
            del module.__dict__[name]
        module.__dict__.update(previous)
        module.__class__ = original
    return model
