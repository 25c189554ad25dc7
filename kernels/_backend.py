"""Backend choice: the one function that decides which implementation runs an op."""

import os

import torch

from . import _loaders, _ops

BACKENDS = ("torch", "native", "triton")
# Auto picks the first available backend of its device type's list: the fastest first, as the
# benchmarks measured them. On CPU oneDNN still beats the native depthwise loops and the fused
# ops' training passes (bench/results/2026-11-29-cpu: depthwise 0.83x forward, 0.72x backward;
# fused forward+backward 0.38-0.61x), so "torch" comes first. GPU order is unmeasured so far:
# the compiled kernels first.
_AUTO_ORDER = {"cpu": ("torch", "native"), "cuda": ("native", "triton", "torch")}
# In eval the native CPU fused ops (the convolution, then one BN + activation pass) beat eager
# conv + BatchNorm2d + ReLU (bench, 2026-12-02: 1.22x depthwise, 1.42x pointwise).
_AUTO_ORDER_FUSED_EVAL = {**_AUTO_ORDER, "cpu": ("native", "torch")}
ENV_VAR = "DEPSEP_BACKEND"
# Read once, like Triton itself, which only honours it when set before its import.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _native_unavailable(device_type: str) -> str | None:
    if _loaders.NATIVE_ERROR is not None:
        return _loaders.NATIVE_ERROR
    if device_type not in ("cpu", "cuda"):
        return f"no native kernels for {device_type} tensors (cpu and cuda only)"
    if device_type == "cuda" and not _ops.has_native_kernel("CUDA"):
        return (
            "kernels._C was built without CUDA kernels (torch without CUDA, no nvcc, or "
            "DEPSEP_SKIP_CUDA_BUILD=1 at build time)"
        )
    return None


def _triton_unavailable(device_type: str) -> str | None:
    if _loaders.TRITON_ERROR is not None:
        return _loaders.TRITON_ERROR
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if _TRITON_INTERPRET:
            return None
        return (
            "Triton needs CUDA tensors; CPU tensors run only under the Triton interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported; for tests)"
        )
    return f"no Triton kernels for {device_type} tensors"


def _compute_reasons(device_type: str) -> dict[str, str | None]:
    return {
        "torch": None,
        "native": _native_unavailable(device_type),
        "triton": _triton_unavailable(device_type),
    }


# What can run depends on the device type and the build only: computed once per type, at import
# for the device types the kernels serve (so that torch.compile never traces the cache filling).
_REASONS = {device_type: _compute_reasons(device_type) for device_type in ("cpu", "cuda")}


def _reasons(device_type: str) -> dict[str, str | None]:
    reasons = _REASONS.get(device_type)
    if reasons is None:
        reasons = _REASONS[device_type] = _compute_reasons(device_type)
    return reasons


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Each backend's name mapped to None when it can run on `device`, else to the reason why
    not (a missing or CPU-only build, Triton not installed, CPU tensors for Triton, ...)."""
    return dict(_reasons(torch.device(device).type))


def _check_name(name, source: str) -> None:
    # A test-only OpSet (kernels._ops.host_program_ops) is chosen by its OPS key too.
    if name not in BACKENDS and name not in _ops.OPS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {name!r}")


def _fastest(device_type: str, fused_eval: bool) -> str:
    order = (_AUTO_ORDER_FUSED_EVAL if fused_eval else _AUTO_ORDER).get(device_type, ("torch",))
    reasons = _reasons(device_type)
    return next(name for name in order if reasons[name] is None)


# The auto choice by (device type, fused_eval), which depends on the build only: computed at
# import, as _REASONS is (a model's every layer asks for it on every call).
_FASTEST = {(t, f): _fastest(t, f) for t in ("cpu", "cuda") for f in (False, True)}


def select_backend(backend: str | None, device: torch.device, fused_eval: bool = False) -> str:
    """The backend to run on `device`: `backend` if given (an error naming what is missing when
    it cannot run there), else $DEPSEP_BACKEND if set, else the fastest available for the
    device (see _AUTO_ORDER; `fused_eval`: a fused conv+BN+act op in eval mode)."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        if backend is None:
            device_type = device.type
            fastest = _FASTEST.get((device_type, fused_eval))
            return fastest if fastest is not None else _fastest(device_type, fused_eval)
        _check_name(backend, f"${ENV_VAR}")
    else:
        _check_name(backend, "backend")
    reason = _reasons(device.type).get(backend)
    if reason is not None:
        raise RuntimeError(f"depsep: backend {backend!r} cannot run on {device}: {reason}")
    return backend
