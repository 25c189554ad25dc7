"""The depthwise tap gather: one Triton kernel for the forward, the input gradient and the fused
depthwise op's passes, as csrc/depthwise/depthwise_programs.h DwForwardProgram serves the forward
with and without its BN epilogue.

Every output element sums ``src * w`` over the taps that reach it, where ``src`` is the input
(forward) or grad_output (input gradient, whose tap geometry is the forward's transposed: the
``TRANSPOSED`` constexpr). The sum, plus the bias where ``HAS_BIAS``, goes to
bn_epilogue.bn_act_epilogue with the ``EPILOGUE`` constexpr: STORE for the plain convolution,
APPLY / STATS / GRAD_STATS / GRAD / GRAD_EVAL for the fused op. ``CHANNELS_LAST`` picks the tile
of the layout (NCHW: pixels of one plane; channels_last: pixels x channels).

The kernel has one autotuner per use: the plain convolution tunes the pixel block, the fused op
fixes it (its row blocks are the units of the BN partial sums, a function of the shape alone) and
tunes the rest.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import ACTIVATION_CODES
from .bn_epilogue import STORE, bn_act_epilogue
from .common import autotune_by_layout, check_planes_fit_int32, geometry, split_pixel, tap_source

_GEOMETRY_KEY = ["OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"]
_PLAIN_KEY = _GEOMETRY_KEY + ["TRANSPOSED"]
_BN_KEY = _GEOMETRY_KEY + ["EPILOGUE", "STORE_Y", "ACT", "BLOCK_P"]


@triton.jit
def tap_gather(
    acc,
    src_ptr,
    w_ptr,
    oh,
    ow,
    row_mask,
    row_base,
    row_len,
    s_w,
    chan_offs,
    w_offs,
    chan_mask,
    SH,
    SW,
    PAD_H,
    PAD_W,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """acc + the sum over the KH x KW taps of src * w: the one tap loop of the depthwise kernels
    (this file's and block_eval.py's). The source is seen as rows of `row_len` pixels, `s_w`
    elements apart: the tap (ih, iw) of output pixel (oh, ow) (tap_source; zero outside the
    SH x SW source) reads src_ptr[((row_base + ih) * row_len + iw) * s_w + chan_offs] and
    multiplies it by w_ptr[w_offs + tap] (w [C, KH * KW]). The pixel arguments (src_ptr, oh, ow,
    row_mask, row_base) and the channel ones (chan_offs, w_offs, chan_mask) come shaped to
    broadcast into acc: [P, 1] and [1, K] for a tile of pixels x channels, [P] and scalars for
    one channel's plane. Accumulates in acc's dtype. (This order of the address arithmetic
    keeps the channels_last gather within its registers: ptxas spills more with others.)"""
    for kh in range(KH):  # not unrolled: KH*KW hoisted loads would exhaust registers
        ih, valid_h = tap_source(oh, kh, PAD_H, SH, STRIDE_H, DIL_H, TRANSPOSED)
        for kw in tl.static_range(KW):
            iw, valid_w = tap_source(ow, kw, PAD_W, SW, STRIDE_W, DIL_W, TRANSPOSED)
            valid = row_mask & valid_h & valid_w
            x = tl.load(
                src_ptr + ((row_base + ih) * row_len + iw) * s_w + chan_offs,
                mask=valid & chan_mask,
                other=0.0,
            )
            w = tl.load(w_ptr + w_offs + (kh * KW + kw), mask=chan_mask, other=0.0)
            acc += x.to(acc.dtype) * w.to(acc.dtype)
    return acc


@triton.jit
def _depthwise_gather_kernel(
    src_ptr,  # [N, C, SH, SW] contiguous in its layout: input (forward) or grad_output
    w_ptr,  # [C, KH * KW] contiguous
    b_ptr,  # [C]; read only when HAS_BIAS
    out_ptr,  # [N, C, OH, OW] contiguous in src's layout: see bn_act_epilogue
    go_ptr,  # like out: grad_output (GRAD_STATS, GRAD)
    coef_ptr,  # [rows, C] float32 (float64) (APPLY, GRAD_STATS, GRAD, GRAD_EVAL)
    partial_ptr,  # [2, num_block_rows, C] float32 (float64) (STATS, GRAD_STATS)
    num_pixels,  # N * OH * OW
    num_block_rows,
    C,
    SH,
    SW,
    OH,
    OW,
    PAD_H,
    PAD_W,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_Y: tl.constexpr,
    ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels_last only
):
    # Channels_last: 1-D grid over (block of BLOCK_P output pixels of the flat N*OH*OW range,
    # block of BLOCK_C channels), channel blocks fastest so neighbouring programs share DRAM
    # rows; a row block is a pixel block; each tap is a [BLOCK_P, BLOCK_C] load contiguous along
    # C; all pixel offsets are int64. NCHW: 1-D grid over (n*C + c plane, block of BLOCK_P pixels
    # of that plane); the plane's weights are scalars; a row block is (n, pixel block) of one
    # channel; in-plane offsets are int32 (the host checks SH*SW, OH*OW < 2**31), plane bases
    # int64. Moves: src read once from DRAM (the KH*KW overlapping tap reads hit L1/L2), out
    # written once (or partials only), KH*KW+1 weights per channel and program.
    if src_ptr.dtype.element_ty == tl.float64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    pid = tl.program_id(0)
    if CHANNELS_LAST:
        c_blocks = tl.cdiv(C, BLOCK_C)
        c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        block_row = (pid // c_blocks).to(tl.int64)
        p = block_row * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < num_pixels
        n, oh, ow = split_pixel(p, OH, OW)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_dtype)
        # The tap loop's pixel arguments as [BLOCK_P, 1] columns, its channel ones as rows.
        tap_oh, tap_ow, tap_rows = oh[:, None], ow[:, None], p_mask[:, None]
        src, src_rows, s_w = src_ptr, (n * SH)[:, None], C
        chan_offs, w_offs, chan_mask = c[None, :], (c * (KH * KW))[None, :], c_mask[None, :]
    else:
        blocks_per_plane = tl.cdiv(OH * OW, BLOCK_P)
        plane = (pid // blocks_per_plane).to(tl.int64)
        block = pid % blocks_per_plane
        c = plane % C
        pixel = block * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = pixel < OH * OW
        oh = pixel // OW
        ow = pixel % OW
        acc = tl.zeros([BLOCK_P], dtype=acc_dtype)
        # The tap loop over one plane: pixel vectors, the channel's scalars.
        tap_oh, tap_ow, tap_rows = oh, ow, p_mask
        src, src_rows, s_w = src_ptr + plane * SH * SW, 0, 1
        chan_offs, w_offs, chan_mask = 0, c * (KH * KW), True  # the plane's channel exists
    acc = tap_gather(
        acc,
        src,
        w_ptr,
        tap_oh,
        tap_ow,
        tap_rows,
        src_rows,
        SW,
        s_w,
        chan_offs,
        w_offs,
        chan_mask,
        SH,
        SW,
        PAD_H,
        PAD_W,
        KH,
        KW,
        STRIDE_H,
        STRIDE_W,
        DIL_H,
        DIL_W,
        TRANSPOSED,
    )
    if CHANNELS_LAST:
        if HAS_BIAS:
            acc += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(acc.dtype)[None, :]
        row_mask = p_mask[:, None]
        chan = c[None, :]
        offs = p[:, None] * C + c[None, :]
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + c).to(acc.dtype)
        row_mask = p_mask
        chan = tl.zeros([1], dtype=tl.int64) + c
        offs = plane * OH * OW + pixel
        block_row = (plane // C) * blocks_per_plane + block
    bn_act_epilogue(
        acc,
        row_mask,
        chan,
        offs,
        block_row,
        num_block_rows,
        C,
        out_ptr,
        go_ptr,
        coef_ptr,
        partial_ptr,
        EPILOGUE,
        STORE_Y,
        ACT,
    )


# Inductor caches a user kernel by its function and non-tensor arguments, not by its configs:
# the plain and the fused launches stay apart because they never share an EPILOGUE.
# The plain convolution (forward, input gradient) tunes the pixel block.
_PLAIN_KERNELS = autotune_by_layout(
    _depthwise_gather_kernel,
    _PLAIN_KEY,
    nchw=(
        [
            ({"BLOCK_P": 128}, 4),
            ({"BLOCK_P": 256}, 4),
            ({"BLOCK_P": 512}, 4),
            ({"BLOCK_P": 1024}, 8),
        ],
        ({"BLOCK_P": 64}, 4),
    ),
    channels_last=(
        [
            ({"BLOCK_P": 64, "BLOCK_C": 32}, 4),
            ({"BLOCK_P": 32, "BLOCK_C": 64}, 4),
            ({"BLOCK_P": 128, "BLOCK_C": 32}, 8),
            ({"BLOCK_P": 64, "BLOCK_C": 64}, 8),
        ],
        ({"BLOCK_P": 32, "BLOCK_C": 16}, 4),
    ),
)

# The fused op fixes the pixel block (its row blocks) and tunes the rest.
_BN_KERNELS = autotune_by_layout(
    _depthwise_gather_kernel,
    _BN_KEY,
    nchw=([({}, 4), ({}, 2), ({}, 8)], ({}, 4)),
    channels_last=(
        [({"BLOCK_C": 32}, 4), ({"BLOCK_C": 64}, 4), ({"BLOCK_C": 64}, 8)],
        ({"BLOCK_C": 16}, 4),
    ),
)


def _launch(
    kernel,
    src: Tensor,
    weight: Tensor,
    out_shape,
    pointers: tuple,
    num_block_rows: int,
    channels_last: bool,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    **options,
) -> None:
    N, C, SH, SW = src.shape
    OH, OW = out_shape[-2:]
    num_pixels = N * OH * OW
    if num_pixels * C == 0:
        return
    check_planes_fit_int32(src.shape, out_shape)
    kh, kw = weight.shape[-2:]
    if channels_last:

        def grid(meta):
            return (triton.cdiv(num_pixels, meta["BLOCK_P"]) * triton.cdiv(C, meta["BLOCK_C"]),)

    else:
        options.setdefault("BLOCK_C", 1)

        def grid(meta):
            return (N * C * triton.cdiv(OH * OW, meta["BLOCK_P"]),)

    torch.library.wrap_triton(kernel)[grid](
        src,
        weight.reshape(C, kh * kw).contiguous(),
        *pointers,
        num_pixels,
        num_block_rows,
        C,
        SH,
        SW,
        OH,
        OW,
        padding[0],
        padding[2],
        **geometry((kh, kw), stride, dilation),
        CHANNELS_LAST=channels_last,
        **options,
    )


def gather(
    src: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: Tensor,
    channels_last: bool,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    transposed: bool,
) -> None:
    """out = sum over taps of src * weight (+ bias); src and out contiguous in the same layout."""
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else weight  # placeholder pointer, never read
    # src stands in for the pointers the STORE epilogue does not touch (never written).
    _launch(
        _PLAIN_KERNELS[channels_last],
        src,
        weight,
        out.shape,
        (bias, out, src, src, src),
        0,
        channels_last,
        padding,
        stride,
        dilation,
        TRANSPOSED=transposed,
        HAS_BIAS=has_bias,
        EPILOGUE=STORE.value,
        STORE_Y=False,
        ACT=ACTIVATION_CODES["none"],
    )


def gather_bn_act(
    x: Tensor,
    weight: Tensor,
    out_shape,
    pointers: tuple,
    block: int,
    num_block_rows: int,
    channels_last: bool,
    padding: list[int],
    stride: list[int],
    dilation: list[int],
    epilogue,
    store_y: bool,
    act: str,
) -> None:
    """The forward convolution of x into `epilogue` (bn_epilogue.py) over row blocks of `block`
    pixels; `pointers` are its (out, go, coef, partial): FusedConv.epilogue_pointers."""
    _launch(
        _BN_KERNELS[channels_last],
        x,
        weight,
        out_shape,
        (weight,) + tuple(pointers),  # no bias: its pointer never read
        num_block_rows,
        channels_last,
        padding,
        stride,
        dilation,
        TRANSPOSED=False,
        HAS_BIAS=False,
        EPILOGUE=epilogue,
        STORE_Y=store_y,
        ACT=ACTIVATION_CODES[act],
        BLOCK_P=block,
    )
