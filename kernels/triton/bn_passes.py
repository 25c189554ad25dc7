"""The BatchNorm passes of the Triton fused ops (pointwise_fused.py, depthwise_fused.py): which
epilogue passes run over the convolution, storing its output y or recomputing it, and the
per-channel arithmetic between them (statistics, scale and shift, running statistics).

A fused op's convolution is a `FusedConv`: each launch recomputes y from the input and hands it
to one epilogue of bn_epilogue.py. Row blocks are fixed by the shape (never autotuned), partials
are written to [2, blocks, C] buffers and reduced here by torch in a fixed order (Chan's merge
for the statistics): no atomics, so a launch config gives bitwise-identical results run to run
(autotuning may pick another config in another process; DEPSEP_TRITON_AUTOTUNE=0 pins the
first).

Bytes moved, with x the input, y the convolution output (= out, grad_output, g_y in size):

- eval: one pass, x + y: read the input once, write the output once.
- training forward, two designs; the cheaper one runs (`_store_conv_output`):
  recompute: STATS pass reads x (writes only partials); APPLY pass recomputes y from x and
  writes out: 2x + y. store: STATS pass reads x and writes y; an elementwise pass turns y into
  out in place: x + 3y. Recompute wins when x < 2y (every MobileNet pointwise layer, stride-1
  depthwise); store wins for stride-2 depthwise (x = 4y) and, by FLOPs, for wide pointwise layers
  that are compute-bound (an extra GEMM costs more than 2y bytes).
- training backward: GRAD_STATS reads x and grad_out, GRAD reads them again and writes g_y
  (recompute: 2x + 3y), or GRAD_STATS also writes y and the elementwise pass reads y, grad_out
  and writes g_y in place (store: x + 5y); then the convolution's own input gradient (reads g_y,
  writes grad_in) and weight gradient (reads g_y and x). Eval without BN-parameter gradients
  skips GRAD_STATS: x + 2y for g_y.

Autograd (kernels/_ops.py) saves the input, the weights and the per-channel mean and variance:
y, z and the activation's derivative are recomputed here, never stored across the forward.
"""

import torch
import triton
from torch import Tensor

from .._common import conv_allows_tf32, memory_format, stats_dtype
from .bn_epilogue import APPLY, GRAD, GRAD_EVAL, GRAD_STATS, STATS, elementwise

# Flops per byte at which a pass turns compute-bound (H100/H200-class tensor-core peak over DRAM
# bandwidth; float32 without TF32 and float64 on CUDA cores): `_store_conv_output`'s cost model.
_RIDGE_TENSOR_CORE_16BIT = 200.0
_RIDGE_TF32 = 100.0
_RIDGE_CUDA_CORES = 15.0


def _store_conv_output(x_bytes: int, y_bytes: int, conv_flops: int, dtype: torch.dtype) -> bool:
    """Whether the training passes write the raw convolution y and read it back (store: x + 3y
    forward) rather than compute it twice (recompute: 2x + y forward). Recomputing costs a
    convolution pass, max(its bytes, its flops / ridge), against the 2y of storing."""
    if dtype in (torch.float16, torch.bfloat16):
        ridge = _RIDGE_TENSOR_CORE_16BIT
    elif dtype == torch.float32 and conv_allows_tf32():
        ridge = _RIDGE_TF32
    else:
        ridge = _RIDGE_CUDA_CORES
    return max(x_bytes, conv_flops / ridge) > 2 * y_bytes


class FusedConv:
    """A fused op's convolution of `input` with `weight`, computed in the input's memory format
    (the layout of every activation-sized tensor of the op), and its launches with an epilogue.

    Subclasses set out_shape and the row blocks of the partial sums (`num_img` images of `pixels`
    output pixels, in blocks of `block`: a function of the shape alone)."""

    out_shape: tuple[int, int, int, int]
    num_img: int
    pixels: int
    block: int

    def __init__(self, input: Tensor, weight: Tensor):
        self.fmt = memory_format(input)
        self.channels_last = self.fmt == torch.channels_last
        self.x = input.contiguous(memory_format=self.fmt)
        self.weight = weight

    @property
    def block_rows(self) -> int:
        return self.num_img * triton.cdiv(self.pixels, self.block)

    def block_counts(self, like: Tensor) -> Tensor:
        """The number of pixels in each row block, in `like`'s dtype and device."""
        starts = torch.arange(0, self.pixels, self.block, device=like.device, dtype=like.dtype)
        return (self.pixels - starts).clamp(max=self.block).repeat(self.num_img)

    def new_output(self) -> Tensor:
        x = self.x
        return torch.empty(self.out_shape, device=x.device, dtype=x.dtype, memory_format=self.fmt)

    def store_output(self) -> bool:
        """Whether the training passes store y (see _store_conv_output)."""
        size = self.x.element_size()
        y_numel = self.num_img * self.pixels * self.out_shape[1]
        return _store_conv_output(
            self.x.numel() * size, y_numel * size, self.conv_flops(), self.x.dtype
        )

    def conv_flops(self) -> int:
        raise NotImplementedError

    def run(self, epilogue, act="none", out=None, go=None, coef=None, partial=None, store_y=False):
        """Recomputes y and applies `epilogue` (tensors it does not use may be None)."""
        raise NotImplementedError

    def input_and_weight_grads(self, g_y: Tensor, need_input: bool, need_weight: bool):
        """(grad_input or None, grad_weight or None) of the convolution from g_y."""
        raise NotImplementedError

    def epilogue_pointers(self, out, go, coef, partial):
        # The input stands in for the tensors an epilogue does not touch (it is never written).
        return tuple(self.x if t is None else t for t in (out, go, coef, partial))


