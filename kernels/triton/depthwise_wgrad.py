"""The depthwise weight gradient (and bias gradient): a deterministic two-pass reduction, as
csrc/depthwise's weight-gradient program.

First pass, one Triton kernel (``CHANNELS_LAST`` picks the layout's tile): each program sums
grad_output * shifted input over a fixed chunk of output pixels, for every tap at once (tap
KH*KW is the bias: x == 1), and writes the float32 (float64) partial sums of its chunk. Second
pass: ``partial.sum(0)``. The chunking depends on the shape alone and the pixel axis is summed
in a fixed pairwise order, so the result is reproducible whatever launch config autotuning picks.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import stats_dtype
from .common import autotune_by_layout, check_planes_fit_int32, geometry, split_pixel, tap_source

# A chunk covers at least this many output pixels, so the partial buffer stays a few percent of
# the activations, and there are at most this many chunks.
_MIN_CHUNK_PIXELS = 512
_MAX_CHUNKS = 1024

_KEY = ["OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "TAPS"]


@triton.jit
def _tree_sum_rows(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Sum of x [ROWS, COLS] (ROWS a power of two) over rows, in a fixed pairwise order.

    Unlike tl.sum, the rounding does not depend on how the compiler spreads x over threads, so
    every autotuned launch config gives bitwise-identical weight gradients.
    """
    for level in tl.static_range(1, 16):  # ROWS <= 2**15
        if ROWS >= 2**level:
            halves = tl.permute(tl.reshape(x, [2, ROWS // 2**level * COLS]), [1, 0])
            first, second = tl.split(halves)
            x = first + second
    return tl.reshape(x, [COLS])


@triton.jit
def _depthwise_wgrad_partial_kernel(
    go_ptr,  # [N, C, OH, OW] contiguous in its layout: grad_output
    x_ptr,  # [N, C, H, W] contiguous in the same layout: input
    partial_ptr,  # [num_chunks, C, TAPS] contiguous, float32 (float64 for float64 input)
    num_pixels,  # N * OH * OW
    C,
    H,
    W,
    OH,
    OW,
    PAD_H,
    PAD_W,
    num_items,
    items_per_chunk,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    TAPS: tl.constexpr,
    TAPS_PAD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels_last only
):
    # Grid (channels, num_chunks): program (j, k) walks items [k*items_per_chunk, ...) in order,
    # all taps at once (tap KH*KW is the bias: x == 1), then tree-sums the pixel axis into
    # partial[k, c, :]. Channels_last: an item is BLOCK_P consecutive pixels of the flat
    # N*OH*OW range, for channels [j*BLOCK_C, (j+1)*BLOCK_C), in a [BLOCK_P, TAPS_PAD, BLOCK_C]
    # accumulator; all pixel offsets int64. NCHW: an item is BLOCK_P pixels of one (n, c) plane,
    # for channel c = j, in a [BLOCK_P, TAPS_PAD] accumulator. BLOCK_P and the chunking come
    # from the shape alone; only BLOCK_C and num_warps are autotuned, and neither changes the
    # order of the additions. Moves: grad_output and input read once from DRAM (taps overlap in
    # L1), TAPS floats per channel written per program.
    chunk = tl.program_id(1)
    tap = tl.arange(0, TAPS_PAD)
    kh = tap // KW
    kw = tap % KW
    is_weight_tap = tap < KH * KW
    if CHANNELS_LAST:
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        acc = tl.zeros([BLOCK_P, TAPS_PAD, BLOCK_C], dtype=partial_ptr.dtype.element_ty)
    else:
        c = tl.program_id(0)
        blocks_per_plane = tl.cdiv(OH * OW, BLOCK_P)
        acc = tl.zeros([BLOCK_P, TAPS_PAD], dtype=partial_ptr.dtype.element_ty)
    item_end = tl.minimum((chunk + 1) * items_per_chunk, num_items)
    for item in range(chunk * items_per_chunk, item_end):
        if CHANNELS_LAST:
            p = tl.cast(item, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
            p_mask = p < num_pixels
            n, oh, ow = split_pixel(p, OH, OW)
            g_offs = p[:, None] * C + c[None, :]
            g = tl.load(go_ptr + g_offs, mask=p_mask[:, None] & c_mask[None, :], other=0.0)
        else:
            n = item // blocks_per_plane
            offs = (item - n * blocks_per_plane) * BLOCK_P + tl.arange(0, BLOCK_P)
            p_mask = offs < OH * OW
            oh = offs // OW
            ow = offs % OW
            plane = tl.cast(n, tl.int64) * C + c
            g = tl.load(go_ptr + plane * OH * OW + offs, mask=p_mask, other=0.0)
        g = g.to(acc.dtype)
        ih, valid_h = tap_source(oh[:, None], kh[None, :], PAD_H, H, STRIDE_H, DIL_H, False)
        iw, valid_w = tap_source(ow[:, None], kw[None, :], PAD_W, W, STRIDE_W, DIL_W, False)
        valid = p_mask[:, None] & valid_h & valid_w & is_weight_tap[None, :]
        if CHANNELS_LAST:
            pixel = (n[:, None] * H + ih) * W + iw
            x = tl.load(
                x_ptr + pixel[:, :, None] * C + c[None, None, :],
                mask=valid[:, :, None] & c_mask[None, None, :],
                other=0.0,
            ).to(acc.dtype)
            if TAPS > KH * KW:
                x = tl.where((tap == KH * KW)[None, :, None], 1.0, x)
            acc += g[:, None, :] * x
        else:
            x = tl.load(x_ptr + plane * H * W + ih * W + iw, mask=valid, other=0.0).to(acc.dtype)
            if TAPS > KH * KW:
                x = tl.where((tap == KH * KW)[None, :], 1.0, x)
            acc += g[:, None] * x
    if CHANNELS_LAST:
        rows = tl.reshape(acc, [BLOCK_P, TAPS_PAD * BLOCK_C])
        total = tl.reshape(_tree_sum_rows(rows, BLOCK_P, TAPS_PAD * BLOCK_C), [TAPS_PAD, BLOCK_C])
        tl.store(
            partial_ptr + (chunk.to(tl.int64) * C + c[None, :]) * TAPS + tap[:, None],
            total,
            mask=(tap < TAPS)[:, None] & c_mask[None, :],
        )
    else:
        total = _tree_sum_rows(acc, BLOCK_P, TAPS_PAD)
        tl.store(partial_ptr + (chunk.to(tl.int64) * C + c) * TAPS + tap, total, mask=tap < TAPS)


_KERNELS = autotune_by_layout(
    _depthwise_wgrad_partial_kernel,
    _KEY,
    nchw=([({}, 4), ({}, 8)], ({}, 4)),
    channels_last=(
        [({"BLOCK_C": 32}, 4), ({"BLOCK_C": 32}, 8), ({"BLOCK_C": 64}, 8)],
        ({"BLOCK_C": 16}, 4),
    ),
)


def _chunking(num_items: int, block_p: int) -> tuple[int, int]:
    """(items_per_chunk, num_chunks) for `num_items` items of `block_p` pixels: shape-only."""
    items_per_chunk = max(
        triton.cdiv(_MIN_CHUNK_PIXELS, block_p), triton.cdiv(num_items, _MAX_CHUNKS)
    )
    return items_per_chunk, triton.cdiv(num_items, items_per_chunk)


def weight_grad_sums(
    grad_output: Tensor,
    input: Tensor,
    channels_last: bool,
    taps: int,
    kernel_size: list[int],
    padding: list[int],
    stride: list[int],
    dilation: list[int],
) -> Tensor:
    """[C, taps] sums over all output pixels of grad_output * shifted input (last tap: bias)."""
    N, C, H, W = input.shape
    OH, OW = grad_output.shape[-2:]
    acc_dtype = stats_dtype(input.dtype)
    if N * OH * OW == 0 or C == 0:
        return torch.zeros((C, taps), device=input.device, dtype=acc_dtype)
    check_planes_fit_int32(input.shape, grad_output.shape)
    taps_pad = triton.next_power_of_2(taps)
    if channels_last:
        # A [BLOCK_P, TAPS_PAD, BLOCK_C] accumulator: 128 * BLOCK_C floats whatever the kernel.
        block_p = max(1, 128 // taps_pad)
        num_items = triton.cdiv(N * OH * OW, block_p)
    else:
        # A [BLOCK_P, TAPS_PAD] accumulator of about 2048 floats, BLOCK_P at most one plane.
        # BLOCK_P is a constexpr, so under torch.compile this specialises on the plane size.
        block_p = max(16, min(2048 // taps_pad, triton.next_power_of_2(int(OH * OW))))
        num_items = N * triton.cdiv(OH * OW, block_p)
    items_per_chunk, num_chunks = _chunking(num_items, block_p)
    partial = torch.empty((num_chunks, C, taps), device=input.device, dtype=acc_dtype)
    if channels_last:
        options = {}

        def grid(meta):
            return (triton.cdiv(C, meta["BLOCK_C"]), num_chunks)

    else:
        options = {"BLOCK_C": 1}
        grid = (C, num_chunks)
    torch.library.wrap_triton(_KERNELS[channels_last])[grid](
        grad_output,
        input,
        partial,
        N * OH * OW,
        C,
        H,
        W,
        OH,
        OW,
        padding[0],
        padding[2],
        num_items,
        items_per_chunk,
        **geometry(kernel_size, stride, dilation),
        TAPS=taps,
        TAPS_PAD=taps_pad,
        CHANNELS_LAST=channels_last,
        BLOCK_P=block_p,
        **options,
    )
    # Second pass: a fixed-order reduction over the chunks.
    return partial.sum(0)
