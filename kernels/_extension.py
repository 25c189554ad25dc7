"""Loads the compiled extension kernels._C, whose import registers the "native" C++/CUDA
kernels. Failure is not fatal: the "torch" and "triton" backends keep working, and the reason is
kept for `available_backends` and for one warning."""

import importlib
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which kernels._C links against)

_FIX = (
    "rebuild it against the installed torch: `make build` in a checkout, or "
    "`pip install --no-build-isolation --no-deps -e .`"
)


def _load():
    try:
        importlib.import_module("kernels._C")
    except Exception as exc:  # a missing, stale or foreign-ABI .so raises many kinds of errors
        reason = f"kernels._C failed to load ({type(exc).__name__}: {exc})"
        warnings.warn(
            f"depsep: {reason}; the 'native' backend is unavailable. To fix it, {_FIX}.",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason
    return None


# None when the extension loaded, else why not. Evaluated once, at `import kernels`.
LOAD_ERROR = _load()
