"""MobileNet V1 and its depthwise-separable block.

`mobilenet.reference` holds the plain-PyTorch block and model of SPEC §3 (the user's seed): the
structure, names and state_dict keys that the drop-in fast layers must reproduce, and the
baseline of the benchmarks.
"""

from . import reference

__all__ = ["reference"]
