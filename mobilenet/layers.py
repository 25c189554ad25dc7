"""The drop-in fast layers: Conv2d-BatchNorm-activation runs computed by the fused ops, a bare
depthwise convolution, and the depthwise-separable block of SPEC §3.

The fused layers own the very nn.Conv2d / nn.BatchNorm2d / activation modules they replace, under
the same child names, and read every setting from them at each call (stride, padding, momentum,
eps, affine, track_running_stats, training flag, the activation's type). So state_dicts,
parameter initialisation, `.to()`/`.half()`/`.train()`, optimizers and later edits such as
`block.depthwise[1].momentum = None` behave exactly as with the plain modules. Whenever a run
stops being computable by a fused op (a child replaced by something else, a hook registered on
one), the layer runs its children one after another, as nn.Sequential does.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

import kernels
from kernels import reference
from kernels._common import activation_op_name

from ._sync_batch_norm import sync_batch_norm

# Exact types: subclasses (timm's BatchNormAct2d, Conv2dSame, ...) change what forward computes.
FUSABLE_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
_ACTIVATION_NAMES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: None}


def conv_kind(conv: nn.Module) -> str | None:
    """Which fused op computes `conv`: "pointwise" for a 1x1 nn.Conv2d (groups 1, stride 1, no
    padding), "depthwise" for an nn.Conv2d with groups == in_channels == out_channels, None for
    anything else. Bias is not considered here."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return None
    if conv.groups == conv.in_channels == conv.out_channels:
        return "depthwise"
    if (
        conv.groups == 1
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid", "same")  # a 1x1 kernel pads nothing for "same"
    ):
        return "pointwise"
    return None


def fusable_activation(module: nn.Module) -> bool:
    """Whether the fused ops can apply `module`: ReLU, ReLU6 (or Hardtanh(0, 6)), Identity."""
    return type(module) in _ACTIVATION_NAMES or (
        type(module) is nn.Hardtanh and module.min_val == 0.0 and module.max_val == 6.0
    )


def _activation_name(module: nn.Module | None) -> str | None:
    """The fused ops' `activation` for a fusable activation module (None: no activation)."""
    if module is None:
        return None
    return _ACTIVATION_NAMES.get(type(module), "relu6")


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def fusable_run(conv: nn.Module, bn: nn.Module, act: nn.Module | None = None) -> bool:
    """Whether conv -> bn -> act (act None: no activation) is computed exactly by one fused op.

    A conv bias is not folded into the BatchNorm: such runs (rare, the bias is redundant before
    BN) stay unfused. Modules with hooks stay unfused too, so that their hooks keep firing.
    """
    modules = (conv, bn) if act is None else (conv, bn, act)
    return (
        conv_kind(conv) is not None
        and conv.bias is None
        and type(bn) in FUSABLE_BATCH_NORMS
        and (act is None or fusable_activation(act))
        and not any(_has_hooks(m) for m in modules)
    )


