"""The drop-in fast layers: Conv2d-BatchNorm-activation runs computed by the fused ops, a bare
depthwise convolution, and the fused form of the reference depthwise-separable block.

The fused layers own the very nn.Conv2d / BatchNorm / activation modules they replace, under the
same child names, and read every setting from them at each call (stride, padding, momentum, eps,
affine, track_running_stats, training flag, the activation's type). So state_dicts, parameter
initialisation, `.to()`/`.half()`/`.train()`, optimizers and later edits such as
`block.depthwise[1].momentum = None` behave exactly as with the plain modules. Whenever a run
stops being computable by a fused op (a child replaced by something else, a hook registered on
one), the layer runs its children one after another, as nn.Sequential does.
"""

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from kernels.reference import apply_activation

from . import reference
from ._sync_batch_norm import sync_batch_norm

# The activation modules the fused ops apply, by exact type (a subclass may compute something
# else), and the ops' name of each. nn.Hardtanh(0, 6) is ReLU6 too (activation_op).
_ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Identity: "none",
}
# BatchNorm modules whose forward is nn.BatchNorm2d's, by exact type (timm's BatchNormAct2d is
# recognised apart, see is_timm_batch_norm_act).
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# timm's BatchNorm2d + dropout + activation in one module, an nn.BatchNorm2d subclass whose
# forward is nn.BatchNorm2d's followed by its `drop` and `act` children. Known by its module and
# qualified name, so that nothing here imports timm.
_TIMM_BATCH_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")


def qualified_name(cls: type) -> str:
    """`module.QualName` of a class: how convert() knows classes of packages it never imports."""
    return f"{cls.__module__}.{cls.__qualname__}"


def activation_op(module: nn.Module | None) -> str | None:
    """The fused ops' name of what the activation `module` computes: "relu", "relu6", "silu",
    "hardswish", or "none" for None and nn.Identity; None when the fused ops cannot apply it."""
    if module is None:
        return "none"
    if type(module) is nn.Hardtanh and module.min_val == 0.0 and module.max_val == 6.0:
        return "relu6"
    return _ACTIVATIONS.get(type(module))


def is_timm_batch_norm_act(module: nn.Module) -> bool:
    """Whether module's class is timm's BatchNormAct2d (not a subclass)."""
    cls = type(module)
    return (cls.__module__, cls.__qualname__) == _TIMM_BATCH_NORM_ACT


def norm_activation(bn: nn.Module) -> nn.Module | None:
    """The activation a BatchNorm module applies itself (timm's BatchNormAct2d: its `act`)."""
    return bn._modules.get("act") if is_timm_batch_norm_act(bn) else None


def fusable_norm(bn: nn.Module) -> bool:
    """Whether `bn` computes what the fused ops' BatchNorm does: an nn.BatchNorm2d or
    nn.SyncBatchNorm, or timm's BatchNormAct2d whose `drop` is nn.Identity and whose `act` the
    fused ops apply."""
    if type(bn) in _BATCH_NORMS:
        return True
    return (
        is_timm_batch_norm_act(bn)
        and type(bn._modules.get("drop")) is nn.Identity
        and "act" in bn._modules
        and activation_op(bn.act) is not None
    )


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


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def fusable_run(conv: nn.Module, bn: nn.Module, act: nn.Module | None = None) -> bool:
    """Whether conv -> bn -> act (act None: no activation module after bn) is computed exactly
    by one fused op. A BatchNormAct2d applies its own activation, so no act may follow it.

    A conv bias is not folded into the BatchNorm: such runs (rare, the bias is redundant before
    BN) stay unfused. Modules with hooks stay unfused too, so that their hooks keep firing (for a
    BatchNormAct2d, its `drop` and `act` too).
    """
    if conv_kind(conv) is None or conv.bias is not None or not fusable_norm(bn):
        return False
    own = norm_activation(bn)
    if act is not None and (own is not None or activation_op(act) is None):
        return False
    hooked = _has_hooks(conv) or _has_hooks(bn) or (act is not None and _has_hooks(act))
    return not hooked and (own is None or not (_has_hooks(own) or _has_hooks(bn.drop)))


