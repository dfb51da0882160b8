#!/usr/bin/env python
"""How the training step scales with channels, batch and image size: a VGG-style network on
CIFAR-sized inputs (and twice that), tinycnn against PyTorch eager on the same cores.

    python benchmarks/vgg_scaling.py [--peer-python PATH_TO_PYTHON_WITH_TORCH] [--threads 2]
                                     [--out benchmarks/results]

The network: SxSx3 inputs (S = 32, and 64 in two cells); three blocks of two (3x3 same convolution without bias +
BatchNormalization + ReLU) with W, 2W and 4W channels, a 2x2 max-pool after the first two blocks,
global average pooling, Dense 10 (softmax), categorical cross-entropy, Adam. The grid: W = 16,
32, 64 at batch 64, and batch 16, 64, 256 at W = 16 and 64, all on 32x32 images; and 64x64
images at W = 16 and 32, batch 64. Each cell is the median over 3 runs
of the mean of several steps after 2 warm-up steps (tinycnn: batches in the steady state of
model.fit; PyTorch: its step in a loop), each framework in its own subprocess, the frameworks
alternating cell by cell. Writes vgg_scaling.md and .json into --out (benchmarks/results; run.py
--vgg puts them beside its own results and its table into RESULTS.md).

Internal: `--part tinycnn|pytorch --width W --batch B --size S --steps N` times one cell and prints
JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common as C  # noqa: E402  (beside this script)
ROOT = os.path.dirname(HERE)
GRID = [(16, 64, 32), (32, 64, 32), (64, 64, 32), (16, 16, 32), (16, 256, 32), (64, 16, 32), (64, 256, 32),
        (16, 64, 64), (32, 64, 64)]  # (W, batch, image size)
CLASSES = 10


def data(batch, size=32):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, batch)]
    return x, y


def steps_for(width, batch, size=32):
    return max(3, min(30, int(2e6 / (width * width * batch * (size / 32) ** 2))))  # about the same seconds per cell


def time_steps(step, steps):
    for _ in range(2):
        step()
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - t) / steps * 1e3)
    return sorted(runs)[1], runs


def part_tinycnn(width, batch, steps, size=32):
    sys.path.insert(0, ROOT)
    import tinycnn as tc
    from tinycnn import layers as L

    body = []
    for block, channels in enumerate((width, 2 * width, 4 * width)):
        for _ in range(2):
            body += [L.Conv2D(channels, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU()]
        if block < 2:
            body.append(L.MaxPooling2D(2))
    model = tc.Sequential([tc.Input((size, size, 3))] + body + [L.GlobalAveragePooling2D(),
                                                           L.Dense(CLASSES, activation="softmax")],
                          device="cpu", seed=0)
    model.compile(tc.optimizers.Adam(1e-3), "categorical_crossentropy")
    x, y = data(batch, size)
    # Per batch in the steady state of one long model.fit (what a user's fit takes per batch, its
    # share process included: tinycnn.share_process), as PyTorch's step loop after its warm-up.
    runs = C.fit_batch_ms(model, x, y, batch, 3, steps, 3)
    return {"ms": sorted(runs)[1], "runs": runs, "params": model.count_params()}


def part_pytorch(width, batch, steps, threads, size=32):
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers, cin = [], 3
    for block, channels in enumerate((width, 2 * width, 4 * width)):
        for _ in range(2):
            layers += [nn.Conv2d(cin, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
            cin = channels
        if block < 2:
            layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(batch, size)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.argmax(axis=1))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()

    median, runs = time_steps(step, steps)
    return {"ms": median, "runs": runs, "params": sum(p.numel() for p in model.parameters()),
            "version": torch.__version__}


def run_cell(python, framework, width, batch, size, threads):
    env = {**os.environ, "TINYCNN_NUMBA_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    command = [python, os.path.abspath(__file__), "--part", framework, "--width", str(width), "--batch", str(batch),
               "--size", str(size), "--steps", str(steps_for(width, batch, size)), "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def driver(peer_python, threads, out=None):
    cells = []
    for width, batch, size in GRID:
        t = run_cell(sys.executable, "tinycnn", width, batch, size, threads)
        p = run_cell(peer_python, "pytorch", width, batch, size, threads)
        cells.append({"width": width, "batch": batch, "size": size, "tinycnn": t, "pytorch": p})
        print(f"W={width} batch={batch} image {size}x{size}: tinycnn {t.get('ms', t.get('error'))} ms, "
              f"pytorch {p.get('ms', p.get('error'))} ms", file=sys.stderr)
    result = {"cpu": C.machine_info()["cpu_model"], "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cells": cells}
    print(C.write_report("vgg_scaling", result, report(result), out))
    return result


def report(r):
    version = next((c["pytorch"].get("version") for c in r["cells"] if "version" in c["pytorch"]), "?")
    lines = ["# VGG-style network: the training step as channels, batch and image size grow", "",
             f"`python benchmarks/vgg_scaling.py` on {r['cpu']}, {r['threads']} threads, {r['date']}; "
             f"PyTorch {version} eager (NCHW), tinycnn on its CPU kernels (NHWC). ms per training step "
             "(forward, backward, Adam; tinycnn's per batch of model.fit, its share process included), median "
             "of 3 runs; the two alternate cell by cell. Target (issue 18): "
             "tinycnn / PyTorch <= 0.8 everywhere.", "",
             "| W (channels W, 2W, 4W) | batch | image | parameters | tinycnn ms | PyTorch ms | tinycnn / PyTorch |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["cells"]:
        t, p = c["tinycnn"], c["pytorch"]
        ratio = f"{t['ms'] / p['ms']:.2f}" if "ms" in t and "ms" in p else "-"
        size = c.get("size", 32)  # results from before the image-size cells
        lines.append(f"| {c['width']} | {c['batch']} | {size}x{size} | {t.get('params', '-'):,} | {t.get('ms', float('nan')):.1f} | "
                     f"{p.get('ms', float('nan')):.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["tinycnn", "pytorch"])
    p.add_argument("--width", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int, default=32, help="image side (--part)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument("--out", default=None, help="folder for vgg_scaling.md and .json (default benchmarks/results)")
    args = p.parse_args()
    if args.part == "tinycnn":
        print(json.dumps(part_tinycnn(args.width, args.batch, args.steps, args.size)))
    elif args.part == "pytorch":
        print(json.dumps(part_pytorch(args.width, args.batch, args.steps, args.threads, args.size)))
    else:
        driver(args.peer_python, args.threads, args.out)


if __name__ == "__main__":
    main()
