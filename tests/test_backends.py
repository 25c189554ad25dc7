"""Backend choice, the DEPSEP_BACKEND override, and an import that survives a broken _C."""

import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import _backend

from .common import skip_unless_cuda_build


def test_available_backends_reports_reasons():
    cpu = kernels.available_backends("cpu")
    assert set(cpu) == {"torch", "native", "triton"}
    assert cpu["torch"] is None
    assert cpu["native"] is None, cpu["native"]
    meta = kernels.available_backends("meta")
    assert "cpu and cuda only" in meta["native"]


def test_auto_takes_the_measured_fastest(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.select_backend(None, torch.device("cpu")) == "torch"  # oneDNN, for now
    assert _backend.select_backend(None, torch.device("meta")) == "torch"
    # Fused ops in eval fold BN into the convolution: native is the faster there.
    assert _backend.select_backend(None, torch.device("cpu"), fused_eval=True) == "native"
    if torch.cuda.is_available():
        assert _backend.select_backend(None, torch.device("cuda")) == "native"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _backend.select_backend(None, torch.device("cpu")) == "torch"
    assert _backend.select_backend("native", torch.device("cpu")) == "native"
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DEPSEP_BACKEND"):
        _backend.select_backend(None, torch.device("cpu"))


def test_unavailable_backend_names_what_is_missing(monkeypatch):
    # Availability is computed once per device type: recompute it without the interpreter.
    monkeypatch.setattr(_backend, "_TRITON_INTERPRET", False)
    monkeypatch.setitem(_backend._REASONS, "cpu", _backend._compute_reasons("cpu"))
    try:
        with pytest.raises(RuntimeError, match="triton.*TRITON_INTERPRET"):
            _backend.select_backend("triton", torch.device("cpu"))
        with pytest.raises(RuntimeError, match="native.*cpu and cuda only"):
            _backend.select_backend("native", torch.device("meta"))
    finally:
        _backend._REASONS.pop("meta", None)


@pytest.mark.skipif(skip_unless_cuda_build(), reason="torch without CUDA or CPU-only build asked")
def test_build_registers_cpu_and_cuda_kernels():
    """CI has no GPU but compiles the CUDA sources: the CUDA kernels must be registered."""
    for op in ("depthwise_conv2d_fwd", "depthwise_conv2d_bwd_input", "depthwise_conv2d_bwd_weight"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"depsep::{op}", "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"depsep::{op}", "CUDA"), op


def _run_with_blocked_module(module: str, error: str, body: str) -> subprocess.CompletedProcess:
    """Runs `body` in a fresh interpreter where importing `module` raises ModuleNotFoundError."""
    script = textwrap.dedent(
        f"""
        import sys, warnings
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    raise ModuleNotFoundError({error!r})
        sys.meta_path.insert(0, Broken())
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180
    )


def test_import_survives_a_broken_extension():
    """A _C that cannot load gives one warning; the torch backend keeps working."""
    result = _run_with_blocked_module(
        "kernels._C",
        "undefined symbol: _ZN3c104impl8GPUTrace",
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kernels
        import torch
        assert len([w for w in caught if "kernels._C failed to load" in str(w.message)]) == 1
        assert "undefined symbol" in kernels.available_backends("cpu")["native"]
        out = kernels.depthwise_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3))
        assert out.shape == (1, 2, 2, 2)
        try:
            kernels.depthwise_conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 1, 3, 3),
                                     backend="native")
        except RuntimeError as e:
            assert "kernels._C failed to load" in str(e)
        else:
            raise AssertionError("native ran without _C")
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_survives_a_missing_triton():
    """Without Triton: one warning, the triton backend says why, the others keep working."""
    result = _run_with_blocked_module(
        "triton",
        "No module named 'triton'",
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kernels
        import torch
        assert len([w for w in caught if "Triton is not usable" in str(w.message)]) == 1
        assert "No module named 'triton'" in kernels.available_backends("cpu")["triton"]
        x = torch.randn(1, 2, 4, 4)
        out = kernels.depthwise_conv2d(x, torch.randn(2, 1, 3, 3), backend="native")
        assert out.shape == (1, 2, 2, 2)
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_broken_triton_module_fails_the_import():
    """Triton installed but a project Triton module broken is a bug, not a missing backend: the
    import fails (so the test run fails) rather than turning the Triton tests into skips."""
    result = _run_with_blocked_module(
        "kernels.triton.pointwise_fused",
        "a bug in kernels/triton",
        """
        import kernels
        """,
    )
    assert result.returncode != 0
    assert "a bug in kernels/triton" in result.stderr
