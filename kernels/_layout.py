"""The memory-format rule shared by every kernel and fake: ATen's Tensor.suggest_memory_format()."""

import torch
from torch import Tensor


def memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor with NHWC-like strides, else contiguous_format, exactly as
    the C++ kernels decide (torch._prims_common has this from torch 2.12; older releases have
    only the stride test)."""
    suggest = getattr(torch._prims_common, "suggest_memory_format", None)
    if suggest is not None:
        return suggest(t)
    strides_like_cl = torch._prims_common.are_strides_like_channels_last(t.shape, t.stride())
    return torch.channels_last if t.dim() == 4 and strides_like_cl else torch.contiguous_format
