"""The pure-PyTorch reference of every op: the "torch" backend and the oracle of every test."""

import torch.nn.functional as F
from torch import Tensor


def depthwise_conv2d(
    input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> Tensor:
    """F.conv2d with one group per channel; padding as F.conv2d takes it (ints, "same", "valid")."""
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])


def activation(x: Tensor, name: str) -> Tensor:
    """The fused ops' activations by name: "relu", "relu6" or "none"."""
    if name == "relu":
        return F.relu(x)
    if name == "relu6":
        return F.hardtanh(x, 0.0, 6.0)
    return x


def conv_bn_act(
    conv_out: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    act: str,
) -> Tensor:
    """BatchNorm and activation after a convolution, as eager PyTorch runs them (F.batch_norm
    updates the running statistics in place when training)."""
    y = F.batch_norm(
        conv_out, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps
    )
    return activation(y, act)
