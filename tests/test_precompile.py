"""`python -m tinycnn.precompile` compiles what a Week2 run needs: afterwards a fresh process trains,
validates and predicts without numba compiling a single tinycnn kernel."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# A first epoch of the Week2 network in a fresh process, the way the example runs it (split
# training batches, 64 + 20 rows of validation as the example's 10,000 at batch 128 end in 16,
# predictions of 1 and 1000 rows),
# printing every tinycnn kernel numba compiles.
CHECK = f"""
import sys
sys.path.insert(0, {os.path.join(os.path.dirname(HERE), "examples")!r})
from numba.core import event
compiled = []
class Listener(event.Listener):
    def on_start(self, ev):
        f = ev.data["dispatcher"].py_func
        if f.__module__.startswith("tinycnn."):
            compiled.append(f.__qualname__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Listener())
import numpy as np
import tinycnn as tc
from week2_model import build_week2_model
model = build_week2_model(device="cpu", seed=0)
model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["accuracy"])
rng = np.random.default_rng(0)
x = rng.random((300, 28, 28, 1), dtype=np.float32)
y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 300)]
model.fit(x[:224], y[:224], batch_size=64, epochs=1, validation_data=(x[224:], y[224:]), verbose=0)
model.predict(x[:1], verbose=0)
model.predict(x, batch_size=1000, verbose=0)
print("compiled:", sorted(set(compiled)))
"""


def test_precompile_leaves_nothing_to_compile_for_week2(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run([sys.executable, "-m", "tinycnn.precompile"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "CPU kernels compiled in" in done.stderr
    check = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "compiled: []" in check.stdout, check.stdout
    assert "tinycnn: compiling" not in check.stderr  # the first-run notice stays silent


def test_precompile_reports_a_failed_part(monkeypatch, capsys):
    from tinycnn import precompile

    monkeypatch.setattr(precompile, "PARTS", ("no such part",))
    assert precompile.main([]) == 1
    err = capsys.readouterr().err
    assert "part 'no such part' failed" in err and "unknown part" in err
    assert "compiled in" not in err


def test_precompile_takes_no_arguments_but_help():
    done = subprocess.run([sys.executable, "-m", "tinycnn.precompile", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: python -m tinycnn.precompile" in done.stdout
    assert "compiling" not in done.stderr  # --help compiles nothing
    done = subprocess.run([sys.executable, "-m", "tinycnn.precompile", "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "unrecognized arguments: --fast" in done.stderr
