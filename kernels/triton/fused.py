"""Triton fused convolution + BatchNorm + activation: pointwise (1x1) and depthwise, train and eval.

Four ops registered with ``torch.library.triton_op`` (schemas as the native ones, kernels/_ops.py):

- ``depsep::triton_pointwise_bn_act_fwd`` / ``_bwd``
- ``depsep::triton_depthwise_bn_act_fwd`` / ``_bwd``

Each convolution kernel computes a tile of the raw convolution y in float32 registers (float64
for float64 input) and hands it to one shared epilogue, `_bn_act_epilogue`, which applies one of:

- APPLY       out = act(y * scale + shift), scale and shift per channel (BN folded into them)
- STATS       per (row block, channel): the block's mean and sum of squared deviations of y
- GRAD_STATS  per (row block, channel): sums of g_z and g_z * xhat, g_z = grad_out * act'(z)
- GRAD        g_y = scale * (g_z - mean(g_z) - xhat * mean(g_z * xhat))
- GRAD_EVAL   g_y = scale * g_z (eval: finite where y is not, as torch's)
- STORE       y itself (also, as an option, alongside STATS and GRAD_STATS)

Row blocks are fixed by the shape (never autotuned), partials are written to [2, blocks, C]
buffers and reduced by torch in a fixed order (Chan's merge for the statistics): no atomics, so
a launch config gives bitwise-identical results run to run (autotuning may pick another config
in another process; DEPSEP_TRITON_AUTOTUNE=0 pins the first).

The 1x1 convolution is a tensor-core GEMM (tl.dot; float16/bfloat16 operands, float32 accumulate;
float32 in TF32 when convolutions may use TF32, as cuDNN decides (kernels._common.conv_allows_tf32),
else IEEE; float64 IEEE).
channels_last is one [M = N*H*W, Cin] x [Cin, Cout] product, NCHW one [HW, Cin] x [Cin, Cout]
product per image (x read along HW): the kernel addresses both by strides. The depthwise
convolution is the tap gather of triton_depthwise.py (its NCHW-plane and channels_last kernels).

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
import triton.language as tl
from torch import Tensor

from .._common import (
    ACTIVATION_CODES,
    conv2d_output_hw,
    conv_allows_tf32,
    memory_format,
    stats_dtype,
)
from .depthwise import (
    _INTERPRET,
    _check_planes_fit_int32,
    _configs,
    _gather_nhwc_taps,
    _gather_plane_taps,
    _split_pixel,
    depthwise_conv2d_bwd_input,
    depthwise_conv2d_bwd_weight,
)

# Epilogues (constexpr EPILOGUE) and activations (constexpr ACT) of the kernels.
_STORE = tl.constexpr(0)
_APPLY = tl.constexpr(1)
_STATS = tl.constexpr(2)
_GRAD_STATS = tl.constexpr(3)
_GRAD = tl.constexpr(4)
_GRAD_EVAL = tl.constexpr(5)
_NONE = tl.constexpr(ACTIVATION_CODES["none"])
_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
_RELU6 = tl.constexpr(ACTIVATION_CODES["relu6"])
_SILU = tl.constexpr(ACTIVATION_CODES["silu"])
_HARDSWISH = tl.constexpr(ACTIVATION_CODES["hardswish"])

# Rows of the per-channel coefficient table `coef` [rows, C] the epilogues read.
_SCALE, _SHIFT, _INVSTD, _MEAN, _MEAN_GZ, _MEAN_GZ_XHAT = map(tl.constexpr, range(6))

# Flops per byte at which a pass turns compute-bound (H100/H200-class tensor-core peak over DRAM
# bandwidth; float32 without TF32 and float64 on CUDA cores): `_store_conv_output`'s cost model.
_RIDGE_TENSOR_CORE_16BIT = 200.0
_RIDGE_TF32 = 100.0
_RIDGE_CUDA_CORES = 15.0

# Pointwise weight gradient: at most this many split-K chunks, and partials of about this many
# elements ([chunks, C_out, C_in] float32), which gives ~512 programs of 64x64 tiles.
_WGRAD_MAX_CHUNKS = 1024
_WGRAD_PARTIAL_ELEMENTS = 2**21


# ---------------------------------------------------------------------------------------------
# BatchNorm and activation math: the one place, shared by every kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) as torch computes it: NaN propagates (relu(NaN) = NaN); silu is z / (1 + exp(-z))
    and hardswish z * clamp(z + 3, 0, 6) / 6, both NaN at -inf."""
    if ACT == _RELU:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == _RELU6:
        z = tl.where(z < 0, 0.0, tl.where(z > 6, 6.0, z))
    elif ACT == _SILU:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == _HARDSWISH:
        t = z + 3.0
        z = z * tl.where(t < 0, 0.0, tl.where(t > 6, 6.0, t)) / 6.0
    return z


