"""The package as users get it: the wheel's contents and metadata, an install outside the checkout
that trains, numba's cache when the installed package cannot be written to, and tests that run
against the installed copy rather than the checkout."""
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

import pytest

import tinycnn

from conftest import ROOT, install_kind

WHEEL_NAME = f"tinycnn-{tinycnn.__version__}-py3-none-any.whl"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel CI built (dist/), or one built now with pip (an isolated build: needs the index)."""
    built = os.path.join(ROOT, "dist", WHEEL_NAME)
    if os.path.exists(built):
        return built
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), ROOT],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"no wheel in dist/ and pip could not build one: {proc.stderr.strip()[-300:]}")
    return str(out / WHEEL_NAME)


def test_the_wheel_holds_the_package_its_license_and_complete_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(f"tinycnn-{tinycnn.__version__}.dist-info/METADATA").decode()
    sources = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tinycnn", "**", "*.py"), recursive=True)}
    assert sources <= set(names), sorted(sources - set(names))  # every module, the generated kernels included
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/", "docs/"))]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta and f"Version: {tinycnn.__version__}" in meta
    for field in ("Summary:", "Requires-Python: >=3.11", "Requires-Dist: numpy", "Requires-Dist: numba",
                  "Classifier: Programming Language :: Python :: 3", "Description-Content-Type: text/markdown"):
        assert field in meta, field
    for extra in ("gpu", "keras", "onnx", "distributed", "plot", "tensorboard", "test", "docs"):
        assert f"Provides-Extra: {extra}" in meta, extra
    assert "Project-URL" not in meta  # none exists yet; none is invented


def installed_copy():
    """Whether pip installed tinycnn as a copy from a wheel or a directory (its record says so, PEP 610),
    not as the editable checkout. A setuptools build's tinycnn.egg-info in the checkout is no install."""
    for dist in importlib.metadata.distributions(name="tinycnn"):
        direct = dist.read_text("direct_url.json")
        if direct and not json.loads(direct).get("dir_info", {}).get("editable"):
            return True
    return False


def test_the_tests_run_against_the_installed_package():
    checkout = os.path.realpath(os.path.join(ROOT, "tinycnn"))
    if install_kind() == "checkout":
        # Fine for pip install -e; a copy installed beside it but shadowed by the checkout is not.
        assert not installed_copy(), ("tinycnn is installed as a copy, but the tests imported the checkout's "
                                      "sources (run pytest, not python -m pytest, from the checkout)")
        pytest.skip("tinycnn is installed editable: the tests run the checkout's sources")
    probe = subprocess.run([sys.executable, "-c", "import tinycnn; print(tinycnn.__file__)"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert os.path.dirname(os.path.realpath(probe.stdout.strip())) != checkout, \
        "a subprocess in the checkout imports its sources"


def fresh_venv(where, wheel):
    """A new virtual environment at `where` with the wheel installed (no dependencies from the index:
    a .pth file lends it this environment's NumPy and numba, after its own site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", where], check=True, timeout=120)
    python = os.path.join(where, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "lent_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, wheel],
                   check=True, capture_output=True, timeout=300)
    return python, os.path.join(site, "tinycnn")


FIRST_STEP = """
import time, json, numpy as np, tinycnn as tc
from tinycnn import layers as L
started = time.perf_counter()
model = tc.Sequential([L.Conv2D(8, 3, activation="relu", input_shape=(12, 12, 1)), L.BatchNormalization(),
                       L.MaxPooling2D(2), L.Dropout(0.1), L.GlobalAveragePooling2D(), L.Dense(3, activation="softmax")],
                      device="cpu", seed=0)
model.compile("adam", "categorical_crossentropy")
x = np.random.default_rng(0).random((64, 12, 12, 1), dtype=np.float32)
model.train_on_batch(x, np.eye(3, dtype=np.float32)[np.arange(64) % 3])
print(json.dumps({"seconds": time.perf_counter() - started, "module": tc.__file__}))
"""


def read_only(command, package):
    """`command`, run so that it cannot write to `package`: the file modes do that for a user; root
    writes through any mode, so for root the command runs in a mount namespace where the package
    is bind-mounted read-only (skipped where that is not allowed)."""
    if os.geteuid() != 0:
        return command
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", script + " 2>/dev/null", package, "true"],
                           capture_output=True, timeout=60) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make the installed package read-only")
    return ["unshare", "-m", "sh", "-c", script, package] + command


def test_installed_outside_the_checkout_it_trains_and_numba_caches_elsewhere_when_it_cannot_write(wheel):
    base = tempfile.mkdtemp(prefix="tinycnn-install-")
    try:
        python, package = fresh_venv(os.path.join(base, "venv"), wheel)
        home = os.path.join(base, "home")
        os.makedirs(home)
        for folder, dirs, files in os.walk(package):  # the installed package becomes read-only
            for name in dirs + files:
                os.chmod(os.path.join(folder, name), 0o555 if name in dirs else 0o444)
        os.chmod(package, 0o555)
        command = read_only([python, "-c", FIRST_STEP], package)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("NUMBA_CACHE", "PYTHON"))}
        env.update(HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"))
        runs = []
        for _ in range(2):
            proc = subprocess.run(command, cwd=base, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        assert runs[0]["module"].startswith(package)  # the installed copy, not the checkout
        assert not glob.glob(os.path.join(package, "**", "*.nbi"), recursive=True)  # nothing written beside it
        index_files = glob.glob(os.path.join(home, ".cache", "numba", "**", "*.nbi"), recursive=True)
        assert index_files, "numba kept no cache in the user's cache directory"
        assert runs[1]["seconds"] < 5.0 and runs[1]["seconds"] < runs[0]["seconds"] / 3, runs  # the cache was used
        print(f"first step: {runs[0]['seconds']:.1f} s compiling, {runs[1]['seconds']:.2f} s from the cache")
    finally:
        for folder, dirs, _ in os.walk(base):
            os.chmod(folder, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_the_week2_example_runs_one_short_epoch_from_an_install_outside_the_checkout(wheel, tmp_path):
    python, package = fresh_venv(str(tmp_path / "venv"), wheel)
    example = os.path.join(ROOT, "examples", "week2_mnist.py")
    proc = subprocess.run([python, example, "--device", "cpu", "--epochs", "1", "--train-limit", "512",
                           "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Total params: 12,516" in proc.stdout and "Epoch 1/1" in proc.stdout
    assert json.loads((tmp_path / "run" / "history.json").read_text())["epochs"][0]["epoch"] == 1


def test_twine_accepts_the_wheel_and_the_sdist(wheel):
    pytest.importorskip("twine", reason="twine checks the metadata (pip install twine)")
    sdist = os.path.join(os.path.dirname(wheel), f"tinycnn-{tinycnn.__version__}.tar.gz")
    if not os.path.exists(sdist):
        pytest.skip("no sdist beside the wheel: python -m build writes both to dist/")
    files = [wheel, sdist]
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *files], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == len(files)
