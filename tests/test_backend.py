import os
import subprocess
import sys

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import backend as B


def test_cpu_backend_is_numpy_with_fast_kernels_by_default(monkeypatch):
    monkeypatch.delenv("TINYCNN_KERNELS", raising=False)
    cpu = B.get_backend("cpu")
    assert cpu.xp is np and cpu.name == "cpu"
    assert cpu.kernels.__name__ == "cpu-fast"
    assert "cpu" in cpu.describe()


def test_reference_kernels_by_environment(monkeypatch):
    monkeypatch.setenv("TINYCNN_KERNELS", "reference")
    from tinycnn import kernels_reference

    assert B.get_backend("cpu").kernels.im2col is kernels_reference.im2col
    monkeypatch.setenv("TINYCNN_KERNELS", "turbo")
    with pytest.raises(B.DeviceError, match="TINYCNN_KERNELS"):
        B.get_backend("cpu")


def test_device_from_environment(monkeypatch):
    monkeypatch.setenv("TINYCNN_DEVICE", "cpu")
    assert B.get_backend().name == "cpu"
    monkeypatch.setenv("TINYCNN_DEVICE", "tpu")
    with pytest.raises(B.DeviceError, match="unknown device 'tpu'"):
        B.get_backend()


def test_unknown_device_names_the_choices():
    with pytest.raises(tc.DeviceError, match="choose one of auto, cpu, gpu"):
        tc.Sequential([tc.layers.Dense(2, input_shape=(3,))], device="cuda:0")


@pytest.mark.skipif(B.gpu_problem() is None, reason="a GPU is available here")
def test_gpu_request_without_gpu_says_what_is_missing_and_how_to_install():
    with pytest.raises(tc.DeviceError) as info:
        B.get_backend("gpu")
    message = str(info.value)
    assert "device='gpu' is unavailable" in message
    assert ("CuPy is not installed" in message and 'pip install "tinycnn[gpu]"' in message) or "CUDA" in message


def test_auto_falls_back_to_cpu_without_gpu():
    expected = "gpu" if B.gpu_problem() is None else "cpu"
    assert B.get_backend("auto").name == expected


def test_to_numpy_and_array_module(device):
    be = B.get_backend(device)
    a = be.asarray(np.arange(6, dtype=np.float32))
    assert B.get_array_module(a) is be.xp
    assert isinstance(B.to_numpy(a), np.ndarray)


def test_seeded_randomness_is_reproducible(device):
    be = B.get_backend(device)
    a = B.to_numpy(be.random_generator(3).random(10))
    b = B.to_numpy(be.random_generator(3).random(10))
    c = B.to_numpy(be.random_generator(4).random(10))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_permutation_is_a_seeded_shuffle(device):
    be = B.get_backend(device)
    p = B.to_numpy(be.permutation(1000, 5))
    assert sorted(p) == list(range(1000))
    assert np.array_equal(p, B.to_numpy(be.permutation(1000, 5)))
    assert not np.array_equal(p, B.to_numpy(be.permutation(1000, 6)))
    assert np.abs(p - np.arange(1000)).mean() > 200  # really shuffled


def test_unknown_convolution_algorithm_is_named():
    env = {**os.environ, "TINYCNN_CONV": "winograd"}
    out = subprocess.run([sys.executable, "-c", "import tinycnn.kernels_cpu"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "TINYCNN_CONV must be 'direct' or 'gemm', got 'winograd'" in out.stderr
