import os
import sys

import pytest

from tinycnn.backend import gpu_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def install_kind():
    """"checkout" when the tinycnn under test is this checkout's sources (pip install -e, or run
    from the source tree), "installed" when it is a copy in site-packages (a wheel, pip install .)."""
    import tinycnn

    here = os.path.dirname(os.path.realpath(tinycnn.__file__))
    return "checkout" if here == os.path.realpath(os.path.join(ROOT, "tinycnn")) else "installed"


if install_kind() == "installed":
    # Test the installed copy, never the checkout beside it: a subprocess started here (python -c,
    # python -m) must not put the working directory, the checkout, in front of site-packages.
    os.environ["PYTHONSAFEPATH"] = "1"
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