def batch_norm_arguments(bn: nn.Module) -> dict:
    """The fused ops' BatchNorm arguments for `bn` as nn.BatchNorm2d.forward decides them, read
    from bn at this call: running_mean, running_var, bn_weight, bn_bias, training, momentum, eps
    and num_batches_tracked, by those names.

    Batch statistics when training or when there are no running ones; the running statistics
    are updated only when training with track_running_stats, and only then is
    num_batches_tracked counted (momentum=None, a cumulative average, divides by it)."""
    training, track = bn.training, bn.track_running_stats
    # Straight from the module's dicts, as nn.Module.__getattr__ finds them (bn is of an exact
    # BatchNorm type, fusable_norm): each __getattr__ costs a call on every layer's forward.
    buffers, parameters = bn._buffers, bn._parameters
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    keep_running = not training or track
    return dict(
        running_mean=running_mean if keep_running else None,
        running_var=running_var if keep_running else None,
        bn_weight=parameters.get("weight"),
        bn_bias=parameters.get("bias"),
        training=training or (running_mean is None and running_var is None),
        momentum=bn.momentum,
        eps=bn.eps,
        num_batches_tracked=buffers.get("num_batches_tracked") if training and track else None,
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


def _activation_of(bn: nn.Module, act: nn.Module | None = None) -> str:
    """The fused ops' activation of a run: act's or, for timm's BatchNormAct2d, bn's own."""
    return activation_op(act if act is not None else norm_activation(bn))


def fused_stage(conv: nn.Conv2d, bn: nn.Module, act: nn.Module | None = None) -> kernels.BnActStage:
    """The arguments of the fused op that computes the run conv -> bn -> act, read from the
    modules at this call (BatchNorm's as batch_norm_arguments reads them)."""
    activation = _activation_of(bn, act)
    depthwise = conv_kind(conv) == "depthwise"
    return kernels.BnActStage(
        conv.weight,
        **batch_norm_arguments(bn),
        depthwise=depthwise,
        stride=conv.stride if depthwise else 1,
        padding=conv.padding if depthwise else 0,
        dilation=conv.dilation if depthwise else 1,
        activation=None if activation == "none" else activation,
    )


def run_fused(
    input: Tensor,
    conv: nn.Conv2d,
    bn: nn.Module,
    act: nn.Module | None = None,
    *,
    backend: str | None = None,
    sync_bn: bool = False,
) -> Tensor:
    """act(bn(conv(input))) of a fusable run (see fusable_run) by one fused op, exactly as the
    modules compute it (fused_stage).

    With `sync_bn`, or when bn is an nn.SyncBatchNorm, training under torch.distributed takes
    the batch statistics over every process of the group, as nn.SyncBatchNorm does: the conv,
    then a synchronised BatchNorm, then the activation (three steps: the fused ops see one
    process's batch only)."""
    group = _sync_process_group(bn, sync_bn)
    if group is not None:  # training, so batch statistics
        bn_args = batch_norm_arguments(bn)
        del bn_args["training"]
        if conv_kind(conv) == "pointwise":
            y = F.conv2d(input, conv.weight)
        else:
            y = kernels.depthwise_conv2d(
                input, conv.weight, None, conv.stride, conv.padding, conv.dilation, backend=backend
            )
        y = sync_batch_norm(y, **bn_args, process_group=group)
        return apply_activation(y, _activation_of(bn, act))

    stage = fused_stage(conv, bn, act)
    fn = kernels.depthwise_bn_act if stage.depthwise else kernels.pointwise_bn_act
    geometry = (
        dict(stride=stage.stride, padding=stage.padding, dilation=stage.dilation)
        if stage.depthwise
        else {}
    )
    return fn(
        input,
        stage.weight,
        stage.running_mean,
        stage.running_var,
        stage.bn_weight,
        stage.bn_bias,
        training=stage.training,
        momentum=stage.momentum,
        eps=stage.eps,
        activation=stage.activation,
        backend=backend,
        num_batches_tracked=stage.num_batches_tracked,
        **geometry,
    )


def recomputable_run(conv: nn.Module, bn: nn.Module, act: nn.Module | None) -> bool:
    """Whether run_recomputed computes conv -> bn -> act exactly: any plain nn.Conv2d with zero
    padding, an nn.BatchNorm2d, an activation the fused ops know, no hooks."""
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and type(bn) is nn.BatchNorm2d
        and activation_op(act) is not None
        and not any(_has_hooks(m) for m in (conv, bn, act) if m is not None)
    )


