import os
import subprocess
import sys

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import backend as B


def test_cpu_backend_is_numpy_with_fast_kernels_by_default(monkeypatch):
    monkeypatch.delenv("TINYCNN_KERNELS", raising=False)
    monkeypatch.delenv("TINYCNN_CONV", raising=False)
    cpu = B.get_backend("cpu")
    assert cpu.xp is np and cpu.name == "cpu"
    assert cpu.kernels.name == "cpu" and cpu.kernels.conv == "auto"
    text = cpu.describe()
    assert "cpu" in text and "convolutions: auto (direct; im2col + GEMM from 64 channels" in text
    assert "numba threads" in text
    assert "OpenMP idle policy" in text and "malloc tuning" in text


def test_settings_come_from_the_environment_and_name_the_variable(monkeypatch):
    monkeypatch.setenv("TINYCNN_KERNELS", "reference")
    monkeypatch.setenv("TINYCNN_CONV", "gemm")
    monkeypatch.setenv("TINYCNN_NUMBA_THREADS", "1")
    settings = tc.config.settings()
    assert (settings.kernels, settings.conv, settings.numba_threads) == ("reference", "gemm", 1)
    assert B.get_backend("cpu").kernels.name == "reference"
    for variable, value, expected in [("TINYCNN_KERNELS", "turbo", "'fast', 'reference'"),
                                      ("TINYCNN_CONV", "winograd", "'auto', 'direct', 'gemm'"),
                                      ("TINYCNN_NUMBA_THREADS", "two", "a positive integer"),
                                      ("TINYCNN_MALLOC_TUNING", "maybe", "1 or 0")]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(tc.ConfigError, match=f"{variable} must be .*{expected}.*got '{value}'"):
            tc.config.settings()
        monkeypatch.delenv(variable)


def test_scoped_settings_override_the_environment_and_end_with_the_block(monkeypatch):
    monkeypatch.setenv("TINYCNN_CONV", "gemm")
    with tc.config.using(conv="direct"):
        assert tc.config.settings().conv == "direct"
        assert B.get_backend("cpu").kernels.conv == "direct"
        with tc.config.using(kernels="reference"):
            assert tc.config.settings().kernels == "reference" and tc.config.settings().conv == "direct"
    assert tc.config.settings().conv == "gemm"
    with pytest.raises(tc.ConfigError, match="setting 'conv' must be one of 'auto', 'direct', 'gemm', got 'fft'"):
        with tc.config.using(conv="fft"):
            pass
    with pytest.raises(tc.ConfigError, match="unknown setting 'threads'"):
        with tc.config.using(threads=2):
            pass


def test_device_from_environment(monkeypatch):
    monkeypatch.setenv("TINYCNN_DEVICE", "cpu")
    assert B.get_backend().name == "cpu"
    monkeypatch.setenv("TINYCNN_DEVICE", "tpu")
    with pytest.raises(B.DeviceError, match="TINYCNN_DEVICE must be one of 'auto', 'cpu', 'gpu', got 'tpu'"):
        B.get_backend()


def test_unknown_device_names_the_choices():
    with pytest.raises(tc.DeviceError, match="'auto', 'cpu', 'gpu'"):
        tc.Sequential([tc.layers.Dense(2, input_shape=(3,))], device="cuda:0")
    assert issubclass(tc.DeviceError, tc.ConfigError)  # one error type for every setting


@pytest.mark.skipif(B.gpu_problem() is None, reason="a GPU is available here")
def test_gpu_request_without_gpu_says_what_is_missing_and_how_to_install():
    with pytest.raises(tc.DeviceError) as info:
        B.get_backend("gpu")
    message = str(info.value)
    assert "device='gpu' is unavailable" in message
    assert ("CuPy is not installed" in message and 'pip install "tinycnn[gpu]"' in message) or "CUDA" in message


# -- the GPU probe, against a stand-in CuPy (tests/cuda_shim.py) that works or fails as told ----------------
@pytest.fixture
def stand_in_cupy(monkeypatch):
    """Installs a stand-in CuPy as the backend's and returns it; the probe's memory is reset."""
    import cuda_shim

    if cuda_shim.CXX is None:
        pytest.skip("needs a C++ compiler (g++) to run the probe's CUDA kernel")
    fake = cuda_shim.fake_cupy()
    monkeypatch.setattr(B, "cupy", fake)
    monkeypatch.setattr(B, "_probed", {})
    monkeypatch.setattr(B, "_fallback_noticed", False)
    monkeypatch.setattr(B, "_BACKENDS", {})
    return fake


def test_probe_accepts_a_gpu_that_compiles_launches_and_multiplies(stand_in_cupy):
    assert B.gpu_problem() is None


def _no_nvrtc(code, **_):
    raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: cannot open shared object file")


def test_probe_says_nvrtc_is_missing_and_auto_falls_back_with_one_line(stand_in_cupy, monkeypatch, capsys):
    monkeypatch.setattr(stand_in_cupy, "RawModule", _no_nvrtc)
    problem = B.gpu_problem()
    assert "cannot compile CUDA kernels" in problem and "libnvrtc.so.12" in problem
    assert 'pip install "tinycnn[gpu]"' in problem
    with pytest.raises(tc.DeviceError, match="device='gpu' is unavailable: CuPy cannot compile"):
        B.get_backend("gpu")
    assert B.get_backend("auto").name == "cpu"
    assert B.get_backend("auto").name == "cpu"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tinycnn: device='auto' runs on the CPU: {problem}"]  # once, one line