@triton.jit
def _activation_grad(z, g, ACT: tl.constexpr):
    """g * act'(z), act' as torch's backward kernels define it, ties at a kink and NaN included:
    threshold_backward, hardtanh_backward, silu_backward (s * (1 + z * (1 - s)), s = sigmoid(z))
    and hardswish_backward (0 where z <= -3, z / 3 + 1/2 where z < 3, else 1: also at NaN)."""
    if ACT == _RELU:
        g = tl.where(z <= 0, 0.0, g)
    elif ACT == _RELU6:
        g = tl.where((z <= 0) | (z >= 6), 0.0, g)
    elif ACT == _SILU:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = g * s * (1.0 + z * (1.0 - s))
    elif ACT == _HARDSWISH:
        g = tl.where(z <= -3, 0.0, tl.where(z < 3, g * (z / 3.0 + 0.5), g))
    return g


@triton.jit
def _bn_act_epilogue(
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
    if EPILOGUE == _STORE:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == _APPLY:
        scale = tl.load(coef_ptr + _SCALE * C + chan, mask=chan_mask, other=0.0)
        shift = tl.load(coef_ptr + _SHIFT * C + chan, mask=chan_mask, other=0.0)
        out = _activation(y * scale + shift, ACT)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == _STATS:
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
        g_z = tl.where(mask, _activation_grad(y * scale + shift, g, ACT), 0.0)
        xhat = (y - mean) * invstd
        if EPILOGUE == _GRAD_STATS:
            partial = partial_ptr + block_row * C + chan
            tl.store(partial, tl.sum(g_z, axis=0, keep_dims=True), mask=chan_mask)
            g_z_xhat = tl.sum(g_z * xhat, axis=0, keep_dims=True)
            tl.store(partial + num_block_rows * C, g_z_xhat, mask=chan_mask)
            if STORE_Y:
                tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == _GRAD:
            mean_g_z = tl.load(coef_ptr + _MEAN_GZ * C + chan, mask=chan_mask, other=0.0)
            mean_g_z_xhat = tl.load(coef_ptr + _MEAN_GZ_XHAT * C + chan, mask=chan_mask, other=0.0)
            g_y = scale * (g_z - mean_g_z - xhat * mean_g_z_xhat)
            tl.store(out_ptr + offs, g_y.to(out_ptr.dtype.element_ty), mask=mask)
        else:  # GRAD_EVAL: without the batch statistics' terms, finite where xhat is not
            tl.store(out_ptr + offs, (scale * g_z).to(out_ptr.dtype.element_ty), mask=mask)


# One config: the kernel works in place, so autotuning's repeated launches would corrupt y.
@triton.autotune(
    configs=_configs(gpu=[({"BLOCK": 1024}, 4)], interpret=({"BLOCK": 256}, 4)),
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
    _bn_act_epilogue(
        y, mask, chan, offs, 0, 0, C, out_ptr, go_ptr, coef_ptr, coef_ptr, EPILOGUE, False, ACT
    )


# ---------------------------------------------------------------------------------------------
# Pointwise: GEMM with the epilogue; the weight-gradient GEMM
# ---------------------------------------------------------------------------------------------


# The interpreter's tl.dot multiplies bfloat16 operands as raw integers: widen them there.
_WIDEN_BF16_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _image_strides(P, C, CHANNELS_LAST: tl.constexpr):
    """(pixel stride, channel stride) of an [images, C, P] tensor: NCHW or channels_last."""
    if CHANNELS_LAST:
        return C, 1
    return 1, P


@triton.autotune(
    configs=_configs(
        gpu=[
            ({"BLOCK_N": 64, "BLOCK_K": 32}, 4, 4),
            ({"BLOCK_N": 128, "BLOCK_K": 32}, 4, 3),
            ({"BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
            ({"BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
        ],
        interpret=({"BLOCK_N": 32, "BLOCK_K": 16}, 4, 1),
    ),
    key=["NUM_IMG", "P", "CIN", "COUT", "CHANNELS_LAST", "EPILOGUE", "STORE_Y", "ACT", "IEEE"],
)
@triton.jit
def _pointwise_bn_act_kernel(
    x_ptr,  # [NUM_IMG, CIN, P] in its layout: the input (or g_y for the input gradient)
    w_ptr,  # [COUT, CIN] with strides (sw_out, sw_in)
    out_ptr,  # [NUM_IMG, COUT, P] in x's layout: see _bn_act_epilogue
    go_ptr,  # like out: grad_output (GRAD_STATS, GRAD)
    coef_ptr,  # [rows, COUT] float32 (float64)
    partial_ptr,  # [2, row blocks, COUT] float32 (float64)
    NUM_IMG,
    P,
    CIN,
    COUT,
    sw_out,
    sw_in,
    CHANNELS_LAST: tl.constexpr,
    EPILOGUE: tl.constexpr,
    STORE_Y: tl.constexpr,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Tile [BLOCK_M pixels, BLOCK_N output channels]; 1-D grid, channel blocks fastest so the
    # programs reading the same x rows run together (x re-reads hit L2). channels_last: one image
    # of P = N*H*W pixels, x rows contiguous along CIN; NCHW: NUM_IMG = N images of P = H*W
    # pixels, x contiguous along P. Moves: x read once per channel block (once when COUT <=
    # BLOCK_N), W once per program, out written once (or partials only). A row block (which
    # BLOCK_M the host fixes) is the unit of the partial sums. Offsets are int64.
    n_blocks = tl.cdiv(COUT, BLOCK_N)
    p_blocks = tl.cdiv(P, BLOCK_M)
    pid = tl.program_id(0)
    row_block = (pid // n_blocks).to(tl.int64)
    img = row_block // p_blocks
    p = (row_block % p_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci = tl.arange(0, BLOCK_K)
    p_mask = p < P
    co_mask = co < COUT
    sx_p, sx_c = _image_strides(P, CIN, CHANNELS_LAST)
    x_ptrs = x_ptr + img * CIN * P + p[:, None] * sx_p + ci[None, :].to(tl.int64) * sx_c
    w_ptrs = w_ptr + ci[:, None] * sw_in + co[None, :].to(tl.int64) * sw_out
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, CIN, BLOCK_K):
        k_mask = ci < CIN - k
        x = tl.load(x_ptrs, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & co_mask[None, :], other=0.0)
        acc = _dot(x, w, acc, IEEE)
        x_ptrs += tl.cast(sx_c, tl.int64) * BLOCK_K
        w_ptrs += sw_in * BLOCK_K
    so_p, so_c = _image_strides(P, COUT, CHANNELS_LAST)
    out_offs = img * COUT * P + p[:, None] * so_p + co[None, :].to(tl.int64) * so_c
    _bn_act_epilogue(
        acc,
        p_mask[:, None],
        co[None, :],
        out_offs,
        row_block,
        NUM_IMG * p_blocks,
        COUT,
        out_ptr,
        go_ptr,
        coef_ptr,
        partial_ptr,
        EPILOGUE,
        STORE_Y,
        ACT,
    )


@triton.autotune(
    configs=_configs(
        gpu=[
            ({"BLOCK_CO": 64, "BLOCK_CI": 64}, 4, 3),
            ({"BLOCK_CO": 128, "BLOCK_CI": 64}, 8, 3),
            ({"BLOCK_CO": 64, "BLOCK_CI": 128}, 8, 3),
        ],
        interpret=({"BLOCK_CO": 32, "BLOCK_CI": 32}, 4, 1),
    ),
    key=["NUM_IMG", "P", "CIN", "COUT", "CHANNELS_LAST", "IEEE", "BLOCK_K"],
)
@triton.jit
def _pointwise_wgrad_partial_kernel(
    gy_ptr,  # [NUM_IMG, COUT, P] in its layout: g_y
    x_ptr,  # [NUM_IMG, CIN, P] in the same layout: the input
    partial_ptr,  # [num_chunks, COUT, CIN] float32 (float64)
    NUM_IMG,
    P,
    CIN,
    COUT,
    num_items,
    items_per_chunk,
    CHANNELS_LAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
):
    # Split-K GEMM grad_weight = g_y^T x over all pixels. Grid (COUT x CIN tiles, chunks); an
    # item is BLOCK_K pixels of one image; program (t, k) sums items [k*items_per_chunk, ...) in
    # order into partial[k]. BLOCK_K and the chunking come from the shape alone: the torch sum
    # over chunks afterwards is a fixed-order reduction. Moves: g_y and x read once per tile.
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    ci_blocks = tl.cdiv(CIN, BLOCK_CI)
    co = (tile // ci_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = (tile % ci_blocks) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_mask = co < COUT
    ci_mask = ci < CIN
    sg_p, sg_c = _image_strides(P, COUT, CHANNELS_LAST)
    sx_p, sx_c = _image_strides(P, CIN, CHANNELS_LAST)
    p_blocks = tl.cdiv(P, BLOCK_K)
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=partial_ptr.dtype.element_ty)
    item_end = tl.minimum((chunk + 1) * items_per_chunk, num_items)
    for item in range(chunk * items_per_chunk, item_end):
        img = tl.cast(item // p_blocks, tl.int64)
        p = tl.cast(item % p_blocks, tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        p_mask = p < P
        g = tl.load(
            gy_ptr + img * COUT * P + co[:, None].to(tl.int64) * sg_c + p[None, :] * sg_p,
            mask=co_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + img * CIN * P + p[:, None] * sx_p + ci[None, :].to(tl.int64) * sx_c,
            mask=p_mask[:, None] & ci_mask[None, :],
            other=0.0,
        )
        acc = _dot(g, x, acc, IEEE)
    tl.store(
        partial_ptr + (chunk.to(tl.int64) * COUT + co[:, None]) * CIN + ci[None, :],
        acc,
        mask=co_mask[:, None] & ci_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Depthwise: the tap gather with the epilogue
# ---------------------------------------------------------------------------------------------

_DEPTHWISE_KEY = ["OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W"]
_DEPTHWISE_KEY += ["EPILOGUE", "STORE_Y", "ACT"]


@triton.autotune(
    configs=_configs(gpu=[({}, 4), ({}, 2), ({}, 8)], interpret=({}, 4)),
    key=_DEPTHWISE_KEY + ["BLOCK"],
)
@triton.jit
def _depthwise_bn_act_nchw_kernel(
    x_ptr,  # [N, C, H, W] contiguous
    w_ptr,  # [C, KH * KW] contiguous
    out_ptr,  # [N, C, OH, OW] contiguous: see _bn_act_epilogue
    go_ptr,  # like out: grad_output (GRAD_STATS, GRAD)
    coef_ptr,  # [rows, C] float32 (float64)
    partial_ptr,  # [2, N * cdiv(OH*OW, BLOCK), C] float32 (float64)
    N,
    C,
    H,
    W,
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
    EPILOGUE: tl.constexpr,
    STORE_Y: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # NCHW: as triton_depthwise's NCHW gather: grid over (n*C + c plane, block of BLOCK pixels);
    # a row block is (n, pixel block) of one channel. Moves: x read once from DRAM (taps overlap
    # in L1/L2), out written once (or partials only). In-plane offsets int32, plane bases int64.
    blocks_per_plane = tl.cdiv(OH * OW, BLOCK)
    pid = tl.program_id(0)
    plane = (pid // blocks_per_plane).to(tl.int64)
    block = pid % blocks_per_plane
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < OH * OW
    c = plane % C
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _gather_plane_taps(
        acc,
        x_ptr + plane * H * W,
        w_ptr,
        c,
        offs // OW,
        offs % OW,
        mask,
        H,
        W,
        PAD_H,
        PAD_W,
        KH,
        KW,
        STRIDE_H,
        STRIDE_W,
        DIL_H,
        DIL_W,
        False,
    )
    _bn_act_epilogue(
        acc,
        mask,
        tl.zeros([1], dtype=tl.int64) + c,
        plane * OH * OW + offs,
        (plane // C) * blocks_per_plane + block,
        N * blocks_per_plane,
        C,
        out_ptr,
        go_ptr,
        coef_ptr,
        partial_ptr,
        EPILOGUE,
        STORE_Y,
        ACT,
    )


@triton.autotune(
    configs=_configs(
        gpu=[({"BLOCK_C": 32}, 4), ({"BLOCK_C": 64}, 4), ({"BLOCK_C": 64}, 8)],
        interpret=({"BLOCK_C": 16}, 4),
    ),
    key=["C"] + _DEPTHWISE_KEY + ["BLOCK_P"],
)
@triton.jit
def _depthwise_bn_act_nhwc_kernel(
    x_ptr,  # [N, H, W, C] contiguous (channels_last)
    w_ptr,  # [C, KH * KW] contiguous
    out_ptr,  # [N, OH, OW, C] contiguous (channels_last): see _bn_act_epilogue
    go_ptr,  # like out: grad_output (GRAD_STATS, GRAD)
    coef_ptr,  # [rows, C] float32 (float64)
    partial_ptr,  # [2, cdiv(num_pixels, BLOCK_P), C] float32 (float64)
    num_pixels,
    C,
    H,
    W,
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
    EPILOGUE: tl.constexpr,
    STORE_Y: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Channels_last: as triton_depthwise's channels_last gather: grid over (block of BLOCK_P
    # output pixels of the flat N*OH*OW range, block of BLOCK_C channels), channel blocks
    # fastest; a row block is a pixel block. Moves: x read once from DRAM (taps overlap in
    # L1/L2), out written once (or partials only). All pixel offsets are int64.
    c_blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    block = (pid // c_blocks).to(tl.int64)
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    c_mask = c < C
    p_mask = p < num_pixels
    n, oh, ow = _split_pixel(p, OH, OW)
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc = _gather_nhwc_taps(
        acc,
        x_ptr,
        w_ptr,
        n,
        oh,
        ow,
        p_mask,
        c,
        c_mask,
        C,
        H,
        W,
        PAD_H,
        PAD_W,
        KH,
        KW,
        STRIDE_H,
        STRIDE_W,
        DIL_H,
        DIL_W,
        False,
    )
    _bn_act_epilogue(
        acc,
        p_mask[:, None],
        c[None, :],
        p[:, None] * C + c[None, :],
        block,
        tl.cdiv(num_pixels, BLOCK_P),
        C,
        out_ptr,
        go_ptr,
        coef_ptr,
        partial_ptr,
        EPILOGUE,
        STORE_Y,
        ACT,
    )


# ---------------------------------------------------------------------------------------------
# Host side: the two convolutions behind one interface, and the shared BN passes
# ---------------------------------------------------------------------------------------------


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


def _ieee(dtype: torch.dtype) -> bool:
    """IEEE float32 products unless TF32 is allowed for convolutions (as cuDNN's default)."""
    return dtype == torch.float64 or (
        dtype == torch.float32 and (_INTERPRET or not conv_allows_tf32())
    )


class _FusedConv:
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

    def _pointers(self, out, go, coef, partial):
        # The input stands in for the tensors an epilogue does not touch (it is never written).
        return tuple(self.x if t is None else t for t in (out, go, coef, partial))


class _PointwiseConv(_FusedConv):
    """A 1x1 convolution: weight [C_out, C_in, 1, 1]."""

    def __init__(self, input: Tensor, weight: Tensor):
        super().__init__(input, weight)
        n, self.cin, h, w = self.x.shape
        self.cout = weight.shape[0]
        self.weight_2d = weight.reshape(self.cout, self.cin)
        self.out_shape = (n, self.cout, h, w)
        self.num_img, self.pixels = (1, n * h * w) if self.channels_last else (n, h * w)
        if _INTERPRET:
            self.block = 32
        else:
            self.block = 64 if self.pixels <= 64 else 128
        self.ieee = _ieee(self.x.dtype)

    def conv_flops(self) -> int:
        return 2 * self.num_img * self.pixels * self.cin * self.cout

    def run(self, epilogue, act="none", out=None, go=None, coef=None, partial=None, store_y=False):
        self._gemm(self.x, False, out, epilogue, act, go, coef, partial, store_y)

    def _gemm(
        self, x, transposed, out, epilogue, act, go=None, coef=None, partial=None, store_y=False
    ):
        """out = epilogue(W x), or W^T x when `transposed` (x has C_out channels then)."""
        if out is not None and out.numel() == 0:
            return
        cin, cout = (self.cout, self.cin) if transposed else (self.cin, self.cout)
        w_strides = self.weight_2d.stride()[:: -1 if transposed else 1]
        row_blocks = self.block_rows
        torch.library.wrap_triton(_pointwise_bn_act_kernel)[
            lambda meta: (row_blocks * triton.cdiv(cout, meta["BLOCK_N"]),)
        ](
            x,
            self.weight_2d,
            *self._pointers(out, go, coef, partial),
            self.num_img,
            self.pixels,
            cin,
            cout,
            w_strides[0],
            w_strides[1],
            CHANNELS_LAST=self.channels_last,
            EPILOGUE=epilogue,
            STORE_Y=store_y,
            ACT=ACTIVATION_CODES[act],
            IEEE=self.ieee,
            BLOCK_M=self.block,
        )

    def input_and_weight_grads(self, g_y: Tensor, need_input: bool, need_weight: bool):
        grad_input = grad_weight = None
        if need_input:
            grad_input = torch.empty(
                self.x.shape, device=g_y.device, dtype=g_y.dtype, memory_format=self.fmt
            )
            self._gemm(g_y, True, grad_input, _STORE.value, "none")
        if need_weight:
            grad_weight = self._weight_grad(g_y).to(g_y.dtype).view(self.weight.shape)
        return grad_input, grad_weight

    def _weight_grad(self, g_y: Tensor) -> Tensor:
        """[C_out, C_in] sums over all pixels of g_y * x, in float32 (float64)."""
        acc_dtype = stats_dtype(g_y.dtype)
        block_k = 32 if _INTERPRET else 64
        num_items = self.num_img * triton.cdiv(self.pixels, block_k)
        cin, cout = self.cin, self.cout
        if num_items == 0 or cin * cout == 0:
            return torch.zeros((cout, cin), device=g_y.device, dtype=acc_dtype)
        max_chunks = 2 if _INTERPRET else _WGRAD_MAX_CHUNKS
        chunks = max(1, min(max_chunks, num_items, _WGRAD_PARTIAL_ELEMENTS // (cin * cout)))
        items_per_chunk = triton.cdiv(num_items, chunks)
        num_chunks = triton.cdiv(num_items, items_per_chunk)
        partial = torch.empty((num_chunks, cout, cin), device=g_y.device, dtype=acc_dtype)
        torch.library.wrap_triton(_pointwise_wgrad_partial_kernel)[
            lambda meta: (
                triton.cdiv(cout, meta["BLOCK_CO"]) * triton.cdiv(cin, meta["BLOCK_CI"]),
                num_chunks,
            )
        ](
            g_y,
            self.x,
            partial,
            self.num_img,
            self.pixels,
            cin,
            cout,
            num_items,
            items_per_chunk,
            CHANNELS_LAST=self.channels_last,
            IEEE=self.ieee,
            BLOCK_K=block_k,
        )
        return partial.sum(0)  # a fixed-order reduction over the chunks


class _DepthwiseConv(_FusedConv):
    """A depthwise convolution: weight [C, 1, kH, kW], padding [top, bottom, left, right]."""

    def __init__(self, input: Tensor, weight: Tensor, stride, padding, dilation):
        super().__init__(input, weight)
        self.geometry = (list(stride), list(padding), list(dilation))
        n, c, h, w = self.x.shape
        kh, kw = weight.shape[2:]
        oh, ow = conv2d_output_hw(h, w, (kh, kw), stride, padding, dilation)
        self.out_shape = (n, c, oh, ow)
        if self.channels_last:
            self.num_img, self.pixels = 1, n * oh * ow
            self.block = 32 if _INTERPRET else 64
        else:
            self.num_img, self.pixels = n, oh * ow
            self.block = (
                64 if _INTERPRET else min(512, max(64, triton.next_power_of_2(int(oh * ow))))
            )

    def conv_flops(self) -> int:
        taps = self.weight.shape[2] * self.weight.shape[3]
        return 2 * taps * self.num_img * self.pixels * self.out_shape[1]

    def run(self, epilogue, act="none", out=None, go=None, coef=None, partial=None, store_y=False):
        if self.num_img * self.pixels * self.out_shape[1] == 0:
            return
        _check_planes_fit_int32(self.x.shape, self.out_shape)
        n, c, h, w = self.x.shape
        oh, ow = self.out_shape[2:]
        (stride_h, stride_w), padding, (dil_h, dil_w) = self.geometry
        kh, kw = self.weight.shape[2:]
        options = dict(
            KH=kh,
            KW=kw,
            STRIDE_H=stride_h,
            STRIDE_W=stride_w,
            DIL_H=dil_h,
            DIL_W=dil_w,
            EPILOGUE=epilogue,
            STORE_Y=store_y,
            ACT=ACTIVATION_CODES[act],
        )
        x_and_weight = (self.x, self.weight.reshape(c, kh * kw).contiguous())
        pointers = x_and_weight + self._pointers(out, go, coef, partial)
        if self.channels_last:
            num_pixels = self.pixels
            torch.library.wrap_triton(_depthwise_bn_act_nhwc_kernel)[
                lambda meta: (
                    triton.cdiv(num_pixels, meta["BLOCK_P"]) * triton.cdiv(c, meta["BLOCK_C"]),
                )
            ](
                *pointers,
                num_pixels,
                c,
                h,
                w,
                oh,
                ow,
                padding[0],
                padding[2],
                BLOCK_P=self.block,
                **options,
            )
        else:
            grid = (n * c * triton.cdiv(oh * ow, self.block),)
            torch.library.wrap_triton(_depthwise_bn_act_nchw_kernel)[grid](
                *pointers, n, c, h, w, oh, ow, padding[0], padding[2], BLOCK=self.block, **options
            )

    def input_and_weight_grads(self, g_y: Tensor, need_input: bool, need_weight: bool):
        grad_input = grad_weight = None
        if need_input:
            grad_input = depthwise_conv2d_bwd_input(
                g_y, self.weight, list(self.x.shape), *self.geometry
            ).contiguous(memory_format=self.fmt)  # a no-op unless g_y's layout is ambiguous
        if need_weight:
            grad_weight, _ = depthwise_conv2d_bwd_weight(
                g_y, self.x, list(self.weight.shape[2:]), *self.geometry, False
            )
        return grad_input, grad_weight


def _scale_shift(mean, var, bn_weight, bn_bias, eps):
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


def _elementwise(conv: _FusedConv, epilogue, y: Tensor, coef: Tensor, act: str, go=None) -> None:
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
        CHANNELS_LAST=conv.channels_last,
        EPILOGUE=epilogue,
        ACT=ACTIVATION_CODES[act],
    )


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


def _bn_act_fwd(
    conv: _FusedConv,
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
        conv.run(_STATS.value, out=out if store else None, partial=partial, store_y=store)
        stats = torch.stack(_merge_stats(partial, conv.block_counts(partial)))
        count = out.numel() // out.shape[1]
        _update_running_stats(
            running_mean, running_var, num_batches_tracked, stats[0], stats[1], count, momentum
        )
    else:
        stats = torch.stack([running_mean.to(acc_dtype), running_var.to(acc_dtype)])
    _, scale, shift = _scale_shift(stats[0], stats[1], bn_weight, bn_bias, eps)
    coef = torch.stack([scale, shift])
    if store:
        _elementwise(conv, _APPLY.value, out, coef, act)
    else:
        conv.run(_APPLY.value, act, out=out, coef=coef)
    return out, stats


def _bn_act_bwd(
    conv: _FusedConv, grad_output, bn_weight, bn_bias, stats, training, eps, act, output_mask
):
    """(grad_input, grad_weight, grad_bn_weight, grad_bn_bias), empty [0] where output_mask
    says not wanted: see the module docstring for the passes."""
    need_input, need_weight, need_bn_weight, need_bn_bias = output_mask
    need_conv = need_input or need_weight
    acc_dtype = stats_dtype(grad_output.dtype)
    mean, var = stats.to(acc_dtype)
    invstd, scale, shift = _scale_shift(mean, var, bn_weight, bn_bias, eps)
    coef = [scale, shift, invstd, mean]
    sums = g_y = None
    store = need_conv and conv.store_output()
    if need_bn_weight or need_bn_bias or (need_conv and training):
        partial = grad_output.new_empty((2, conv.block_rows, grad_output.shape[1]), dtype=acc_dtype)
        g_y = conv.new_output() if store else None  # y, then g_y in place
        conv.run(
            _GRAD_STATS.value,
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
        epilogue = _GRAD.value if training else _GRAD_EVAL.value
        if g_y is not None:
            _elementwise(conv, epilogue, g_y, torch.stack(coef), act, go=grad_output)
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


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------


def pointwise_bn_act_fwd(
    input,
    weight,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    num_batches_tracked,
    training,
    momentum,
    eps,
    activation,
):
    return _bn_act_fwd(
        _PointwiseConv(input, weight),
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        momentum,
        eps,
        activation,
    )


def pointwise_bn_act_bwd(
    grad_output, input, weight, bn_weight, bn_bias, stats, training, eps, activation, output_mask
):
    conv = _PointwiseConv(input, weight)
    return _bn_act_bwd(
        conv,
        grad_output.contiguous(memory_format=conv.fmt),
        bn_weight,
        bn_bias,
        stats,
        training,
        eps,
        activation,
        output_mask,
    )


def depthwise_bn_act_fwd(
    input,
    weight,
    stride,
    padding,
    dilation,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    num_batches_tracked,
    training,
    momentum,
    eps,
    activation,
):
    return _bn_act_fwd(
        _DepthwiseConv(input, weight, stride, padding, dilation),
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        momentum,
        eps,
        activation,
    )


def depthwise_bn_act_bwd(
    grad_output,
    input,
    weight,
    stride,
    padding,
    dilation,
    bn_weight,
    bn_bias,
    stats,
    training,
    eps,
    activation,
    output_mask,
):
    conv = _DepthwiseConv(input, weight, stride, padding, dilation)
    return _bn_act_bwd(
        conv,
        grad_output.contiguous(memory_format=conv.fmt),
        bn_weight,
        bn_bias,
        stats,
        training,
        eps,
        activation,
        output_mask,
    )
