"""The pure-PyTorch reference of every op: the "torch" backend and the oracle of every test."""

import torch.nn.functional as F
from torch import Tensor


def depthwise_conv(
    input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> Tensor:
    """F.conv2d with one group per channel; padding as F.conv2d takes it (ints, "same", "valid")."""
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])


def pointwise_conv(input: Tensor, weight: Tensor) -> Tensor:
    """The 1x1 convolution of the fused pointwise op (no bias)."""
    return F.conv2d(input, weight)


def apply_activation(x: Tensor, name: str) -> Tensor:
    """The fused ops' activations by their op name: "relu", "relu6", "silu", "hardswish" or
    "none"."""
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    if name == "silu":
        return F.silu(x)
    if name == "hardswish":
        return F.hardswish(x)
    return x


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The running-average factor of a training step, as nn.BatchNorm2d derives it: counts the
    batch in num_batches_tracked (when given), and momentum=None means a cumulative average."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else float(momentum)


def bn_act(
    conv_out: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str,
) -> Tensor:
    """BatchNorm and activation after a convolution, as eager PyTorch runs them (F.batch_norm
    updates the running statistics in place when training)."""
    factor = momentum_factor(momentum, num_batches_tracked) if training else 0.0
    y = F.batch_norm(conv_out, running_mean, running_var, bn_weight, bn_bias, training, factor, eps)
    return apply_activation(y, activation)
