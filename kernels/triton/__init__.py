"""The "triton" backend: Triton kernels for every op, registered under "depsep::triton_<op>" with
the ops' schemas (kernels/_ops.py). Imported by kernels/_loaders.py when Triton is installed."""

from .. import _ops
from . import depthwise, fused

_IMPLEMENTATIONS = {
    "depthwise_conv2d_fwd": depthwise.depthwise_conv2d_fwd,
    "depthwise_conv2d_bwd_input": depthwise.depthwise_conv2d_bwd_input,
    "depthwise_conv2d_bwd_weight": depthwise.depthwise_conv2d_bwd_weight,
    "pointwise_bn_act_fwd": fused.pointwise_bn_act_fwd,
    "pointwise_bn_act_bwd": fused.pointwise_bn_act_bwd,
    "depthwise_bn_act_fwd": fused.depthwise_bn_act_fwd,
    "depthwise_bn_act_bwd": fused.depthwise_bn_act_bwd,
}
for _name, _implementation in _IMPLEMENTATIONS.items():
    _ops.define_triton_op(_name, _implementation)
