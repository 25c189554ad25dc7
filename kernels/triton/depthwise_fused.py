"""Triton fused depthwise convolution + BatchNorm + activation, train and eval: the ops
``depsep::triton_depthwise_bn_act_fwd`` / ``_bwd`` (schemas as the native ones, kernels/_ops.py).

The convolution is the depthwise tap gather (depthwise_gather.py) with the BN epilogue in place of
the plain store, over row blocks of a fixed number of pixels; bn_passes.py runs the passes. The
convolution's own gradients are the plain depthwise ops' (depthwise.py).
"""

import triton
from torch import Tensor

from .._common import conv2d_output_hw
from .bn_passes import FusedConv, bn_act_bwd, bn_act_fwd
from .common import INTERPRET
from .depthwise import depthwise_conv2d_bwd_input, depthwise_conv2d_bwd_weight
from .depthwise_gather import gather_bn_act


class _DepthwiseConv(FusedConv):
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
            self.block = 32 if INTERPRET else 64
        else:
            self.num_img, self.pixels = n, oh * ow
            if INTERPRET:
                self.block = 64
            else:
                self.block = min(512, max(64, triton.next_power_of_2(int(oh * ow))))

    def conv_flops(self) -> int:
        taps = self.weight.shape[2] * self.weight.shape[3]
        return 2 * taps * self.num_img * self.pixels * self.out_shape[1]

    def run(self, epilogue, act="none", out=None, go=None, coef=None, partial=None, store_y=False):
        stride, padding, dilation = self.geometry
        gather_bn_act(
            self.x,
            self.weight,
            self.out_shape,
            self.epilogue_pointers(out, go, coef, partial),
            self.block,
            self.block_rows,
            self.channels_last,
            padding,
            stride,
            dilation,
            epilogue,
            store_y,
            act,
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


# The ops: kernels._ops.define_triton_op gives each its OpSignatures signature.


def depthwise_bn_act_fwd(input, weight, stride, padding, dilation, *bn_and_options):
    return bn_act_fwd(_DepthwiseConv(input, weight, stride, padding, dilation), *bn_and_options)


def depthwise_bn_act_bwd(grad_output, input, weight, stride, padding, dilation, *bn_and_options):
    conv = _DepthwiseConv(input, weight, stride, padding, dilation)
    return bn_act_bwd(conv, grad_output.contiguous(memory_format=conv.fmt), *bn_and_options)
