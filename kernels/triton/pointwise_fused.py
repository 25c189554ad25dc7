"""Triton fused 1x1 convolution + BatchNorm + activation, train and eval: the ops
``depsep::triton_pointwise_bn_act_fwd`` / ``_bwd`` (schemas as the native ones, kernels/_ops.py),
as csrc/fused's pointwise GEMM.

The 1x1 convolution is a tensor-core GEMM (tl.dot; float16/bfloat16 operands, float32 accumulate;
float32 in TF32 when convolutions may use TF32, as cuDNN decides (kernels._common.conv_allows_tf32),
else IEEE; float64 IEEE) whose tiles go to bn_epilogue.bn_act_epilogue; bn_passes.py runs the
passes. channels_last is one [M = N*H*W, Cin] x [Cin, Cout] product, NCHW one [HW, Cin] x
[Cin, Cout] product per image (x read along HW): the kernels address both by strides. The input
gradient is the same GEMM with the weight transposed and the STORE epilogue; the weight gradient a
split-K GEMM with a fixed-order reduction over its chunks.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._common import ACTIVATION_CODES, stats_dtype
from .bn_epilogue import STORE, bn_act_epilogue
from .bn_passes import FusedConv, bn_act_bwd, bn_act_fwd
from .common import INTERPRET, configs, dot, dot_is_ieee

# Weight gradient: at most this many split-K chunks, and partials of about this many elements
# ([chunks, C_out, C_in] float32), which gives ~512 programs of 64x64 tiles.
_WGRAD_MAX_CHUNKS = 1024
_WGRAD_PARTIAL_ELEMENTS = 2**21


@triton.jit
def _image_strides(P, C, CHANNELS_LAST: tl.constexpr):
    """(pixel stride, channel stride) of an [images, C, P] tensor: NCHW or channels_last."""
    if CHANNELS_LAST:
        return C, 1
    return 1, P


@triton.autotune(
    configs=configs(
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
    out_ptr,  # [NUM_IMG, COUT, P] in x's layout: see bn_epilogue.bn_act_epilogue
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
        acc = dot(x, w, acc, IEEE)
        x_ptrs += tl.cast(sx_c, tl.int64) * BLOCK_K
        w_ptrs += sw_in * BLOCK_K
    so_p, so_c = _image_strides(P, COUT, CHANNELS_LAST)
    out_offs = img * COUT * P + p[:, None] * so_p + co[None, :].to(tl.int64) * so_c
    bn_act_epilogue(
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
    configs=configs(
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
        acc = dot(g, x, acc, IEEE)
    tl.store(
        partial_ptr + (chunk.to(tl.int64) * COUT + co[:, None]) * CIN + ci[None, :],
        acc,
        mask=co_mask[:, None] & ci_mask[None, :],
    )


class _PointwiseConv(FusedConv):
    """A 1x1 convolution: weight [C_out, C_in, 1, 1]."""

    def __init__(self, input: Tensor, weight: Tensor):
        super().__init__(input, weight)
        n, self.cin, h, w = self.x.shape
        self.cout = weight.shape[0]
        self.weight_2d = weight.reshape(self.cout, self.cin)
        self.out_shape = (n, self.cout, h, w)
        self.num_img, self.pixels = (1, n * h * w) if self.channels_last else (n, h * w)
        if INTERPRET:
            self.block = 32
        else:
            self.block = 64 if self.pixels <= 64 else 128
        self.ieee = dot_is_ieee(self.x.dtype)

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
            *self.epilogue_pointers(out, go, coef, partial),
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
            self._gemm(g_y, True, grad_input, STORE.value, "none")
        if need_weight:
            grad_weight = self._weight_grad(g_y).to(g_y.dtype).view(self.weight.shape)
        return grad_input, grad_weight

    def _weight_grad(self, g_y: Tensor) -> Tensor:
        """[C_out, C_in] sums over all pixels of g_y * x, in float32 (float64)."""
        acc_dtype = stats_dtype(g_y.dtype)
        block_k = 32 if INTERPRET else 64
        num_items = self.num_img * triton.cdiv(self.pixels, block_k)
        cin, cout = self.cin, self.cout
        if num_items == 0 or cin * cout == 0:
            return torch.zeros((cout, cin), device=g_y.device, dtype=acc_dtype)
        max_chunks = 2 if INTERPRET else _WGRAD_MAX_CHUNKS
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


# The ops: kernels._ops.define_triton_op gives each its OpSignatures signature.


def pointwise_bn_act_fwd(input, weight, *bn_and_options):
    return bn_act_fwd(_PointwiseConv(input, weight), *bn_and_options)


def pointwise_bn_act_bwd(grad_output, input, weight, *bn_and_options):
    conv = _PointwiseConv(input, weight)
    return bn_act_bwd(conv, grad_output.contiguous(memory_format=conv.fmt), *bn_and_options)
