"""Test set-up: without a GPU, Triton kernels run on CPU tensors under the interpreter, which
must be switched on before triton is first imported (i.e. before `import kernels`). With a GPU,
Triton kernels use one config instead of autotuning each of the many test shapes. float32 runs in
IEEE precision unless a test asks for TF32 (tests/common.py float32_precision): the tests judge
float32 results by float32's accuracy, which TF32 (a 10-bit mantissa) does not reach."""

import os

import pytest
import torch

if torch.cuda.is_available():
    os.environ.setdefault("DEPSEP_TRITON_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def ieee_float32():
    from .common import float32_precision

    with float32_precision("ieee"):
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
