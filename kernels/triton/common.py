"""What every Triton kernel of the package shares: the launch configs (one fixed config under the
interpreter, the first only without autotuning), the tap index math of the depthwise kernels, the
kernel-geometry constexprs, the int32 plane check, and the activations with their gradients (the
one Triton place of their math, selected by the ``ACT`` constexpr; codes from
kernels._common.ACTIVATION_CODES, as csrc/common/activation.h).

A leaf of kernels/triton/: it imports no other module of the package.
"""

import os

import torch
import triton
import triton.language as tl

from .._common import ACTIVATION_CODES, conv_allows_tf32

# Under the interpreter every program instance costs ~25 ms: one fixed config, no benchmarking.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# DEPSEP_TRITON_AUTOTUNE=0 keeps the first GPU config instead of benchmarking them all, so a
# test suite of many shapes compiles each kernel once (the benchmarks autotune).
AUTOTUNE = os.environ.get("DEPSEP_TRITON_AUTOTUNE", "1") != "0"

_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
_RELU6 = tl.constexpr(ACTIVATION_CODES["relu6"])
_SILU = tl.constexpr(ACTIVATION_CODES["silu"])
_HARDSWISH = tl.constexpr(ACTIVATION_CODES["hardswish"])


def configs(gpu, interpret):
    """Autotune candidates: `gpu` on a GPU (only its first without autotuning), the single
    `interpret` config under the interpreter. Each is (kwargs, num_warps[, num_stages])."""
    chosen = [interpret] if INTERPRET else gpu if AUTOTUNE else gpu[:1]
    return [triton.Config(*config) for config in chosen]


def autotune_by_layout(kernel, key: list[str], nchw, channels_last) -> dict:
    """{channels_last: `kernel` autotuned over that layout's candidates}: `nchw` and
    `channels_last` are each configs()'s (gpu, interpret); channels_last also keys on C."""
    return {
        False: triton.autotune(configs=configs(*nchw), key=key)(kernel),
        True: triton.autotune(configs=configs(*channels_last), key=["C"] + key)(kernel),
    }


def geometry(kernel_size, stride: list[int], dilation: list[int]) -> dict:
    """The constexpr kernel-geometry arguments of the depthwise kernels."""
    return dict(
        KH=kernel_size[0],
        KW=kernel_size[1],
        STRIDE_H=stride[0],
        STRIDE_W=stride[1],
        DIL_H=dilation[0],
        DIL_W=dilation[1],
    )


def check_planes_fit_int32(*shapes):
    """In-plane offsets and the flat-pixel decode are int32 in the depthwise kernels."""
    for shape in shapes:
        torch._check(
            shape[-2] * shape[-1] < 2**31,
            lambda shape=shape: (
                f"depthwise_conv2d (triton): spatial plane {list(shape[-2:])} has "
                "2**31 or more elements"
            ),
        )


@triton.jit
def tap_source(
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
def split_pixel(p, OH, OW):
    """Flat output pixel index over [N, OH, OW] -> (n, oh, ow)."""
    n = p // (OH * OW)
    r = p - n * (OH * OW)
    oh = r // OW
    return n, oh, r - oh * OW


def dot_is_ieee(dtype: torch.dtype) -> bool:
    """The IEEE constexpr of `dot` for operands of `dtype`: float64 always; float32 unless TF32
    is allowed for convolutions (as cuDNN decides, kernels._common.conv_allows_tf32; never
    under the interpreter); float16/bfloat16 multiply exactly on the tensor cores anyway."""
    return dtype == torch.float64 or (
        dtype == torch.float32 and (INTERPRET or not conv_allows_tf32())
    )


# The interpreter's tl.dot multiplies bfloat16 operands as raw integers: widen them there.
_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b by tl.dot, in IEEE precision where IEEE (see dot_is_ieee), else tl.dot's
    default (TF32 for float32 operands)."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def activation(z, ACT: tl.constexpr):
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
def activation_grad(z, g, ACT: tl.constexpr):
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
