"""depsep-kernels: fast depthwise-separable convolution ops for PyTorch.

Backends: "torch" (the reference), "native" (kernels._C: C++ on CPU, CUDA C++ on GPU) and
"triton". Importing never fails for want of the compiled extension or of Triton: the missing
backend is reported by `available_backends` and by a warning.
"""

from . import _loaders  # noqa: F401  (loads kernels._C and the Triton kernels)
from ._backend import BACKENDS, available_backends
from .functional import (
    BnActStage,
    bn_act_chain,
    depthwise_bn_act,
    depthwise_conv2d,
    pointwise_bn_act,
)

__all__ = [
    "BACKENDS",
    "BnActStage",
    "available_backends",
    "bn_act_chain",
    "depthwise_bn_act",
    "depthwise_conv2d",
    "pointwise_bn_act",
]
