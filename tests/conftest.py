"""Test set-up: without a GPU, Triton kernels run on CPU tensors under the interpreter, which
must be switched on before triton is first imported (i.e. before `import kernels`). With a GPU,
Triton kernels use one config instead of autotuning each of the many test shapes."""

import os

import pytest
import torch

if torch.cuda.is_available():
    os.environ.setdefault("DEPSEP_TRITON_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
