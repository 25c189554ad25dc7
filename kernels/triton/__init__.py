"""The "triton" backend: Triton kernels for every op, registered under "depsep::triton_<op>" with
the ops' schemas (kernels/_ops.py). Imported by kernels/_loaders.py when Triton is installed.

The package mirrors csrc/: common.py (shared helpers and the activations), depthwise_gather.py
and depthwise_wgrad.py (the depthwise kernels), depthwise.py (the depthwise ops), bn_epilogue.py
(the BatchNorm + activation epilogue), bn_passes.py (the BN passes: store or recompute),
pointwise_fused.py and depthwise_fused.py (the fused ops), block_eval.py (the one-pass
depthwise-separable block in eval)."""

from .. import _ops
from . import block_eval, depthwise, depthwise_fused, pointwise_fused

_IMPLEMENTATIONS = {
    "depthwise_conv2d_fwd": depthwise.depthwise_conv2d_fwd,
    "depthwise_conv2d_bwd_input": depthwise.depthwise_conv2d_bwd_input,
    "depthwise_conv2d_bwd_weight": depthwise.depthwise_conv2d_bwd_weight,
    "pointwise_bn_act_fwd": pointwise_fused.pointwise_bn_act_fwd,
    "pointwise_bn_act_bwd": pointwise_fused.pointwise_bn_act_bwd,
    "depthwise_bn_act_fwd": depthwise_fused.depthwise_bn_act_fwd,
    "depthwise_bn_act_bwd": depthwise_fused.depthwise_bn_act_bwd,
    "depthwise_pointwise_eval": block_eval.depthwise_pointwise_eval,
}
for _name, _implementation in _IMPLEMENTATIONS.items():
    _ops.define_triton_op(_name, _implementation)
