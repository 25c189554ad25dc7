"""The pure-PyTorch reference of every op: the "torch" backend and the oracle of every test."""

import torch.nn.functional as F
from torch import Tensor


def depthwise_conv2d(
    input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation
) -> Tensor:
    """F.conv2d with one group per channel; padding as F.conv2d takes it (ints, "same", "valid")."""
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])
