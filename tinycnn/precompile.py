"""Compile tinycnn's CPU kernels ahead of time, into numba's disk cache:

    python -m tinycnn.precompile

Why: numba compiles a kernel the first time it runs on a machine, so without this a first Week2
training step waits about 9 s on a 2-core Zen 3 guest (the generated convolution loops are large;
benchmarks/results/cpu_round2.md), inside the first epoch's time. Run after installing, this
does that compiling up front, on every core, with a line that says so; a later first training
step then loads the kernels from the cache in well under a second. Running it again is cheap:
the kernels load instead of compiling. Nothing else changes: the kernels are numba's ordinary
cached compilations (per machine type; a new CPU kind compiles again, as numba always does).

How: two processes (the kernels compile one at a time within a process) each run one small
training step and a few predictions of float32 networks built to use a set of layers, the way a
user's network calls them: whichever kernels those calls compile are the ones a user's run needs
(serial twins for a split batch, parallel kernels for a batch of 16-31, inference kernels). The
direct convolution's forward and filter gradient, the two biggest, go to different processes.
"""
import os
import subprocess
import sys
import time

# The directory this tinycnn was imported from: the workers import the same one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("convolutions", "others")


def _week2_like(tc, L):
    """The layers of the Week2 network (3x3 and 1x1 convolutions with ReLU fused into
    BatchNormalization and Dropout, a 2x2 max pool, a 4x4 valid convolution, GAP, softmax)."""
    return tc.Sequential([
        L.Conv2D(16, 3, padding="same", use_bias=False, activation="relu", input_shape=(12, 12, 1)),
        L.BatchNormalization(), L.Dropout(0.1),
        L.Conv2D(10, 1, use_bias=False, activation="relu"),
        L.MaxPooling2D(2),
        L.Conv2D(16, 3, use_bias=False, activation="relu"), L.BatchNormalization(), L.Dropout(0.1),
        L.Conv2D(10, 4, use_bias=False),
        L.BatchNormalization(),
        L.GlobalAveragePooling2D(),
        L.Activation("softmax"),
    ], seed=0, device="cpu")


def _others(tc, L):
    """Layers without a full convolution (those compile in the other part): depthwise convolution,
    average and general max pooling, a plain BatchNormalization and ReLU, Dropout, Add, Dense."""
    inputs = tc.Input(shape=(12, 12, 4))
    x = L.DepthwiseConv2D(3, padding="same")(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Add()([x, inputs])
    x = L.AveragePooling2D(2)(x)
    x = L.MaxPooling2D(3, strides=1)(x)
    x = L.Dropout(0.1)(x)
    x = L.Flatten()(x)
    outputs = L.Dense(10, activation="softmax")(x)
    return tc.Model(inputs, outputs, seed=0, device="cpu")


def _exercise(model):
    """One training step of a split batch, then predictions of 1 image (serial), 20 (the parallel
    kernels) and 64 (a split batch)."""
    import numpy as np

    model.compile("adam", "categorical_crossentropy", ["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.random((64,) + tuple(model.input_shape[1:]), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)]
    model.train_on_batch(x, y)
    for rows in (1, 20, 64):
        model.predict(x[:rows], verbose=0)


def run_part(name):
    """What one worker process compiles (`name` in PARTS)."""
    import tinycnn as tc
    from tinycnn import layers as L
    from tinycnn.kernels import cpu_conv

    if name == "convolutions":
        _exercise(_week2_like(tc, L))
    elif name == "others":
        cpu_conv.compile_filter_grad()  # the biggest kernel, beside the other part's forward
        _exercise(_others(tc, L))
    else:
        raise ValueError(f"unknown part {name!r}: expected one of {PARTS}")


def main(argv=None):
    """Run every part in its own process at once; exit status 1 if one fails (its stderr shown)."""
    import argparse

    from .kernels import precompile as helper

    argparse.ArgumentParser(prog="python -m tinycnn.precompile",
                            description="Compile tinycnn's CPU kernels into numba's disk cache now, on every core, "
                                        "so that a first training run does not wait for the compiler.").parse_args(argv)

    print("tinycnn: compiling the CPU kernels for this machine into numba's cache "
          f"({len(PARTS)} processes at once; about 13 s on a 2-core machine)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    env = {**os.environ, helper.HELPER_ENV: "1"}  # no first-run helper inside the workers
    workers = [subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {_ROOT!r}); "
                                 f"from tinycnn.precompile import run_part; run_part({part!r})"],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for part in PARTS]
    failed = []
    for part, worker in zip(PARTS, workers):
        _, err = worker.communicate()
        if worker.returncode != 0:
            failed.append(f"part {part!r} failed (exit status {worker.returncode}):\n{err.strip()}")
    for message in failed:
        print(f"tinycnn.precompile: {message}", file=sys.stderr)
    if failed:
        return 1
    print(f"tinycnn: CPU kernels compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
