"""What each CPU speed lever buys: the Week2 training step (batch 128) with one lever undone at
a time, each in a fresh process, all in one run on the same machine.

    python benchmarks/levers.py [--rounds 3] [--repeats 3] [--steps 30] [--out benchmarks/results/levers.md]

This machine's speed drifts by up to 1.5x over minutes (a shared host), so the variants run in
interleaved rounds and the table reports the median over rounds, with every round's value.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (what is undone, extra environment, extra step_time.py flags)
VARIANTS = [
    ("all levers (default)", {}, []),
    ("NumPy reference kernels only (no numba)", {"TINYCNN_KERNELS": "reference"}, []),
    ("convolutions as chunked im2col + OpenBLAS GEMM (the default before direct convolution)",
     {"TINYCNN_CONV": "gemm"}, []),
    ("im2col + GEMM, not cache-blocked (one im2col + one GEMM per layer)",
     {"TINYCNN_CONV": "gemm"}, ["--chunk-bytes", str(1 << 40)]),
    ("one numba thread instead of all cores", {"TINYCNN_NUMBA_THREADS": "1"}, []),
    ("idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE) instead of spinning 1000 rounds",
     {"OMP_WAIT_POLICY": "PASSIVE"}, []),
    ("idle OpenMP threads spin forever (OMP_WAIT_POLICY=ACTIVE; ruinous where OpenBLAS runs too)",
     {"OMP_WAIT_POLICY": "ACTIVE"}, []),
    ("im2col + GEMM convolutions with idle OpenMP threads asleep at once (the old defaults)",
     {"TINYCNN_CONV": "gemm", "OMP_WAIT_POLICY": "PASSIVE"}, []),
    ("numba workqueue threading layer instead of OpenMP", {"NUMBA_THREADING_LAYER": "workqueue"}, []),
    ("Dropout apart from BatchNormalization (no fusion)", {}, ["--no-fuse"]),
]


def measure(env, flags, repeats, steps):
    cmd = [sys.executable, os.path.join(HERE, "step_time.py"), "--repeats", str(repeats), "--steps", str(steps), *flags]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    match = re.search(r"median ([\d.]+) ms \(runs: ([^)]*)\)", out.stdout)
    if not match:
        raise RuntimeError(f"step_time.py failed: {out.stderr[-2000:]}")
    return float(match.group(1)), match.group(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "levers.md"))
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    import common

    machine = common.machine_info()
    per_round = {name: [] for name, _, _ in VARIANTS}
    for r in range(args.rounds):
        for name, env, flags in VARIANTS:
            median, _ = measure(env, flags, args.repeats, args.steps)
            per_round[name].append(median)
            print(f"round {r + 1}: {median:8.1f} ms  {name}", flush=True)
    rows = [(name, statistics.median(values), values) for name, values in per_round.items()]
    base = rows[0][1]
    lines = ["# CPU levers: Week2 training step, batch 128", "",
             f"Machine: {machine.get('cpu_model', '?')}, {machine.get('logical_cores', '?')} logical cores. Each cell: "
             f"median over {args.rounds} interleaved rounds of (median of {args.repeats} runs x {args.steps} steps after "
             "warm-up), each variant in a fresh process (`python benchmarks/levers.py`).", "",
             "| variant (one lever undone) | ms per step | vs all levers | each round |", "|---|---:|---:|---|"]
    for name, median, values in rows:
        lines.append(f"| {name} | {median:.1f} | {median / base:.2f}x | {', '.join(f'{v:.1f}' for v in values)} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
