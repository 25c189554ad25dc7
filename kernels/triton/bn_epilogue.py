"""The BatchNorm + activation epilogue of the Triton convolution kernels, and its elementwise pass.

Each convolution kernel (the pointwise GEMM, the depthwise gather) computes a tile of the raw
convolution y in float32 registers (float64 for float64 input) and hands it to `bn_act_epilogue`,
which applies one of (the ``EPILOGUE`` constexpr):

- APPLY       out = act(y * scale + shift), scale and shift per channel (BN folded into them)
- STATS       per (row block, channel): the block's mean and sum of squared deviations of y
- GRAD_STATS  per (row block, channel): sums of g_z and g_z * xhat, g_z = grad_out * act'(z)
- GRAD        g_y = scale * (g_z - mean(g_z) - xhat * mean(g_z * xhat))
- GRAD_EVAL   g_y = scale * g_z (eval: finite where y is not, as torch's)
- STORE       y itself (also, as an option, alongside STATS and GRAD_STATS: ``STORE_Y``)

The per-channel coefficients come in one table `coef` [rows, C] (rows: scale, shift, invstd,
mean, mean(g_z), mean(g_z * xhat)); the partials go to [2, row blocks, C] buffers that
bn_passes.py reduces. The elementwise kernel applies APPLY or GRAD to a stored y in place: the
second pass of the store design (bn_passes.py).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import ACTIVATION_CODES
from .common import activation, activation_grad, configs

STORE = tl.constexpr(0)
APPLY = tl.constexpr(1)
STATS = tl.constexpr(2)
GRAD_STATS = tl.constexpr(3)
GRAD = tl.constexpr(4)
GRAD_EVAL = tl.constexpr(5)

# Rows of the per-channel coefficient table `coef` [rows, C] the epilogues read.
_SCALE, _SHIFT, _INVSTD, _MEAN, _MEAN_GZ, _MEAN_GZ_XHAT = map(tl.constexpr, range(6))


@triton.jit
def bn_act(y, chan, chan_mask, C, coef_ptr, ACT: tl.constexpr):
    """act(y * scale + shift) in registers, scale and shift per channel `chan` from rows
    _SCALE and _SHIFT of coef [rows, C] (zero where not chan_mask): the APPLY epilogue without
    its store, also for a kernel that computes on with the result (block_eval.py)."""
    scale = tl.load(coef_ptr + _SCALE * C + chan, mask=chan_mask, other=0.0)
    shift = tl.load(coef_ptr + _SHIFT * C + chan, mask=chan_mask, other=0.0)
    return activation(y * scale + shift, ACT)


@triton.jit
def bn_act_epilogue(
    y,  # [R, K] or [R] conv outputs, float32 (float64)
    row_mask,  # broadcastable to y: which rows (pixels) exist
    chan,  # broadcastable to y, [1, K] / [1] (or y's shape in the elementwise kernel): channels
    offs,  # y's shape, int64: element offsets into out and grad_output (same layout)
    block_row,  # int64 scalar: this tile's row in the partial buffers
    num_block_rows,  # rows of each partial buffer
    C,
    out_ptr,  # out (APPLY), y (STORE, STORE_Y) or g_y (GRAD); conv output shape and layout
    go_ptr,  # grad_output (GRAD_STATS, GRAD)
    coef_ptr,  # [rows, C] float32 (float64): scale, shift, invstd, mean, mean(g_z), mean(g_z*xhat)
    partial_ptr,  # [2, num_block_rows, C] float32 (float64) (STATS, GRAD_STATS)
    EPILOGUE: tl.constexpr,
    STORE_Y: tl.constexpr,
    ACT: tl.constexpr,
):
    chan_mask = chan < C
    mask = row_mask & chan_mask
    if EPILOGUE == STORE:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == APPLY:
        out = bn_act(y, chan, chan_mask, C, coef_ptr, ACT)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == STATS:
        # This block's mean and M2 (Chan's merge combines the blocks on the host).
        count = tl.maximum(tl.sum(tl.where(mask, 1.0, 0.0), axis=0, keep_dims=True), 1.0)
        block_mean = tl.sum(tl.where(mask, y, 0.0), axis=0, keep_dims=True) / count
        deviation = tl.where(mask, y - block_mean, 0.0)
        block_m2 = tl.sum(deviation * deviation, axis=0, keep_dims=True)
        partial = partial_ptr + block_row * C + chan
        tl.store(partial, block_mean, mask=chan_mask)
        tl.store(partial + num_block_rows * C, block_m2, mask=chan_mask)
        if STORE_Y:
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # GRAD_STATS, GRAD: g_z and xhat from the recomputed y
        scale = tl.load(coef_ptr + _SCALE * C + chan, mask=chan_mask, other=0.0)
        shift = tl.load(coef_ptr + _SHIFT * C + chan, mask=chan_mask, other=0.0)
        invstd = tl.load(coef_ptr + _INVSTD * C + chan, mask=chan_mask, other=0.0)
        mean = tl.load(coef_ptr + _MEAN * C + chan, mask=chan_mask, other=0.0)
        g = tl.load(go_ptr + offs, mask=mask, other=0.0).to(y.dtype)
        g_z = tl.where(mask, activation_grad(y * scale + shift, g, ACT), 0.0)
        xhat = (y - mean) * invstd
        if EPILOGUE == GRAD_STATS:
            partial = partial_ptr + block_row * C + chan
            tl.store(partial, tl.sum(g_z, axis=0, keep_dims=True), mask=chan_mask)
            g_z_xhat = tl.sum(g_z * xhat, axis=0, keep_dims=True)
            tl.store(partial + num_block_rows * C, g_z_xhat, mask=chan_mask)
            if STORE_Y:
                tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == GRAD:
            mean_g_z = tl.load(coef_ptr + _MEAN_GZ * C + chan, mask=chan_mask, other=0.0)
            mean_g_z_xhat = tl.load(coef_ptr + _MEAN_GZ_XHAT * C + chan, mask=chan_mask, other=0.0)
            g_y = scale * (g_z - mean_g_z - xhat * mean_g_z_xhat)
            tl.store(out_ptr + offs, g_y.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # GRAD_EVAL: without the batch statistics' terms, finite where xhat is not
            tl.store(out_ptr + offs, (scale * g_z).to(out_ptr.dtype.element_ty), mask=mask)


# One config: the kernel works in place, so autotuning's repeated launches would corrupt y.
@triton.autotune(
    configs=configs(gpu=[({"BLOCK": 1024}, 4)], interpret=({"BLOCK": 256}, 4)),
    key=["C", "CHANNELS_LAST", "EPILOGUE", "ACT"],
)
@triton.jit
def _bn_act_elementwise_kernel(
    y_ptr,  # [N, C, H, W] contiguous in its layout: the stored convolution output
    go_ptr,  # like y: grad_output (GRAD)
    out_ptr,  # like y (may be y itself): out (APPLY) or g_y (GRAD)
    coef_ptr,  # [rows, C] float32 (float64)
    numel,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The second pass of the store design: APPLY or GRAD over a stored y. Moves: y read, out
    # written (GRAD: also grad_output read), 1-D over the flat tensor, int64 offsets.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if CHANNELS_LAST:
        chan = offs % C
    else:
        chan = (offs // HW) % C
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(coef_ptr.dtype.element_ty)
    bn_act_epilogue(
        y, mask, chan, offs, 0, 0, C, out_ptr, go_ptr, coef_ptr, coef_ptr, EPILOGUE, False, ACT
    )


def elementwise(
    channels_last: bool, epilogue, y: Tensor, coef: Tensor, act: str, go: Tensor | None = None
) -> None:
    """The store design's second pass, in place: y becomes out (APPLY) or g_y (GRAD)."""
    numel = y.numel()
    if numel == 0:
        return
    n, c, h, w = y.shape
    torch.library.wrap_triton(_bn_act_elementwise_kernel)[
        lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)
    ](
        y,
        y if go is None else go,
        y,
        coef,
        numel,
        c,
        h * w,
        CHANNELS_LAST=channels_last,
        EPILOGUE=epilogue,
        ACT=ACTIVATION_CODES[act],
    )
