"""Loads the two compiled backends: kernels._C (the "native" C++/CUDA kernels, registered by its
import) and kernels/triton/ (the "triton" kernels). Neither is needed by the other backends: when
one cannot load, the reason is kept for `available_backends` and given in one warning. Only a
missing or unusable Triton is tolerated that way; a project Triton module that fails to import is
a bug, and its error propagates."""

import importlib
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which kernels._C links against)

from . import _ops

_FIX_NATIVE = (
    "rebuild it against the installed torch: `make build` in a checkout, or "
    "`pip install --no-build-isolation --no-deps -e .`"
)


def _warn(reason: str, consequence: str) -> None:
    warnings.warn(f"depsep: {reason}; {consequence}", RuntimeWarning, stacklevel=4)


def _load_native() -> str | None:
    try:
        importlib.import_module("kernels._C")
    except Exception as exc:  # a missing, stale or foreign-ABI .so raises many kinds of errors
        reason = f"kernels._C failed to load ({type(exc).__name__}: {exc})"
        _warn(reason, f"the 'native' backend is unavailable. To fix it, {_FIX_NATIVE}.")
        return reason
    return None


def _load_triton() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # not installed, or a Triton that fails to initialise
        reason = f"Triton is not usable ({type(exc).__name__}: {exc})"
        _warn(reason, "the 'triton' backend is unavailable.")
        return reason
    importlib.import_module("kernels.triton")  # registers the Triton ops
    _ops.add_triton_ops()
    return None


# None when the backend loaded, else why not. Evaluated once, at `import kernels`.
NATIVE_ERROR = _load_native()
TRITON_ERROR = _load_triton()