def test_probe_catches_a_kernel_that_computes_nothing(stand_in_cupy, monkeypatch):
    class Silent:
        def __init__(self, code, **_):
            pass

        def get_function(self, name):
            return lambda grid, block, args: None

    monkeypatch.setattr(stand_in_cupy, "RawModule", Silent)
    monkeypatch.setattr(stand_in_cupy, "empty", np.zeros)
    assert B.gpu_problem() == "a test kernel ran on the GPU but computed wrong values"


def test_probe_names_cublas_when_matmul_fails(stand_in_cupy, monkeypatch):
    class NoBlas(np.ndarray):
        def __matmul__(self, other):
            raise RuntimeError("libcublas.so.12 not found")

    monkeypatch.setattr(stand_in_cupy, "asarray", lambda a: np.asarray(a).view(NoBlas))
    problem = B.gpu_problem()
    assert "cannot multiply matrices (cuBLAS" in problem and "libcublas.so.12" in problem


def test_probe_without_a_visible_gpu(stand_in_cupy, monkeypatch):
    monkeypatch.setattr(stand_in_cupy.cuda.runtime, "getDeviceCount", lambda: 0)
    assert B.gpu_problem() == "CuPy is installed but no CUDA GPU is visible"


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


def test_unknown_convolution_algorithm_is_named_on_first_use():
    env = {**os.environ, "TINYCNN_CONV": "winograd"}
    out = subprocess.run([sys.executable, "-c", "import tinycnn; tinycnn.get_backend('cpu')"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "tinycnn.errors.ConfigError: TINYCNN_CONV must be one of 'auto', 'direct', 'gemm', got 'winograd'" in out.stderr


def test_importing_tinycnn_changes_nothing_in_the_process():
    """Process-wide CPU tuning happens when the first CPU backend is made, not at import."""
    code = ("import os, tinycnn, tinycnn.kernels.cpu; before = os.environ.get('GOMP_SPINCOUNT'); "
            "b = tinycnn.get_backend('cpu'); "
            "print(before, os.environ.get('GOMP_SPINCOUNT'), b.tuning['spin'])")
    env = {key: v for key, v in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "1000", "GOMP_SPINCOUNT=1000", "(tinycnn's", "default)"]
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split()[:3] == ["None", "None", "OMP_WAIT_POLICY=PASSIVE"]


def test_a_first_run_says_it_is_compiling_and_a_cached_run_says_nothing(tmp_path):
    """numba compiles a kernel on a cache miss only: the notice comes then, once, and not when the
    next process loads the kernel from the cache."""
    from tinycnn.kernels import compile_notice

    code = ("import numpy as np, tinycnn; k = tinycnn.get_backend('cpu').kernels; "
            "y = np.ones((1 << 16,), np.float32); k.relu_backward(y, y); k.relu_backward(y, y); print('ran')")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0 and run.stdout.strip() == "ran", run.stderr
    assert runs[0].stderr.count(compile_notice.MESSAGE) == 1
    assert compile_notice.MESSAGE not in runs[1].stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the compile helper needs a second usable CPU")
def test_a_first_training_step_compiles_the_filter_gradient_in_a_helper_process(tmp_path):
    """On a cold numba cache a training step starts a helper process that compiles the direct
    convolution's filter gradient (tinycnn.kernels.precompile): the step then loads it from the
    cache (a hit) instead of compiling it (a miss), as it does with the helper switched off."""
    code = ("import numpy as np, tinycnn as tc; from tinycnn.kernels import cpu_conv; "
            "m = tc.Sequential([tc.layers.Conv2D(16, 3, input_shape=(8, 8, 3)), tc.layers.GlobalAveragePooling2D(), "
            "tc.layers.Dense(2, activation='softmax')], device='cpu', seed=0); "
            "m.compile('adam', 'categorical_crossentropy'); "
            "m.train_on_batch(np.ones((64, 8, 8, 3), np.float32), np.eye(2, dtype=np.float32)[[0, 1] * 32]); "
            "s = cpu_conv.filter_grad_dispatchers()[1].stats; "  # the serial twin: a split batch's
            "print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))")
    decoy = tmp_path / "cwd" / "tinycnn"  # another tinycnn where the process runs: the helper must not import it
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the helper imported the tinycnn of its working directory')\n")
    runs = {}
    for helper in (True, False):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / f"numba-{helper}")}
        env.pop("TINYCNN_PRECOMPILE_HELPER", None)
        if not helper:
            env["TINYCNN_PRECOMPILE_HELPER"] = "1"  # what the helper itself has set: it starts none
        run = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True,
                             timeout=600, cwd=decoy.parent)
        assert run.returncode == 0, run.stderr
        runs[helper] = run.stdout.split()
    assert runs[True] == ["1", "0"] and runs[False] == ["0", "1"], runs
