"""fit's share processes (tinycnn.share_process): a split batch's second share trained in a forked
worker gives the thread split's results bit for bit, and a failure on either side ends cleanly."""
import os
import signal

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L
from tinycnn import share_process
from tinycnn.errors import ShareProcessError
from tinycnn.training import Trainer

pytest.importorskip("numba", reason="share processes run the numba kernels")
pytestmark = pytest.mark.skipif(share_process.usable() is not None, reason=str(share_process.usable()))


def small_model(seed=3):
    layers = [L.Conv2D(8, 3, activation="relu", use_bias=False, input_shape=(10, 10, 2)), L.BatchNormalization(),
              L.Dropout(0.3), L.MaxPooling2D(2), L.Conv2D(12, 3, activation="relu"), L.BatchNormalization(),
              L.Dropout(0.2), L.GlobalAveragePooling2D(), L.Dense(5, activation="softmax")]
    model = tc.Sequential(layers, device="cpu", seed=seed)
    model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
    return model


def data(n=330):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 10, 10, 2)).astype(np.float32), np.eye(5, dtype=np.float32)[rng.integers(0, 5, n)]


@pytest.fixture
def forks(monkeypatch):
    """The pid of every worker forked."""
    pids = []
    init = share_process.ShareProcess.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pids.append(self.pid)

    monkeypatch.setattr(share_process.ShareProcess, "__init__", recording)
    return pids


def gone(pid):
    """The process has exited (a zombie no one has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def fit(processes, callbacks=(), **kwargs):
    x, y = data()
    model = small_model()
    with tc.config.using(share_processes=processes):
        history = model.fit(x[:300], y[:300], batch_size=64, epochs=2, verbose=0, callbacks=list(callbacks),
                            validation_data=(x[300:], y[300:]), **kwargs)
    return model, history.history


def same(a, b):
    (ma, ha), (mb, hb) = a, b
    ha, hb = ({k: v for k, v in h.items() if k != "seconds"} for h in (ha, hb))
    assert ha == hb
    for wa, wb in zip(ma.get_weights(), mb.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_the_worker_trains_as_the_second_thread_does(forks):
    """Weights (moving statistics included), losses and metrics equal to the bit, with Dropout
    masks drawn from the parent's seeds at the worker's rows, and the worker gone after fit."""
    threads = fit(False)
    assert forks == []
    processes = fit(True)
    assert len(forks) == 1  # forked once, after the first step (in threads), for the rest of fit
    same(threads, processes)
    assert gone(forks[0])


def test_sample_weights_reach_the_worker(forks):
    weights = np.random.default_rng(2).random(300).astype(np.float32)
    x, y = data()

    def run(processes):
        model = small_model()
        with tc.config.using(share_processes=processes):
            history = model.fit(x[:300], y[:300], sample_weight=weights, batch_size=64, epochs=1, verbose=0)
        return model, history.history

    same(run(False), run(True))
    assert len(forks) == 1


def test_a_callback_that_freezes_a_layer_forks_a_new_worker(forks):
    """A change to what trains (a trainable flag) between steps: the worker would train the
    old plan, so fit forks another; the results stay the threads'."""
    class Freeze(tc.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                self.model.layers[0].trainable = False

    threads = fit(False, [Freeze()])
    processes = fit(True, [Freeze()])
    assert len(forks) == 2
    same(threads, processes)
    assert all(gone(pid) for pid in forks)


def test_the_setting_and_a_small_batch_keep_threads(forks):
    fit(False)
    x, y = data()
    small_model().fit(x[:60], y[:60], batch_size=16, epochs=1, verbose=0)  # batches under 32 do not split
    assert forks == []


def test_a_failing_worker_raises_its_traceback_in_the_parent(forks, monkeypatch):
    parent = os.getpid()
    share_step = Trainer.share_step

    def failing_in_the_worker(self, *args):
        if os.getpid() != parent:
            raise ArithmeticError("injected in the worker")
        return share_step(self, *args)

    monkeypatch.setattr(Trainer, "share_step", failing_in_the_worker)
    with pytest.raises(ShareProcessError, match="injected in the worker"):
        fit(True)
    assert len(forks) == 1 and gone(forks[0])


def test_an_interrupted_parent_kills_its_worker(forks, monkeypatch):
    parent = os.getpid()
    share_step = Trainer.share_step
    steps = []

    def interrupted(self, *args):
        if os.getpid() == parent:
            steps.append(1)
            if len(steps) == 4:
                raise KeyboardInterrupt
        return share_step(self, *args)

    monkeypatch.setattr(Trainer, "share_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(True)
    assert len(forks) == 1 and gone(forks[0])


def test_a_vanished_worker_is_an_error_not_a_hang(forks):
    class Kill(tc.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                os.kill(forks[0], signal.SIGKILL)

    with pytest.raises(ShareProcessError, match="other share is gone"):
        fit(True, [Kill()])
    assert gone(forks[0])


def test_a_worker_whose_parent_dies_exits(tmp_path):
    """No orphan: a parent killed mid-fit (os._exit, as by SIGKILL: no cleanup) leaves a worker that
    notices and exits within seconds."""
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    script = f"""
import os
import numpy as np
import tinycnn as tc
from tinycnn import layers as L
layers = [L.Conv2D(8, 3, activation="relu", input_shape=(10, 10, 2)), L.BatchNormalization(),
          L.GlobalAveragePooling2D(), L.Dense(5, activation="softmax")]
model = tc.Sequential(layers, device="cpu", seed=3)
model.compile("adam", "categorical_crossentropy")
rng = np.random.default_rng(1)
x = rng.standard_normal((640, 10, 10, 2)).astype(np.float32)
y = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 640)]
class Die(tc.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 3:
            open({str(pid_file)!r}, "w").write(str(self.model._fit_shares.worker.pid))
            os._exit(0)
model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[Die()])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(worker)