def _run_ops(spec, autocast, input, weight, bias, bn_weight, bn_bias, running_mean, running_var):
    """The run by PyTorch's ops as a recomputation computes it: the batch's statistics in
    training (running_mean and running_var None), the running ones in eval, never updated, under
    the forward's autocast state; the same values in the same order as the forward's."""
    conv_args, training, _, eps, activation = spec
    device_type, enabled, dtype = autocast
    with torch.autocast(device_type, dtype, enabled=enabled):
        y = F.conv2d(input, weight, bias, *conv_args)
        y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, 0.0, eps)
        return apply_activation(y, activation)


class _RecomputedRun(torch.autograd.Function):
    """conv -> BatchNorm -> activation by PyTorch's ops, keeping only the input (and the
    parameters) for backward: the backward computes the run again (_run_ops) and differentiates
    that. For runs no fused op computes: a network's stem (a full convolution) would otherwise
    keep its convolution and BatchNorm outputs."""

    @staticmethod
    def forward(ctx, spec, autocast, input, weight, bias, bn_weight, bn_bias, rm, rv, nbt):
        conv_args, training, momentum, eps, activation = spec
        ctx.spec, ctx.autocast = spec, autocast
        y = F.conv2d(input, weight, bias, *conv_args)
        out = kernels.reference.bn_act(
            y, rm, rv, bn_weight, bn_bias, nbt, training, momentum, eps, activation
        )
        stats = (None, None) if training else (rm, rv)
        ctx.save_for_backward(input, weight, bias, bn_weight, bn_bias, *stats)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, bn_weight, bn_bias, running_mean, running_var = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:7]
        leaves = [
            None if t is None else t.detach().requires_grad_(need)
            for t, need in zip((input, weight, bias, bn_weight, bn_bias), needs)
        ]
        with torch.enable_grad():
            out = _run_ops(ctx.spec, ctx.autocast, *leaves, running_mean, running_var)
        wanted = [t for t, need in zip(leaves, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad_output))
        return (None, None, *(next(grads) if need else None for need in needs), None, None, None)


class _RunAgain:
    """Computes a recomputed run's output again without autograd (_run_ops), for a chain that
    takes the run's output as its input and so need not keep it. Refuses, as autograd would,
    when a tensor it reads was modified in place since the forward."""

    def __init__(self, spec, autocast, tensors):
        self.spec, self.autocast, self.tensors = spec, autocast, tensors
        self.versions = [None if t is None else t._version for t in tensors]

    def __call__(self) -> Tensor:
        for t, version in zip(self.tensors, self.versions):
            if t is not None and t._version != version:
                raise RuntimeError(
                    "run_recomputed: a tensor of the run (its input, a parameter or a running "
                    "statistic) was modified in place between the forward and the backward"
                )
        with torch.no_grad():
            return _run_ops(self.spec, self.autocast, *self.tensors)


