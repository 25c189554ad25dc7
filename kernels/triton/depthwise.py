"""Triton depthwise 2-D convolution: forward, input gradient and weight gradient.

Three ops registered with ``torch.library.triton_op`` (so torch.compile traces into the kernels):

- ``depsep::triton_depthwise_conv2d_fwd``
- ``depsep::triton_depthwise_conv2d_bwd_input``
- ``depsep::triton_depthwise_conv2d_bwd_weight``

Shared contract with the native ops: ``padding`` is ``[top, bottom, left, right]``, ``stride`` and
``dilation`` are ``[h, w]``, and arguments arrive validated. Each op computes in the memory format
that ``suggest_memory_format`` picks for its layout-defining tensor (NCHW or channels_last) and
returns its result in that format. Accumulation is float32 (float64 for float64 tensors).

Forward and input gradient are the same gather: every output element sums ``src * w`` over the
taps that reach it, where ``src`` is the input (forward) or grad_output (input gradient, whose tap
geometry is the forward's transposed). One kernel per layout serves both, switched by the
``TRANSPOSED`` constexpr. The weight gradient is a deterministic two-pass reduction: each program
writes float32 partial sums for a fixed chunk of output pixels, then ``partial.sum(0)``.

No autograd here: kernels/_ops.py registers it on top of these ops.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import conv2d_output_hw, stats_dtype
from .._common import memory_format as suggest_memory_format

# Under the interpreter every program instance costs ~25 ms: one fixed config, no benchmarking.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# DEPSEP_TRITON_AUTOTUNE=0 keeps the first GPU config instead of benchmarking them all, so a
# test suite of many shapes compiles each kernel once (the benchmarks autotune).
_AUTOTUNE = os.environ.get("DEPSEP_TRITON_AUTOTUNE", "1") != "0"

# Weight-gradient chunking: a chunk covers at least this many output pixels, so the partial
# buffer stays a few percent of the activations, and there are at most this many chunks.
_WGRAD_MIN_CHUNK_PIXELS = 512
_WGRAD_MAX_CHUNKS = 1024


def _configs(gpu, interpret):
    """Autotune candidates: `gpu` on a GPU (only its first without autotuning), the single
    `interpret` config under the interpreter. Each is (kwargs, num_warps[, num_stages])."""
    chosen = [interpret] if _INTERPRET else gpu if _AUTOTUNE else gpu[:1]
    return [triton.Config(*config) for config in chosen]


_GATHER_KEY = ["OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "TRANSPOSED"]


# ---------------------------------------------------------------------------------------------
# Shared index math
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tap_source(
    o, k, pad, src_len, STRIDE: tl.constexpr, DILATION: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """Along one spatial axis: the index into the source that tap `k` of output index `o` reads,
    and whether it exists (inside the source; for TRANSPOSED, also on the stride grid)."""
    if TRANSPOSED:
        # Invert i = o_src * STRIDE - pad + k * DILATION; clamp first so // and % never see a
        # negative operand (Triton rounds integer division toward zero).
        t = o + pad - k * DILATION
        valid = t >= 0
        t = tl.maximum(t, 0)
        if STRIDE > 1:
            valid = valid & (t % STRIDE == 0)
        i = t // STRIDE
        valid = valid & (i < src_len)
    else:
        i = o * STRIDE - pad + k * DILATION
        valid = (i >= 0) & (i < src_len)
    return i, valid


@triton.jit
def _split_pixel(p, OH, OW):
    """Flat output pixel index over [N, OH, OW] -> (n, oh, ow)."""
    n = p // (OH * OW)
    r = p - n * (OH * OW)
    oh = r // OW
    return n, oh, r - oh * OW


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
def _gather_plane_taps(
    acc,
    src_plane,
    w_ptr,
    c,
    oh,
    ow,
    mask,
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
    """acc [BLOCK] plus the sum over taps of src * w at output pixels (oh, ow) of the NCHW plane
    `src_plane` of channel c. The tap loop of the NCHW gather kernels, here and in
    triton_fused.py."""
    for kh in range(KH):  # not unrolled: KH*KW hoisted loads would exhaust registers
        ih, valid_h = _tap_source(oh, kh, PAD_H, SH, STRIDE_H, DIL_H, TRANSPOSED)
        for kw in tl.static_range(KW):
            iw, valid_w = _tap_source(ow, kw, PAD_W, SW, STRIDE_W, DIL_W, TRANSPOSED)
            x = tl.load(src_plane + ih * SW + iw, mask=mask & valid_h & valid_w, other=0.0)
            w = tl.load(w_ptr + c * (KH * KW) + kh * KW + kw)
            acc += x.to(acc.dtype) * w.to(acc.dtype)
    return acc


@triton.jit
def _gather_nhwc_taps(
    acc,
    src_ptr,
    w_ptr,
    n,
    oh,
    ow,
    p_mask,
    c,
    c_mask,
    C,
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
    """acc [BLOCK_P, BLOCK_C] plus the sum over taps of src * w at output pixels (n, oh, ow)
    [BLOCK_P] and channels c [BLOCK_C] of a channels_last src. The tap loop of the channels_last
    gather kernels, here and in triton_fused.py."""
    for kh in range(KH):  # not unrolled: KH*KW hoisted loads would exhaust registers
        ih, valid_h = _tap_source(oh, kh, PAD_H, SH, STRIDE_H, DIL_H, TRANSPOSED)
        for kw in tl.static_range(KW):
            iw, valid_w = _tap_source(ow, kw, PAD_W, SW, STRIDE_W, DIL_W, TRANSPOSED)
            pixel = (n * SH + ih) * SW + iw
            valid = p_mask & valid_h & valid_w
            x = tl.load(
                src_ptr + pixel[:, None] * C + c[None, :],
                mask=valid[:, None] & c_mask[None, :],
                other=0.0,
            )
            w = tl.load(w_ptr + c * (KH * KW) + kh * KW + kw, mask=c_mask, other=0.0)
            acc += x.to(acc.dtype) * w.to(acc.dtype)[None, :]
    return acc


# ---------------------------------------------------------------------------------------------
# Forward / input gradient
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(
        gpu=[({"BLOCK": 128}, 4), ({"BLOCK": 256}, 4), ({"BLOCK": 512}, 4), ({"BLOCK": 1024}, 8)],
        interpret=({"BLOCK": 64}, 4),
    ),
    key=_GATHER_KEY,
)
@triton.jit
def _depthwise_gather_nchw_kernel(
    src_ptr,  # [N, C, SH, SW] contiguous: input (forward) or grad_output (input gradient)
    w_ptr,  # [C, KH * KW] contiguous
    b_ptr,  # [C]; read only when HAS_BIAS
    out_ptr,  # [N, C, OH, OW] contiguous: output (forward) or grad_input (input gradient)
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
    BLOCK: tl.constexpr,
):
    # NCHW. 1-D grid over (n*C + c plane, block of BLOCK pixels of that plane); the plane's
    # weights are scalars. Moves: out written once; src read once from DRAM (the KH*KW
    # overlapping tap reads hit L1/L2); weights, bias: KH*KW+1 scalars per program.
    # In-plane offsets are int32 (the host checks SH*SW, OH*OW < 2**31); plane bases int64.
    blocks_per_plane = tl.cdiv(OH * OW, BLOCK)
    pid = tl.program_id(0)
    plane = (pid // blocks_per_plane).to(tl.int64)
    offs = (pid % blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < OH * OW
    oh = offs // OW
    ow = offs % OW
    c = plane % C
    src_plane = src_ptr + plane * SH * SW
    if out_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _gather_plane_taps(
        acc,
        src_plane,
        w_ptr,
        c,
        oh,
        ow,
        mask,
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
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(acc.dtype)
    tl.store(out_ptr + plane * OH * OW + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_configs(
        gpu=[
            ({"BLOCK_P": 64, "BLOCK_C": 32}, 4),
            ({"BLOCK_P": 32, "BLOCK_C": 64}, 4),
            ({"BLOCK_P": 128, "BLOCK_C": 32}, 8),
            ({"BLOCK_P": 64, "BLOCK_C": 64}, 8),
        ],
        interpret=({"BLOCK_P": 32, "BLOCK_C": 16}, 4),
    ),
    key=["C"] + _GATHER_KEY,
)
@triton.jit
def _depthwise_gather_nhwc_kernel(
    src_ptr,  # [N, SH, SW, C] contiguous (channels_last): input or grad_output
    w_ptr,  # [C, KH * KW] contiguous
    b_ptr,  # [C]; read only when HAS_BIAS
    out_ptr,  # [N, OH, OW, C] contiguous (channels_last): output or grad_input
    num_pixels,
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
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Channels_last. 1-D grid over (block of BLOCK_P output pixels of the flat N*OH*OW range,
    # block of BLOCK_C channels), channel blocks fastest so neighbouring programs share DRAM rows.
    # Each tap is a [BLOCK_P, BLOCK_C] load contiguous along C. Moves: out written once, src read
    # once from DRAM (overlapping taps hit L1/L2), BLOCK_C*(KH*KW+1) weights per program.
    # All pixel offsets are int64.
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = (pid // c_blocks).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_mask = c < C
    p_mask = p < num_pixels
    n, oh, ow = _split_pixel(p, OH, OW)
    if out_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc = _gather_nhwc_taps(
        acc,
        src_ptr,
        w_ptr,
        n,
        oh,
        ow,
        p_mask,
        c,
        c_mask,
        C,
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
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(acc.dtype)[None, :]
    tl.store(
        out_ptr + p[:, None] * C + c[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=p_mask[:, None] & c_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Weight gradient (first pass: per-chunk partial sums)
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs(gpu=[({}, 4), ({}, 8)], interpret=({}, 4)),
    key=["OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "TAPS"],
)
@triton.jit
def _depthwise_wgrad_partial_nchw_kernel(
    go_ptr,  # [N, C, OH, OW] contiguous: grad_output
    x_ptr,  # [N, C, H, W] contiguous: input
    partial_ptr,  # [num_chunks, C, TAPS] contiguous, float32 (float64 for float64 input)
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
    BLOCK_P: tl.constexpr,
):
    # NCHW. Grid (C, num_chunks). An item is BLOCK_P pixels of one (n, c) plane; program (c, k)
    # walks items [k*items_per_chunk, (k+1)*items_per_chunk) of channel c in order, keeping a
    # [BLOCK_P, TAPS_PAD] accumulator (tap KH*KW is the bias: x == 1), then tree-sums the pixel
    # axis into partial[k, c, :]. BLOCK_P and the chunking come from the shape alone, so the
    # result is reproducible. Moves: grad_output and input read once from DRAM (taps overlap in
    # L1), TAPS floats written per program.
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    tap = tl.arange(0, TAPS_PAD)
    kh = tap // KW
    kw = tap % KW
    is_weight_tap = tap < KH * KW
    blocks_per_plane = tl.cdiv(OH * OW, BLOCK_P)
    acc = tl.zeros([BLOCK_P, TAPS_PAD], dtype=partial_ptr.dtype.element_ty)
    item_end = tl.minimum((chunk + 1) * items_per_chunk, num_items)
    for item in range(chunk * items_per_chunk, item_end):
        n = item // blocks_per_plane
        offs = (item - n * blocks_per_plane) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs < OH * OW
        plane = tl.cast(n, tl.int64) * C + c
        g = tl.load(go_ptr + plane * OH * OW + offs, mask=p_mask, other=0.0).to(acc.dtype)
        ih, valid_h = _tap_source(
            (offs // OW)[:, None], kh[None, :], PAD_H, H, STRIDE_H, DIL_H, False
        )
        iw, valid_w = _tap_source(
            (offs % OW)[:, None], kw[None, :], PAD_W, W, STRIDE_W, DIL_W, False
        )
        valid = p_mask[:, None] & valid_h & valid_w & is_weight_tap[None, :]
        x = tl.load(x_ptr + plane * H * W + ih * W + iw, mask=valid, other=0.0).to(acc.dtype)
        if TAPS > KH * KW:
            x = tl.where((tap == KH * KW)[None, :], 1.0, x)
        acc += g[:, None] * x
    total = _tree_sum_rows(acc, BLOCK_P, TAPS_PAD)
    tl.store(partial_ptr + (chunk.to(tl.int64) * C + c) * TAPS + tap, total, mask=tap < TAPS)


@triton.autotune(
    configs=_configs(
        gpu=[({"BLOCK_C": 32}, 4), ({"BLOCK_C": 32}, 8), ({"BLOCK_C": 64}, 8)],
        interpret=({"BLOCK_C": 16}, 4),
    ),
    key=["C", "OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "TAPS"],
)
@triton.jit
def _depthwise_wgrad_partial_nhwc_kernel(
    go_ptr,  # [N, OH, OW, C] contiguous (channels_last): grad_output
    x_ptr,  # [N, H, W, C] contiguous (channels_last): input
    partial_ptr,  # [num_chunks, C, TAPS] contiguous, float32 (float64 for float64 input)
    num_pixels,
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
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Channels_last. Grid (C blocks, num_chunks). An item is BLOCK_P consecutive pixels of the
    # flat N*OH*OW range; program (j, k) walks items [k*items_per_chunk, ...) in order for
    # channels [j*BLOCK_C, (j+1)*BLOCK_C), all taps at once in a [BLOCK_P, TAPS_PAD, BLOCK_C]
    # accumulator (tap KH*KW is the bias: x == 1), then tree-sums the pixel axis into
    # partial[k, c, :]. Only BLOCK_C and num_warps are autotuned: neither changes the order of
    # the additions. Moves: grad_output and input read once from DRAM (taps overlap in L1),
    # BLOCK_C*TAPS floats written per program. All pixel offsets are int64.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    c_mask = c < C
    tap = tl.arange(0, TAPS_PAD)
    kh = tap // KW
    kw = tap % KW
    is_weight_tap = tap < KH * KW
    acc = tl.zeros([BLOCK_P, TAPS_PAD, BLOCK_C], dtype=partial_ptr.dtype.element_ty)
    item_end = tl.minimum((chunk + 1) * items_per_chunk, num_items)
    for item in range(chunk * items_per_chunk, item_end):
        p = tl.cast(item, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < num_pixels
        n, oh, ow = _split_pixel(p, OH, OW)
        g = tl.load(
            go_ptr + p[:, None] * C + c[None, :], mask=p_mask[:, None] & c_mask[None, :], other=0.0
        ).to(acc.dtype)
        ih, valid_h = _tap_source(oh[:, None], kh[None, :], PAD_H, H, STRIDE_H, DIL_H, False)
        iw, valid_w = _tap_source(ow[:, None], kw[None, :], PAD_W, W, STRIDE_W, DIL_W, False)
        pixel = (n[:, None] * H + ih) * W + iw
        valid = p_mask[:, None] & valid_h & valid_w & is_weight_tap[None, :]
        x = tl.load(
            x_ptr + pixel[:, :, None] * C + c[None, None, :],
            mask=valid[:, :, None] & c_mask[None, None, :],
            other=0.0,
        ).to(acc.dtype)
        if TAPS > KH * KW:
            x = tl.where((tap == KH * KW)[None, :, None], 1.0, x)
        acc += g[:, None, :] * x
    total = tl.reshape(
        _tree_sum_rows(tl.reshape(acc, [BLOCK_P, TAPS_PAD * BLOCK_C]), BLOCK_P, TAPS_PAD * BLOCK_C),
        [TAPS_PAD, BLOCK_C],
    )
    tl.store(
        partial_ptr + (chunk.to(tl.int64) * C + c[None, :]) * TAPS + tap[:, None],
        total,
        mask=(tap < TAPS)[:, None] & c_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _check_planes_fit_int32(*shapes):
    # In-plane offsets and the flat-pixel decode are int32 in the kernels.
    for shape in shapes:
        torch._check(
            shape[-2] * shape[-1] < 2**31,
            lambda shape=shape: (
                f"depthwise_conv2d (triton): spatial plane {list(shape[-2:])} has "
                "2**31 or more elements"
            ),
        )


def _geometry(kernel_size, stride: list[int], dilation: list[int]) -> dict:
    """The constexpr kernel-geometry arguments shared by every kernel."""
    return dict(
        KH=kernel_size[0],
        KW=kernel_size[1],
        STRIDE_H=stride[0],
        STRIDE_W=stride[1],
        DIL_H=dilation[0],
        DIL_W=dilation[1],
    )


def _launch_gather(
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
    if out.numel() == 0:
        return
    _check_planes_fit_int32(src.shape, out.shape)
    N, C, SH, SW = src.shape
    OH, OW = out.shape[-2:]
    kh, kw = weight.shape[-2:]
    weight = weight.reshape(C, kh * kw).contiguous()
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else weight  # placeholder pointer, never read
    geometry = dict(_geometry((kh, kw), stride, dilation), TRANSPOSED=transposed, HAS_BIAS=has_bias)
    if channels_last:
        num_pixels = N * OH * OW
        torch.library.wrap_triton(_depthwise_gather_nhwc_kernel)[
            lambda meta: (
                triton.cdiv(num_pixels, meta["BLOCK_P"]) * triton.cdiv(C, meta["BLOCK_C"]),
            )
        ](src, weight, bias, out, num_pixels, C, SH, SW, OH, OW, padding[0], padding[2], **geometry)
    else:
        torch.library.wrap_triton(_depthwise_gather_nchw_kernel)[
            lambda meta: (N * C * triton.cdiv(OH * OW, meta["BLOCK"]),)
        ](src, weight, bias, out, C, SH, SW, OH, OW, padding[0], padding[2], **geometry)


def _wgrad_chunking(num_items: int, block_p: int) -> tuple[int, int]:
    """(items_per_chunk, num_chunks) for `num_items` items of `block_p` pixels: shape-only."""
    items_per_chunk = max(
        triton.cdiv(_WGRAD_MIN_CHUNK_PIXELS, block_p), triton.cdiv(num_items, _WGRAD_MAX_CHUNKS)
    )
    return items_per_chunk, triton.cdiv(num_items, items_per_chunk)


def _wgrad_sums(
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
    _check_planes_fit_int32(input.shape, grad_output.shape)
    taps_pad = triton.next_power_of_2(taps)
    geometry = dict(_geometry(kernel_size, stride, dilation), TAPS=taps, TAPS_PAD=taps_pad)
    if channels_last:
        # A [BLOCK_P, TAPS_PAD, BLOCK_C] accumulator: 128 * BLOCK_C floats whatever the kernel.
        block_p = max(1, 128 // taps_pad)
        num_items = triton.cdiv(N * OH * OW, block_p)
    else:
        # A [BLOCK_P, TAPS_PAD] accumulator of about 2048 floats, BLOCK_P at most one plane.
        # BLOCK_P is a constexpr, so under torch.compile this specialises on the plane size.
        block_p = max(16, min(2048 // taps_pad, triton.next_power_of_2(int(OH * OW))))
        num_items = N * triton.cdiv(OH * OW, block_p)
    items_per_chunk, num_chunks = _wgrad_chunking(num_items, block_p)
    partial = torch.empty((num_chunks, C, taps), device=input.device, dtype=acc_dtype)
    if channels_last:
        torch.library.wrap_triton(_depthwise_wgrad_partial_nhwc_kernel)[
            lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), num_chunks)
        ](
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
            BLOCK_P=block_p,
            **geometry,
        )
    else:
        torch.library.wrap_triton(_depthwise_wgrad_partial_nchw_kernel)[(C, num_chunks)](
            grad_output,
            input,
            partial,
            C,
            H,
            W,
            OH,
            OW,
            padding[0],
            padding[2],
            num_items,
            items_per_chunk,
            BLOCK_P=block_p,
            **geometry,
        )
    # Second pass: a fixed-order reduction over the chunks.
    return partial.sum(0)


def depthwise_conv2d_fwd(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """Depthwise conv2d: input [N, C, H, W], weight [C, 1, kH, kW], padding [t, b, l, r]."""
    N, C, H, W = input.shape
    kh, kw = weight.shape[-2:]
    oh, ow = conv2d_output_hw(H, W, (kh, kw), stride, padding, dilation)
    fmt = suggest_memory_format(input)
    out = torch.empty((N, C, oh, ow), device=input.device, dtype=input.dtype, memory_format=fmt)
    _launch_gather(
        input.contiguous(memory_format=fmt),
        weight,
        bias,
        out,
        fmt == torch.channels_last,
        padding,
        stride,
        dilation,
        transposed=False,
    )
    return out


def depthwise_conv2d_bwd_input(
    grad_output: Tensor,
    weight: Tensor,
    input_shape: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """Gradient of depthwise_conv2d_fwd with respect to its input, shaped `input_shape`."""
    fmt = suggest_memory_format(grad_output)
    grad_input = torch.empty(
        input_shape, device=grad_output.device, dtype=grad_output.dtype, memory_format=fmt
    )
    _launch_gather(
        grad_output.contiguous(memory_format=fmt),
        weight,
        None,
        grad_input,
        fmt == torch.channels_last,
        padding,
        stride,
        dilation,
        transposed=True,
    )
    return grad_input


def depthwise_conv2d_bwd_weight(
    grad_output: Tensor,
    input: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    compute_bias: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_weight [C, 1, kH, kW], grad_bias [C] or an empty [0]) of depthwise_conv2d_fwd.

    Deterministic: no atomics, and the reduction order depends on the shapes only.
    """
    C = input.shape[1]
    kh, kw = kernel_size
    fmt = suggest_memory_format(input)
    sums = _wgrad_sums(
        grad_output.contiguous(memory_format=fmt),
        input.contiguous(memory_format=fmt),
        fmt == torch.channels_last,
        kh * kw + int(compute_bias),
        kernel_size,
        padding,
        stride,
        dilation,
    )
    grad_weight = (
        sums[:, : kh * kw]
        .to(input.dtype, memory_format=torch.contiguous_format, copy=True)
        .view(C, 1, kh, kw)
    )
    if compute_bias:
        grad_bias = sums[:, kh * kw].to(
            input.dtype, memory_format=torch.contiguous_format, copy=True
        )
    else:
        grad_bias = torch.empty(0, device=input.device, dtype=input.dtype)
    return grad_weight, grad_bias
