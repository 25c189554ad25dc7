"""Triton one-pass depthwise-separable block in eval: the op
``depsep::triton_depthwise_pointwise_eval`` (schema as the native one, kernels/_ops.py), as
csrc/fused/block_eval_cpu.cpp is the CPU's.

out = pw_act(BN_pw(conv1x1(dw_act(BN_dw(depthwise(x)))))), each BN with its running statistics
folded into a per-channel scale and shift (bn_passes.scale_shift, as the fused ops fold it in
eval), in float32 (float64 for float64 input).

One kernel. A program owns a tile of BLOCK_M output pixels (rows of the NHWC view of the output,
the flat N*OH*OW range) by BLOCK_N output channels and loops over the input channels in chunks of
BLOCK_K: for each chunk it computes the depthwise output tile [BLOCK_M, BLOCK_K] with the tap
gather of the depthwise kernels (depthwise_gather.tap_gather: the KH x KW taps, stride, padding,
dilation, zero outside the input), applies BN_dw and dw_act in registers (bn_epilogue.bn_act),
and accumulates its product with the 1x1 weight tile [BLOCK_K, BLOCK_N] by tl.dot (the
pointwise GEMM's operands and precision: common.dot, common.dot_is_ieee; the depthwise tile is
rounded to the input dtype first, as the two fused ops store it). After the chunks, the APPLY
epilogue (BN_pw, pw_act) stores the tile. The input and the output are addressed by their
strides (NCHW, channels_last or any other), so nothing is copied; the output has the input's
memory format.

Bytes moved: the input read once per output-channel block (ceil(C_out / BLOCK_N) times; the
grid runs a pixel block's channel blocks side by side, so the repeats and the taps' overlapping
halo mostly hit L2/L1), the weights and the folded BN vectors (each program reads the depthwise
weights and its [C, BLOCK_N] slice of the 1x1 weight), and one write of the output. The
depthwise output never goes to memory: the two fused ops write it and read it back, 2 x its
bytes more. The price is recomputing the depthwise tile for each output-channel block, KH*KW /
BLOCK_N of the 1x1's multiply-adds per block, on CUDA cores beside the tensor cores' GEMM: cheap
against a round trip to DRAM of an activation as large as the block's input (stride 1).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _validate
from .._common import ACTIVATION_CODES, conv2d_output_hw, memory_format, stats_dtype
from .bn_epilogue import APPLY, bn_act, bn_act_epilogue
from .bn_passes import scale_shift
from .common import configs, dot, dot_is_ieee, geometry, split_pixel
from .depthwise_gather import tap_gather

_OP = "depthwise_pointwise_eval (triton)"


@triton.autotune(
    configs=configs(
        # Within the registers on sm_90 (ptxas, 3x3 and 5x3 taps, both layouts): float16 to
        # float32 spill at most 16 bytes a thread; float64 ~200 in the 2nd, 3rd and 4th.
        gpu=[
            ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 2),
            ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, 8, 2),
            ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, 8, 2),
            ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, 4, 2),
            ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, 4, 2),
            ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, 4, 2),
        ],
        # Tiles that small test shapes still split along every axis.
        interpret=({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, 4, 1),
    ),
    key=[
        "num_pixels",
        "C",
        "C_OUT",
        "OH",
        "OW",
        "sx_c",
        "so_c",
        "KH",
        "KW",
        "STRIDE_H",
        "STRIDE_W",
        "DIL_H",
        "DIL_W",
        "DW_ACT",
        "PW_ACT",
        "IEEE",
    ],
)
@triton.jit
def _block_eval_kernel(
    x_ptr,  # [N, C, H, W] with strides (sx_n, sx_c, X_ROW * sx_w, sx_w)
    dw_w_ptr,  # [C, KH * KW] contiguous
    dw_coef_ptr,  # [2, C] float32 (float64): BN_dw's scale, shift
    pw_w_ptr,  # [C_OUT, C] with strides (sw_out, sw_in)
    pw_coef_ptr,  # [2, C_OUT] float32 (float64): BN_pw's scale, shift
    out_ptr,  # [N, C_OUT, OH, OW] with strides (so_n, so_c, so_h, so_w)
    num_pixels,  # N * OH * OW
    C,
    C_OUT,
    H,
    W,
    OH,
    OW,
    PAD_H,
    PAD_W,
    sx_n,
    sx_c,
    X_ROW,
    sx_w,
    so_n,
    so_c,
    so_h,
    so_w,
    sw_out,
    sw_in,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    DW_ACT: tl.constexpr,
    PW_ACT: tl.constexpr,
    IEEE: tl.constexpr,
    PIXELS_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid over (pixel block, output-channel block), channel blocks fastest: the programs
    # that read the same input pixels run together. The flat pixel index is decoded in int32
    # unless PIXELS_INT64 (a 64-bit division per pixel costs ~1 KiB of spilled registers a
    # thread); every offset is int64.
    n_blocks = tl.cdiv(C_OUT, BLOCK_N)
    pid = tl.program_id(0)
    p = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    if PIXELS_INT64:
        p = p.to(tl.int64)
    co = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = p < num_pixels
    co_mask = co < C_OUT
    n, oh, ow = split_pixel(p, OH, OW)
    n, oh, ow = n.to(tl.int64), oh.to(tl.int64), ow.to(tl.int64)
    if x_ptr.dtype.element_ty == tl.float64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    # The tap gather's pixel arguments: [BLOCK_M, 1] columns (its channel ones are rows), the
    # pixel's image by pointer.
    tap_oh, tap_ow, tap_rows = oh[:, None], ow[:, None], p_mask[:, None]
    x_image = x_ptr + (n * sx_n)[:, None]
    pw_cols = co[None, :].to(tl.int64) * sw_out
    for k in range(0, C, BLOCK_K):
        c = k + tl.arange(0, BLOCK_K)
        c_mask = c < C
        dw = tap_gather(
            tl.zeros([BLOCK_M, BLOCK_K], dtype=acc_dtype),
            x_image,
            dw_w_ptr,
            tap_oh,
            tap_ow,
            tap_rows,
            0,
            X_ROW,
            sx_w,
            (c.to(tl.int64) * sx_c)[None, :],
            (c * (KH * KW))[None, :],
            c_mask[None, :],
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
        # Channels past C: zero weights and zero BN vectors give act(0) = 0 for every activation.
        a = bn_act(dw, c[None, :], c_mask[None, :], C, dw_coef_ptr, DW_ACT)
        w = tl.load(
            pw_w_ptr + c[:, None].to(tl.int64) * sw_in + pw_cols,
            mask=c_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        acc = dot(a.to(w.dtype), w, acc, IEEE)
    out_rows = n * so_n + oh * so_h + ow * so_w
    bn_act_epilogue(
        acc,
        p_mask[:, None],
        co[None, :],
        out_rows[:, None] + co[None, :].to(tl.int64) * so_c,
        0,
        0,
        C_OUT,
        out_ptr,
        out_ptr,  # grad_output: not read by APPLY
        pw_coef_ptr,
        pw_coef_ptr,  # partials: not written by APPLY
        APPLY,
        False,
        PW_ACT,
    )


def _pixel_rows(x: Tensor) -> tuple[Tensor, int]:
    """(x, pixels per row): the kernel addresses a pixel of an image as (ih * row + iw) times
    the column stride (tap_gather), which NCHW, channels_last and most views of them (sliced
    rows or channels) are; any other strides are copied to x's memory format first."""
    stride_h, stride_w = x.stride(2), x.stride(3)
    if stride_w == 0 or stride_h % stride_w:
        x = x.contiguous(memory_format=memory_format(x))
        stride_h, stride_w = x.stride(2), x.stride(3)
    return x, stride_h // stride_w


