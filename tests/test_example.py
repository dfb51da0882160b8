"""The Week2 example end to end on a few hundred images (MNIST from the cache or the registry)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinycnn.backend import gpu_problem
from conftest import DATA, ROOT

EXAMPLE = os.path.join(ROOT, "examples", "week2_mnist.py")


def run(*args):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True, timeout=600)


def test_summary_flag_prints_the_seed_table():
    result = run("--summary", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(DATA, "week2_summary.txt")) as f:
        assert result.stdout == f.read()


@pytest.mark.skipif(gpu_problem() is None, reason="a GPU is available here")
def test_gpu_without_gpu_is_one_line_and_exit_2():
    result = run("--device", "gpu", "--summary")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "device='gpu' is unavailable" in lines[0]


def test_short_run_writes_everything_and_resume_matches_an_uninterrupted_run(tmp_path):
    common = ["--device", "cpu", "--train-limit", "256", "--batch-size", "64", "--seed", "3"]
    straight = tmp_path / "straight"
    r = run(*common, "--epochs", "2", "--out", str(straight))
    assert r.returncode == 0, r.stderr
    for name in ("log.txt", "history.json", "weights.npz", "checkpoint.npz"):
        assert (straight / name).exists(), name
    history = json.loads((straight / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert history["epochs"][1]["lr"] == 0.002274450341167551
    log = (straight / "log.txt").read_text()
    assert "Epoch 00002: LearningRateScheduler setting learning rate to 0.002274450341167551." in log
    assert "256/256 [==============================]" in log and "\r" not in log

    resumed = tmp_path / "resumed"
    assert run(*common, "--epochs", "1", "--out", str(resumed)).returncode == 0
    r = run(*common, "--epochs", "2", "--out", str(resumed), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch 1" in r.stdout
    with np.load(straight / "weights.npz") as a, np.load(resumed / "weights.npz") as b:
        assert a.files == b.files
        for key in a.files:
            if key != "__meta__":
                assert np.array_equal(a[key], b[key]), key
    def metrics(entries):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in entries]

    resumed_history = json.loads((resumed / "history.json").read_text())
    assert metrics(resumed_history["epochs"]) == metrics(history["epochs"])


FASHION = os.path.join(ROOT, "examples", "fashion_mnist_resnet.py")


def test_fashion_example_prints_a_graph_summary_and_trains(tmp_path):
    summary = subprocess.run([sys.executable, FASHION, "--summary", "--device", "cpu"], capture_output=True, text=True,
                             timeout=600)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert lines[0] == 'Model: "fashion_resnet"' and "Connected to" in lines[2]
    add = lines.index(next(l for l in lines if l.startswith("block1_add (Add)")))
    assert lines[add].rstrip().endswith("stem_pool[0][0]") and lines[add + 1].strip() == "block1_bn2[0][0]"
    assert "Total params: 112,682" in lines
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, FASHION, "--device", "cpu", "--epochs", "1", "--train-limit", "512",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr  # a short run does not judge the target
    for name in ("log.txt", "history.json", "weights.npz", "checkpoint.npz"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert history["train_samples"] == 512 and len(history["epochs"]) == 1 and history["target"] == 0.92
    assert "target 92% within 1 epochs: NOT MET" in result.stdout


def test_the_example_can_write_an_onnx_file_beside_its_weights(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason='needs onnx and onnxruntime: pip install "tinycnn[onnx]"')
    out = tmp_path / "run"
    r = run("--device", "cpu", "--train-limit", "256", "--batch-size", "64", "--epochs", "1", "--onnx", "--out", str(out))
    assert r.returncode == 0, r.stderr
    session = ort.InferenceSession(str(out / "week2.onnx"), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 28, 28, 1), np.float32)})[0]
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


# -- careless command lines: argparse's usage line and exit 2, never a traceback --------------------------------
BAD_FLAGS = [
    (["--train-limit", "0"], "--train-limit: expected an integer >= 1, got '0'"),
    (["--train-limit", "-5"], "--train-limit: expected an integer >= 1"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--batch-size", "2.7"], "--batch-size: expected an integer >= 1, got '2.7'"),
    (["--epochs", "-1"], "--epochs: expected an integer >= 0"),
    (["--seed", "x"], "--seed: expected an integer >= 0, got 'x'"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags(flags, message):
    r = run(*flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_resume_refuses_other_settings_and_damaged_checkpoints(tmp_path):
    common = ["--device", "cpu", "--train-limit", "128", "--batch-size", "64", "--seed", "3"]
    out = tmp_path / "run"
    assert run(*common, "--epochs", "1", "--out", str(out)).returncode == 0
    checkpoint = out / "checkpoint.npz"
    good = checkpoint.read_bytes()

    def resume(*changed):
        flags = dict(zip(common[::2], common[1::2]))
        flags.update(dict(zip(changed[::2], changed[1::2])))
        r = run(*[x for pair in flags.items() for x in pair], "--epochs", "2", "--out", str(out), "--resume")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert checkpoint.exists()  # a refused resume keeps the work done so far
        return r.stderr

    assert "seed=3 in the checkpoint, 4 now" in resume("--seed", "4")
    assert "batch_size=64 in the checkpoint, 32 now" in resume("--batch-size", "32")
    assert "train_samples=128 in the checkpoint, 64 now" in resume("--train-limit", "64")
    checkpoint.write_bytes(good[: len(good) // 2])
    assert "cannot resume" in resume() and "corrupt or truncated" in resume()
    checkpoint.write_bytes((out / "weights.npz").read_bytes())
    assert "holds weights only" in resume()


def test_out_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run("--device", "cpu", "--train-limit", "64", "--epochs", "1", "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "cannot write results to" in r.stderr and "Traceback" not in r.stderr, r.stderr