def scale_shift(mean, var, bn_weight, bn_bias, eps):
    """(invstd, scale, shift) of BN in the statistics' dtype: z = y * scale + shift."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if bn_weight is None else bn_weight.to(mean.dtype) * invstd
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(mean.dtype)
    return invstd, scale, shift


def _merge_stats(partial: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Chan's merge of per-block (mean, M2) [2, blocks, C] with per-block counts [blocks] into
    the mean and biased variance, in a fixed order."""
    block_mean, block_m2 = partial
    weights = counts[:, None]
    total = counts.sum()
    mean = (weights * block_mean).sum(0) / total
    m2 = block_m2.sum(0) + (weights * (block_mean - mean) ** 2).sum(0)
    return mean, m2 / total


def _update_running_stats(
    running_mean, running_var, num_batches_tracked, mean, var, count, momentum
):
    """The running-statistics step of a training call, on the device (no host synchronisation):
    num_batches_tracked counts the batch, then running = lerp(running, batch, factor) with the
    unbiased batch variance, factor = momentum, or 1 / num_batches_tracked when it is None."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None:
        return
    if momentum is None:
        factor = num_batches_tracked.reciprocal().to(running_mean.dtype)
    else:
        factor = momentum
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), factor)


def bn_act_fwd(
    conv: FusedConv,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    num_batches_tracked,
    training,
    momentum,
    eps,
    act,
):
    """(out, stats [2, C]: mean and biased variance) of the fused op: see the module docstring
    for the passes."""
    out = conv.new_output()
    acc_dtype = stats_dtype(out.dtype)
    store = training and conv.store_output()
    if training:
        partial = out.new_empty((2, conv.block_rows, out.shape[1]), dtype=acc_dtype)
        conv.run(STATS.value, out=out if store else None, partial=partial, store_y=store)
        stats = torch.stack(_merge_stats(partial, conv.block_counts(partial)))
        count = out.numel() // out.shape[1]
        _update_running_stats(
            running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum
        )
    else:
        stats = torch.stack([running_mean.to(acc_dtype), running_var.to(acc_dtype)])
    _, scale, shift = scale_shift(stats[0], stats[1], bn_weight, bn_bias, eps)
    coef = torch.stack([scale, shift])
    if store:
        elementwise(conv.channels_last, APPLY.value, out, coef, act)
    else:
        conv.run(APPLY.value, act, out=out, coef=coef)
    return out, stats


def bn_act_bwd(
    conv: FusedConv, grad_output, bn_weight, bn_bias, stats, training, eps, act, output_mask
):
    """(grad_input, grad_weight, grad_bn_weight, grad_bn_bias), empty [0] where output_mask
    says not wanted: see the module docstring for the passes."""
    need_input, need_weight, need_bn_weight, need_bn_bias = output_mask
    need_conv = need_input or need_weight
    acc_dtype = stats_dtype(grad_output.dtype)
    mean, var = stats.to(acc_dtype)
    invstd, scale, shift = scale_shift(mean, var, bn_weight, bn_bias, eps)
    coef = [scale, shift, invstd, mean]
    sums = g_y = None
    store = need_conv and conv.store_output()
    if need_bn_weight or need_bn_bias or (need_conv and training):
        partial = grad_output.new_empty((2, conv.block_rows, grad_output.shape[1]), dtype=acc_dtype)
        g_y = conv.new_output() if store else None  # y, then g_y in place
        conv.run(
            GRAD_STATS.value,
            act,
            out=g_y,
            go=grad_output,
            coef=torch.stack(coef),
            partial=partial,
            store_y=store,
        )
        sums = partial.sum(1)  # (sum g_z, sum g_z * xhat) per channel, in a fixed order
    grad_input = grad_weight = None
    if need_conv:
        if training:
            count = grad_output.numel() // max(grad_output.shape[1], 1)
            coef += [sums[0] / count, sums[1] / count]
        epilogue = GRAD.value if training else GRAD_EVAL.value
        if g_y is not None:
            elementwise(conv.channels_last, epilogue, g_y, torch.stack(coef), act, go=grad_output)
        else:
            g_y = conv.new_output()
            conv.run(epilogue, act, out=g_y, go=grad_output, coef=torch.stack(coef))
        grad_input, grad_weight = conv.input_and_weight_grads(g_y, need_input, need_weight)
    if grad_weight is not None:
        grad_weight = _strided_like(grad_weight, conv.weight)
    grads = [grad_input, grad_weight, None, None]
    # Copies: an op's outputs may not alias each other (views of `sums` would).
    if need_bn_weight:
        bn_dtype = grad_output.dtype if bn_weight is None else bn_weight.dtype
        grads[2] = sums[1].to(bn_dtype, copy=True)
    if need_bn_bias:
        bn_dtype = grad_output.dtype if bn_bias is None else bn_bias.dtype
        grads[3] = sums[0].to(bn_dtype, copy=True)
    return tuple(grad_output.new_empty((0,)) if g is None else g for g in grads)


def _strided_like(t: Tensor, ref: Tensor) -> Tensor:
    """t with the strides of torch.empty_like(ref), as the fake kernels promise."""
    like = torch.empty_like(ref)
    if like.stride() == t.stride():
        return t
    return like.copy_(t)