def _sync_process_group(bn: nn.Module, sync_bn: bool):
    """The process group to all-reduce `bn`'s batch statistics over, or None when they stay
    local. As nn.SyncBatchNorm decides: in training mode only, under an initialised process group
    of more than one process; the group is an nn.SyncBatchNorm's own, else (sync_bn) the default
    one."""
    if not ((sync_bn or isinstance(bn, nn.SyncBatchNorm)) and bn.training):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(bn, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def conv_bn_act(
    input: Tensor,
    conv: nn.Conv2d,
    bn: nn.Module,
    act: nn.Module | None = None,
    *,
    backend: str | None = None,
    sync_bn: bool = False,
) -> Tensor:
    """act(bn(conv(input))) for a fusable run, exactly as the modules compute it, by one fused
    op: BatchNorm's choice between batch and running statistics, its running-statistics update,
    num_batches_tracked and momentum (None: cumulative average) follow nn.BatchNorm2d.forward.

    With `sync_bn`, or when bn is an nn.SyncBatchNorm, training under torch.distributed takes
    the batch statistics over every process of the group, as nn.SyncBatchNorm does: the conv,
    then a synchronised BatchNorm, then the activation (three steps: the fused ops see one
    process's batch only)."""
    activation = _activation_name(act)
    # nn.BatchNorm2d.forward: batch statistics when training or when there are no running ones.
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if keep_running else None
    running_var = bn.running_var if keep_running else None
    counted = bn.num_batches_tracked if bn.training and bn.track_running_stats else None
    kind = conv_kind(conv)

    group = _sync_process_group(bn, sync_bn)
    if group is not None:
        if kind == "pointwise":
            y = torch.nn.functional.conv2d(input, conv.weight)
        else:
            y = kernels.depthwise_conv2d(
                input, conv.weight, None, conv.stride, conv.padding, conv.dilation, backend=backend
            )
        y = sync_batch_norm(
            y,
            running_mean,
            running_var,
            bn.weight,
            bn.bias,
            momentum=bn.momentum,
            eps=bn.eps,
            num_batches_tracked=counted,
            process_group=group,
        )
        return reference.apply_activation(y, activation_op_name(activation))

    options = dict(
        training=bn_training,
        momentum=bn.momentum,
        eps=bn.eps,
        activation=activation,
        backend=backend,
        num_batches_tracked=counted,
    )
    stats = (running_mean, running_var, bn.weight, bn.bias)
    if kind == "pointwise":
        return kernels.pointwise_bn_act(input, conv.weight, *stats, **options)
    return kernels.depthwise_bn_act(
        input,
        conv.weight,
        *stats,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        **options,
    )


def find_runs(sequential: nn.Sequential, filter_fn=None, prefix: str = "") -> dict:
    """The fusable Conv2d-BN(-activation) runs among `sequential`'s children, as {conv's child
    name: child names of the run}. `filter_fn(conv, prefix + child_name)` may turn runs down."""
    items = list(sequential._modules.items())
    runs = {}
    i = 0
    while i + 1 < len(items):
        (conv_name, conv), (bn_name, bn) = items[i], items[i + 1]
        if fusable_run(conv, bn) and (filter_fn is None or filter_fn(conv, prefix + conv_name)):
            run = (conv_name, bn_name)
            if i + 2 < len(items) and fusable_run(conv, bn, items[i + 2][1]):
                run += (items[i + 2][0],)
            runs[conv_name] = run
            i += len(run)
        else:
            i += 1
    return runs


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose Conv2d-BN-activation runs are computed by the fused ops.

    `fused_runs` maps the child name of each run's conv to the child names of the run (conv, BN
    and, when the activation is fused too, the activation). All children stay registered under
    their names; everything else runs as in nn.Sequential. `backend` is the fused ops' backend
    (None: auto). `sync_bn` makes training under torch.distributed take batch statistics over
    all processes, like nn.SyncBatchNorm (which is honoured without it).
    """

    def __init__(self, *args, backend: str | None = None, sync_bn: bool = False):
        super().__init__(*args)
        self.backend = backend
        self.sync_bn = sync_bn
        self.fused_runs = find_runs(self)

    def forward(self, input: Tensor) -> Tensor:
        items = list(self._modules.items())
        i = 0
        while i < len(items):
            run = self.fused_runs.get(items[i][0], ())
            names = tuple(name for name, _ in items[i : i + len(run)])
            modules = [module for _, module in items[i : i + len(run)]]
            # The run as planned, still in place and still fusable: children may have changed.
            if run and names == run and fusable_run(*modules):
                input = conv_bn_act(input, *modules, backend=self.backend, sync_bn=self.sync_bn)
                i += len(run)
            else:
                input = items[i][1](input)
                i += 1
        return input


class ConvBNAct(FusedSequential):
    """Conv2d -> BatchNorm2d -> activation as one fused op: children `0`, `1` and `2` (no `2`
    when act is None), like nn.Sequential(conv, bn, act).

    conv is a 1x1 (groups 1, stride 1, no padding) or depthwise (groups == in == out channels)
    nn.Conv2d without bias; bn an nn.BatchNorm2d or nn.SyncBatchNorm; act nn.ReLU, nn.ReLU6,
    nn.Identity or None. `backend` and `sync_bn` as in FusedSequential.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: nn.Module | None = None,
        *,
        backend: str | None = None,
        sync_bn: bool = False,
    ):
        if not fusable_run(conv, bn, act):
            raise ValueError(
                "ConvBNAct: expected a 1x1 or depthwise nn.Conv2d without bias and without "
                "hooks, an nn.BatchNorm2d or nn.SyncBatchNorm, and nn.ReLU, nn.ReLU6, "
                f"nn.Identity or None; got {conv!r}, {bn!r}, {act!r}"
            )
        modules = (m for m in (conv, bn, act) if m is not None)
        super().__init__(*modules, backend=backend, sync_bn=sync_bn)


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d(channels, channels, kernel_size, ..., groups=channels) computed by
    kernels.depthwise_conv2d: same parameters, state_dict and results (zero padding only)."""

    def __init__(
        self,
        channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        *,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups=channels,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return kernels.depthwise_conv2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            backend=self.backend,
        )


class DepSepConv(nn.Module):
    """The reference block of SPEC §3 (mobilenet.reference.DepSepConv) with the fused ops:
    `depthwise` (3x3 depthwise conv + BN + ReLU) then `pointwise` (1x1 conv + BN + ReLU), each a
    ConvBNAct. Same constructor, submodules, state_dict keys and parameter initialisation (the
    modules are created in the reference's order) as the reference block."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, backend: str | None = None
    ):
        super().__init__()
        self.depthwise = ConvBNAct(
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
            backend=backend,
        )
        self.pointwise = ConvBNAct(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            backend=backend,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))
