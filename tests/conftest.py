import os
import sys

import pytest

from tinycnn.backend import gpu_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, os.path.join(ROOT, "examples"))  # week2_model lives beside the example that uses it

_GPU_PROBLEM = gpu_problem()
GPU = pytest.param(
    "gpu",
    marks=[pytest.mark.gpu, pytest.mark.skipif(_GPU_PROBLEM is not None, reason=f"no GPU backend: {_GPU_PROBLEM}")],
)
DEVICES = ["cpu", GPU]


@pytest.fixture(params=DEVICES)
def device(request):
    """Backend-parametrized tests run on NumPy everywhere and on CuPy where a GPU exists."""
    return request.param


def to_host(array):
    from tinycnn.backend import to_numpy

    return to_numpy(array)
