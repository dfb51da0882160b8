"""Time one training step (forward, backward, Adam) of the Week2 model at batch 128.

    python benchmarks/step_time.py [--device cpu] [--repeats 3] [--steps 50] [--fit] [--layers]

Median over `repeats` runs of `steps` steps each, after a warm-up that also pays numba's
compile (or cache load) cost, which is reported separately. A step is `model.train_step` on one
batch; with `--fit`, a batch in the steady state of one long `model.fit` (what fit adds per
batch, and on the CPU its share process, tinycnn.share_process; benchmarks/common.fit_batch_ms). `--layers` adds a per-layer forward/backward breakdown; `--share` takes it on what
one thread of a split batch runs.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from week2_model import build_week2_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (beside this script)

import tinycnn as tc  # noqa: E402


def make_model(device, seed=0, fuse=True):
    model = build_week2_model(device=device, seed=seed, fuse=fuse)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["accuracy"])
    return model


def batch(model, n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = model.backend.asarray(rng.random((n, 28, 28, 1), dtype=np.float32))
    y = model.backend.asarray(np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)])
    return x, y


def sync(model):
    if model.backend.name == "gpu":
        model.xp.cuda.Device().synchronize()


def step(model, x, y):
    model.train_step([x], y)


def time_fit(model, x, y, repeats, steps):
    """ms per batch in the steady state of one long model.fit (benchmarks/common.fit_batch_ms)."""
    return C.fit_batch_ms(model, model.xp.asarray(x), model.xp.asarray(y), x.shape[0], 5, steps, repeats)


def time_steps(model, x, y, repeats, steps):
    runs = []
    for _ in range(repeats):
        sync(model)
        start = time.perf_counter()
        for _ in range(steps):
            step(model, x, y)
        sync(model)
        runs.append((time.perf_counter() - start) / steps * 1e3)
    return runs


def layer_breakdown(model, x, y, steps=20):
    """Forward and backward time of every step of the training plan (fused layers count as one)."""
    plan = model.plan(strip_activation="softmax")
    names = plan.describe()
    fwd, bwd = [0.0] * len(names), [0.0] * len(names)
    for _ in range(steps):
        values = [None] * plan.size
        values[plan.input_ids[0]] = x
        tape = []
        for k, step_ in enumerate(plan.steps):
            t = time.perf_counter()
            values[step_.output], saved = step_.forward(values, True)
            fwd[k] += time.perf_counter() - t
            tape.append(saved)
        _, _, d = model.loss.compute(values[plan.output_ids[0]], y, plan.emits_logits, model.backend.kernels)
        d *= d.dtype.type(1.0 / y.shape[0])
        grads = {plan.output_ids[0]: d}
        for k in reversed(range(len(plan.steps))):
            step_ = plan.steps[k]
            if not step_.runs_backward:
                continue
            t = time.perf_counter()
            dxs, _ = step_.backward(tape[k], grads.pop(step_.output))
            bwd[k] += time.perf_counter() - t
            for i, dx in zip(step_.inputs, dxs):
                grads[i] = dx
    t = time.perf_counter()
    for _ in range(steps):
        model.optimizer.apply(model.params.params, model.params.grads, model.params.grad_views)
    adam = (time.perf_counter() - t) / steps * 1e3
    print(f"{'step':56} {'fwd ms':>8} {'bwd ms':>8}")
    for name, f, b in zip(names, fwd, bwd):
        print(f"{name:56} {f / steps * 1e3:8.2f} {b / steps * 1e3:8.2f}")
    print(f"{'adam':56} {adam:8.2f}")
    print(f"{'total':56} {sum(fwd) / steps * 1e3:8.2f} {sum(bwd) / steps * 1e3:8.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--fit", action="store_true", help="time model.fit over the steps' batches, per batch")
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--share", action="store_true",
                        help="with --layers: time each layer on one share of a split batch (half of it) on one numba "
                             "thread, as the split training step runs them, instead of the whole batch on every thread")
    parser.add_argument("--no-fuse", action="store_true", help="run Dropout apart from the BatchNormalization before it")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="CPU convolution chunk size (default: the kernel's)")
    args = parser.parse_args()
    if args.chunk_bytes is not None:
        from tinycnn.kernels import cpu

        cpu.CHUNK_BYTES = args.chunk_bytes
    start = time.perf_counter()
    model = make_model(args.device, fuse=not args.no_fuse)
    x, y = batch(model)
    step(model, x, y)
    first = time.perf_counter() - start
    for _ in range(3):
        step(model, x, y)
    runs = (time_fit if args.fit else time_steps)(model, x, y, args.repeats, args.steps)
    median = statistics.median(runs)
    print(f"backend: {model.backend.describe()}")
    print(f"Week2 training step{' in fit' if args.fit else ''}, batch 128: median {median:.1f} ms (runs: {', '.join(f'{r:.1f}' for r in runs)}); "
          f"first step incl. build and compile/cache load: {first:.2f} s")
    if args.layers and args.share:
        import numba

        half = x.shape[0] // 2
        numba.set_num_threads(1)
        print(f"one share: {half} images on one numba thread")
        layer_breakdown(model, x[:half], y[:half])
    elif args.layers:
        layer_breakdown(model, x, y)


if __name__ == "__main__":
    main()