def run_recomputed(
    input: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module
) -> tuple[Tensor, _RunAgain]:
    """act(bn(conv(input))) of a recomputable run (see recomputable_run), as the modules compute
    it, keeping only the input for backward (_RecomputedRun); with a callable that computes the
    output again, bit for bit, for a chain that reads it (kernels.bn_act_chain's
    recompute_input)."""
    args = batch_norm_arguments(bn)
    training = args["training"]
    spec = (
        (conv.stride, conv.padding, conv.dilation, conv.groups),
        training,
        args["momentum"],
        args["eps"],
        activation_op(act),
    )
    device_type = input.device.type
    autocast = (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
    tensors = (input, conv.weight, conv.bias, args["bn_weight"], args["bn_bias"])
    stats = (args["running_mean"], args["running_var"])
    out = _RecomputedRun.apply(spec, autocast, *tensors, *stats, args["num_batches_tracked"])
    # In training the recomputation normalises by the batch's statistics: the running ones, just
    # updated, are not read.
    again = _RunAgain(spec, autocast, (*tensors, *((None, None) if training else stats)))
    return out, again


def check_recompute(recompute, owner: str) -> str | None:
    if recompute not in RECOMPUTE:
        raise ValueError(f"{owner}: recompute must be one of {RECOMPUTE}, got {recompute!r}")
    return recompute


def find_runs(owner: nn.Module, names: Sequence[str], filter_fn=None, prefix: str = "") -> dict:
    """The fusable Conv2d-BN(-activation) runs among `owner`'s children `names`, which owner's
    forward calls in this order, each on the output of the one before and on nothing else: as
    {conv's child name: child names of the run}. `filter_fn(conv, prefix + child_name)` may turn
    runs down."""
    items = [(name, owner._modules[name]) for name in names]
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


RECOMPUTE = (*kernels.functional.RECOMPUTE, None)


class FusedRuns:
    """Mixin of the modules whose forward computes Conv2d-BN-activation runs among their
    children by the fused ops: FusedSequential, DepSepConv and the fused classes convert()
    gives the blocks it knows (mobilenet/blocks.py). `forward_runs` is the one place where runs
    are computed.

    fused_runs maps the child name of each run's conv to the child names of the run (conv, BN
    and, when the activation is a child of its own, the activation), as find_runs plans them.
    `backend` is the fused ops' backend (None: auto). `sync_bn` makes training under
    torch.distributed take batch statistics over all processes, like nn.SyncBatchNorm (which is
    honoured without it). Runs that follow each other (those of fused children that are nothing
    but runs too, such as the Conv2dNormActivations of an inverted residual) form a chain, one
    autograd unit that keeps less for backward: `recompute` is kernels.bn_act_chain's policy
    ("depthwise": the depthwise stages' outputs are recomputed in backward; "all": every
    stage's), None for no chains.
    """

    fused_runs: dict[str, tuple[str, ...]]
    backend: str | None
    sync_bn: bool
    recompute: str | None = "depthwise"

    def forward_runs(
        self,
        names: Sequence[str],
        input: Tensor,
        recompute_input: Callable[[], Tensor] | None = None,
    ) -> Tensor:
        """Calls the children `names` one after another, each on the output of the one before,
        computing each planned run by a fused op while it is still in place and fusable
        (children may have been replaced, or hooks registered, since it was planned), and
        consecutive runs as one chain. recompute_input (see kernels.bn_act_chain) goes to a
        chain that starts with the first child, which then does not keep `input`."""
        modules = self._modules
        pending = []  # consecutive runs, (conv, bn[, act]) each, not computed yet
        i = 0
        while i < len(names):
            run = self.fused_runs.get(names[i], ())
            if run and tuple(names[i : i + len(run)]) == run:
                members = tuple(modules[name] for name in run)
                if fusable_run(*members):
                    pending.append(members)
                    i += len(run)
                    continue
            child = modules[names[i]]
            i += 1
            if type(child) is nn.Identity and not _has_hooks(child):
                continue  # computes nothing: the runs on either side still follow each other
            nested = self._chainable_runs(child)
            if nested is not None:
                pending += nested
                continue
            input = self._compute(pending, input, recompute_input)
            pending, recompute_input = [], None
            input = child(input)
        return self._compute(pending, input, recompute_input)

    def _chainable_runs(self, child: nn.Module) -> list[tuple] | None:
        """The runs of a child that computes nothing but fusable runs (a FusedSequential of the
        same settings, without hooks), which may join this module's chain; else None."""
        if not (
            isinstance(child, FusedSequential)
            and not _has_hooks(child)
            and (child.backend, child.sync_bn, child.recompute)
            == (self.backend, self.sync_bn, self.recompute)
        ):
            return None
        runs, modules, names = [], child._modules, tuple(child._modules)
        i = 0
        while i < len(names):
            run = child.fused_runs.get(names[i], ())
            members = tuple(modules[name] for name in run)
            if not (run and tuple(names[i : i + len(run)]) == run and fusable_run(*members)):
                return None
            runs.append(members)
            i += len(run)
        return runs

    def _compute(self, runs: list[tuple], input: Tensor, recompute_input=None) -> Tensor:
        """The runs one after another: as one chain when there are several and every run can
        join one (which takes recompute_input), else each by its own fused op."""
        chainable = (
            len(runs) > 1
            and self.recompute is not None
            and all(_sync_process_group(members[1], self.sync_bn) is None for members in runs)
        )
        if not chainable:
            for members in runs:
                input = run_fused(input, *members, backend=self.backend, sync_bn=self.sync_bn)
            return input
        stages = [fused_stage(*members) for members in runs]
        return kernels.bn_act_chain(
            input,
            stages,
            recompute=self.recompute,
            backend=self.backend,
            recompute_input=recompute_input,
        )


class FusedSequential(FusedRuns, nn.Sequential):
    """An nn.Sequential whose Conv2d-BN-activation runs are computed by the fused ops.

    All children stay registered under their names; everything else runs as in nn.Sequential.
    `fused_runs`, `backend` and `sync_bn` as in FusedRuns.
    """

    def __init__(
        self,
        *args,
        backend: str | None = None,
        sync_bn: bool = False,
        recompute: str | None = "depthwise",
    ):
        super().__init__(*args)
        self.backend = backend
        self.sync_bn = sync_bn
        self.recompute = check_recompute(recompute, "FusedSequential")
        self.fused_runs = find_runs(self, tuple(self._modules))

    def forward(self, input: Tensor) -> Tensor:
        return self.forward_runs(tuple(self._modules), input)


def _type_names(types) -> str:
    return ", ".join(f"nn.{t.__name__}" for t in types)


class ConvBNAct(FusedSequential):
    """Conv2d -> BatchNorm -> activation as one fused op: children `0`, `1` and `2` (no `2`
    when act is None), like nn.Sequential(conv, bn, act).

    conv is a 1x1 (groups 1, stride 1, no padding) or depthwise (groups == in == out channels)
    nn.Conv2d without bias; bn an nn.BatchNorm2d, nn.SyncBatchNorm or timm's BatchNormAct2d
    (which brings its activation: act None); act one of the activation modules the fused ops
    apply (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Identity) or None. `backend` and
    `sync_bn` as in FusedSequential.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.Module,
        act: nn.Module | None = None,
        *,
        backend: str | None = None,
        sync_bn: bool = False,
        recompute: str | None = "depthwise",
    ):
        if not fusable_run(conv, bn, act):
            raise ValueError(
                "ConvBNAct: expected a 1x1 or depthwise nn.Conv2d without bias and without "
                f"hooks; as bn an {_type_names(_BATCH_NORMS)} with act one of "
                f"{_type_names(_ACTIVATIONS)} or None, or a timm BatchNormAct2d whose own act is "
                f"one of those, with act None; got {conv!r}, {bn!r}, {act!r}"
            )
        modules = (m for m in (conv, bn, act) if m is not None)
        super().__init__(*modules, backend=backend, sync_bn=sync_bn, recompute=recompute)


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


class DepSepConv(FusedRuns, reference.DepSepConv):
    """The reference depthwise-separable block (mobilenet.reference.DepSepConv: 3x3 depthwise
    conv + BN + ReLU, then 1x1 conv + BN + ReLU) with each half computed by one fused op, the
    two as one chain in training (`recompute` as in FusedRuns: by default the block keeps only
    its input for backward) and, in eval, as one pass where the backend has it.

    Built as the reference block, then each half (an nn.Sequential of conv, BN and ReLU) becomes
    a ConvBNAct of the very same modules: same constructor, submodules, state_dict keys and
    parameter initialisation as the reference."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        backend: str | None = None,
        recompute: str | None = "depthwise",
    ):
        super().__init__(in_channels, out_channels, stride)
        self.backend = backend
        self.sync_bn = False
        self.recompute = check_recompute(recompute, "DepSepConv")
        self.fused_runs = {}
        self.depthwise = ConvBNAct(*self.depthwise, backend=backend, recompute=self.recompute)
        self.pointwise = ConvBNAct(*self.pointwise, backend=backend, recompute=self.recompute)

    def forward(self, x: Tensor, recompute_input: Callable[[], Tensor] | None = None) -> Tensor:
        """recompute_input: see kernels.bn_act_chain (used by the chain of the two halves)."""
        return self.forward_runs(("depthwise", "pointwise"), x, recompute_input)