def _folded_bn(running_mean, running_var, bn_weight, bn_bias, eps, acc_dtype) -> Tensor:
    """[2, C] BN in eval as the fused ops fold it: scale, shift in the accumulation dtype."""
    mean, var = running_mean.to(acc_dtype), running_var.to(acc_dtype)
    _, scale, shift = scale_shift(mean, var, bn_weight, bn_bias, eps)
    return torch.stack([scale, shift])


# The op: kernels._ops.define_triton_op gives it its OpSignatures signature.


def depthwise_pointwise_eval(
    input,
    dw_weight,
    stride,
    padding,
    dilation,
    dw_bn_weight,
    dw_bn_bias,
    dw_running_mean,
    dw_running_var,
    dw_eps,
    dw_activation,
    pw_weight,
    pw_bn_weight,
    pw_bn_bias,
    pw_running_mean,
    pw_running_var,
    pw_eps,
    pw_activation,
):
    dw_bn = (dw_running_mean, dw_running_var, dw_bn_weight, dw_bn_bias)
    pw_bn = (pw_running_mean, pw_running_var, pw_bn_weight, pw_bn_bias)
    _validate.depthwise_pointwise_eval_args(
        _OP,
        *(input, dw_weight, stride, padding, dilation, dw_bn, dw_eps, dw_activation),
        *(pw_weight, pw_bn, pw_eps, pw_activation),
    )
    N, C, H, W = input.shape
    kh, kw = dw_weight.shape[2:]
    c_out = pw_weight.shape[0]
    oh, ow = conv2d_output_hw(H, W, (kh, kw), stride, padding, dilation)
    out = torch.empty(
        (N, c_out, oh, ow),
        device=input.device,
        dtype=input.dtype,
        memory_format=memory_format(input),
    )
    num_pixels = N * oh * ow
    if num_pixels == 0:
        return out
    x, x_row = _pixel_rows(input)
    acc_dtype = stats_dtype(input.dtype)
    dw_coef = _folded_bn(*dw_bn, dw_eps, acc_dtype)
    pw_coef = _folded_bn(*pw_bn, pw_eps, acc_dtype)
    pw_2d = pw_weight.reshape(c_out, C)
    torch.library.wrap_triton(_block_eval_kernel)[
        lambda meta: (
            triton.cdiv(num_pixels, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),
        )
    ](
        x,
        dw_weight.reshape(C, kh * kw).contiguous(),
        dw_coef,
        pw_2d,
        pw_coef,
        out,
        num_pixels,
        C,
        c_out,
        H,
        W,
        oh,
        ow,
        padding[0],
        padding[2],
        x.stride(0),
        x.stride(1),
        x_row,
        x.stride(3),
        *out.stride(),
        *pw_2d.stride(),
        **geometry((kh, kw), stride, dilation),
        DW_ACT=ACTIVATION_CODES[dw_activation],
        PW_ACT=ACTIVATION_CODES[pw_activation],
        IEEE=dot_is_ieee(input.dtype),
        # p = pixel block * BLOCK_M + lane stays below num_pixels + 128.
        PIXELS_INT64=num_pixels > 2**31 - 1 - 128,
    )
    return out
