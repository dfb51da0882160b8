#!/usr/bin/env python
"""Data-parallel training: what the collective costs here, and what it would cost on a cluster.

    python benchmarks/distributed.py            # needs the distributed extra (mpi4py, mpich)

Measures, side by side in one run (the configurations alternate, `--rounds` times):
- the Week2 training step (global batch 128, MNIST-shaped random data) on 1 rank x 2 numba
  threads against 2 ranks x 1 thread, under mpiexec, ms per step;
- the allreduce of a flat float32 gradient buffer through tinycnn's MPI communicator on this
  machine's loopback (shared memory), for Week2's 12,316 trainable weights (49 kB) and a model
  100x larger (4.9 MB).
Then projects the scaling efficiency of N machines on 10 Gb/s and 100 Gb/s networks with the
ring-allreduce cost model (see `project`), and writes benchmarks/results/distributed.md and
distributed.json.

Internal parts (run by the driver): `--part step` and `--part allreduce`, under mpiexec or not.
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
WEEK2_WEIGHTS = 12316  # trainable float32 weights: the flat buffer one allreduce sums per step
WEEK2_BATCHNORM_LAYERS = 7


def part_step(steps, warmup, distributed, sync_bn):
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import tinycnn as tc
    from week2_model import build_week2_model

    dp = tc.distributed.DataParallel("mpi", sync_batchnorm=sync_bn) if distributed else None
    model = build_week2_model(device="cpu", seed=0)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["acc"], distribution=dp)
    rng = np.random.default_rng(0)
    n = 128 * (steps + warmup)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    model.fit(x[: 128 * warmup], y[: 128 * warmup], batch_size=128, epochs=1, verbose=0, shuffle=False)
    started = time.perf_counter()
    model.fit(x[128 * warmup :], y[128 * warmup :], batch_size=128, epochs=1, verbose=0, shuffle=False)
    ms = (time.perf_counter() - started) / steps * 1e3
    if dp is None or dp.is_chief:
        import numba

        print(json.dumps({"ms_per_step": ms, "ranks": 1 if dp is None else dp.size,
                          "threads_per_rank": numba.get_num_threads()}))


def part_allreduce(sizes, reps):
    import numpy as np

    import tinycnn as tc

    comm = tc.distributed.MpiCommunicator()
    out = {}
    for size in sizes:
        buf = np.ones(size, dtype=np.float32)
        for _ in range(10):
            comm.sum_(buf)
        comm.barrier()
        started = time.perf_counter()
        for _ in range(reps):
            comm.sum_(buf)
        out[str(size)] = (time.perf_counter() - started) / reps * 1e6
    if comm.rank == 0:
        print(json.dumps({"allreduce_us": out, "ranks": comm.size, "mpi": comm.describe()}))


def run_part(args, ranks, env=None):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    command = [sys.executable, os.path.abspath(__file__)] + args
    if ranks > 1:
        command = [mpiexec, "-n", str(ranks)] + command + ["--distributed"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ring_allreduce_seconds(nbytes, machines, bandwidth_bytes, latency):
    """The ring allreduce (reduce-scatter then allgather): each machine sends and receives
    2 (N - 1) / N of the buffer, in 2 (N - 1) messages."""
    if machines == 1:
        return 0.0
    return 2 * (machines - 1) / machines * nbytes / bandwidth_bytes + 2 * (machines - 1) * latency


def project(step_seconds_one_machine, nbytes, machines, bandwidth_bytes, latency):
    """Strong scaling of a fixed global batch: each of N machines computes 1/N of the step (assumed
    to split perfectly; small shares run less efficiently, so this is optimistic for compute), then
    one allreduce, not overlapped with the backward pass (tinycnn sums after backward).
    Returns (seconds per step, efficiency = T1 / (N * T_N))."""
    t = step_seconds_one_machine / machines + ring_allreduce_seconds(nbytes, machines, bandwidth_bytes, latency)
    return t, step_seconds_one_machine / (machines * t)


NETWORKS = {  # name: (bandwidth in bytes/s, per-message latency in s)
    "10 Gb/s Ethernet (TCP, 30 us per message)": (10e9 / 8, 30e-6),
    "100 Gb/s InfiniBand/RoCE (RDMA, 3 us per message)": (100e9 / 8, 3e-6),
}
MACHINES = (1, 2, 4, 8, 16, 32, 64)


def driver(rounds, steps):
    steps_args = ["--part", "step", "--steps", str(steps)]
    configurations = {"1 rank x 2 threads": (steps_args, 1, {"TINYCNN_NUMBA_THREADS": "2"}),
                      "2 ranks x 1 thread": (steps_args, 2, None),
                      "2 ranks x 1 thread, synchronized BatchNormalization": (steps_args + ["--sync-bn"], 2, None)}
    runs = {name: [] for name in configurations}
    for _ in range(rounds):  # interleaved: the machine's speed drifts
        for name, (part_args, ranks, env) in configurations.items():
            runs[name].append(run_part(part_args, ranks, env)["ms_per_step"])
    sizes = [WEEK2_WEIGHTS, 100 * WEEK2_WEIGHTS]
    ar = run_part(["--part", "allreduce", "--sizes", *map(str, sizes)], 2)
    step_ms = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    one = step_ms["1 rank x 2 threads"] / 1e3
    models = {"Week2 (12,316 weights, 49 kB)": (WEEK2_WEIGHTS * 4, one),
              "100x larger (1.23 M weights, 4.9 MB; compute assumed 100x too)": (WEEK2_WEIGHTS * 400, 100 * one)}
    projection = {}
    for model_name, (nbytes, t1) in models.items():
        for net, (bw, lat) in NETWORKS.items():
            projection[f"{model_name} | {net}"] = {
                str(m): {"ms_per_step": project(t1, nbytes, m, bw, lat)[0] * 1e3,
                         "efficiency": project(t1, nbytes, m, bw, lat)[1],
                         "weak_efficiency": t1 / (t1 + ring_allreduce_seconds(nbytes, m, bw, lat)),
                         "allreduce_ms": ring_allreduce_seconds(nbytes, m, bw, lat) * 1e3} for m in MACHINES}
    result = {"cpu": C.machine_info()["cpu_model"], "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "step_ms_runs": runs, "step_ms_median": step_ms, "allreduce": ar, "projection": projection,
              "bytes_per_step": {"week2": WEEK2_WEIGHTS * 4, "100x": WEEK2_WEIGHTS * 400}}
    print(C.write_report("distributed", result, report(result)))


def report(r):
    lines = ["# Data-parallel training: measured here, projected for clusters\n",
             f"Measured by `python benchmarks/distributed.py` on {r['cpu']} ({r['cores']} logical cores), {r['date']}; "
             "MPICH through mpi4py on this one machine (shared memory). The configurations alternated; the median of "
             f"{len(next(iter(r['step_ms_runs'].values())))} runs is shown.\n",
             "## One machine: 1 rank x 2 threads against 2 ranks x 1 thread (Week2, global batch 128)\n",
             "| configuration | ms per step (median) | runs |", "|---|---:|---|"]
    for k, v in r["step_ms_runs"].items():
        lines.append(f"| {k} | {r['step_ms_median'][k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |")
    ar = r["allreduce"]["allreduce_us"]
    lines += ["", f"Allreduce (sum) of the flat float32 gradient buffer through tinycnn's MPI communicator, 2 ranks "
              f"on loopback ({r['allreduce']['mpi']}):", "",
              "| buffer | bytes | microseconds per allreduce |", "|---|---:|---:|"]
    for size, us in ar.items():
        lines.append(f"| {int(size):,} float32 | {int(size) * 4:,} | {us:.0f} |")
    lines += ["", "## Projection for N machines", "",
              "Ring allreduce: each machine sends and receives 2(N-1)/N of the buffer in 2(N-1) messages. Strong "
              "scaling (the global batch 128 split N ways, as the equivalence tests run): step time = T1/N + "
              "allreduce, compute assumed to split perfectly (tiny shares would not), no overlap of the allreduce "
              "with the backward pass (tinycnn sums after backward); efficiency = T1 / (N x T_N). Weak scaling "
              "(128 samples per machine, global batch 128 N): efficiency = T1 / (T1 + allreduce). T1 = the 1 rank x "
              "2 threads step measured above.", ""]
    for key, table in r["projection"].items():
        lines += [f"**{key}**", "", "| machines | allreduce ms | strong: ms per step | strong efficiency | "
                  "weak efficiency |", "|---:|---:|---:|---:|---:|"]
        for m, v in table.items():
            lines.append(f"| {m} | {v['allreduce_ms']:.3f} | {v['ms_per_step']:.2f} | {v['efficiency']:.0%} | "
                         f"{v['weak_efficiency']:.0%} |")
        lines.append("")
    lat = NETWORKS["10 Gb/s Ethernet (TCP, 30 us per message)"][1]
    sync_ms = WEEK2_BATCHNORM_LAYERS * 2 * ring_allreduce_seconds(0, 8, 1.0, lat) * 1e3
    lines += ["Synchronized BatchNormalization adds two allreduces of a few hundred bytes per layer and step (Week2: "
              f"{WEEK2_BATCHNORM_LAYERS} layers, {2 * WEEK2_BATCHNORM_LAYERS} per step). They cost latency, not "
              f"bandwidth: on 8 machines over 10 Gb/s TCP about {sync_ms:.1f} ms per step, more than Week2's compute "
              "share there. Across machines, keep the statistics per rank (the default) unless the per-machine batch "
              "is too small for them.", ""]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["step", "allreduce"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sizes", type=int, nargs="*", default=[WEEK2_WEIGHTS])
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--report-only", action="store_true", help="rewrite the report from results/distributed.json")
    p.add_argument("--distributed", action="store_true", help="(internal) the part runs under mpiexec")
    p.add_argument("--sync-bn", action="store_true", help="(internal) synchronized BatchNormalization")
    args = p.parse_args()
    if args.part == "step":
        part_step(args.steps, warmup=5, distributed=args.distributed, sync_bn=args.sync_bn)
    elif args.part == "allreduce":
        part_allreduce(args.sizes, args.reps)
    elif args.report_only:
        with open(os.path.join(HERE, "results", "distributed.json")) as f:
            result = json.load(f)
        C.write_report("distributed", result, report(result))
    else:
        driver(args.rounds, args.steps)


if __name__ == "__main__":
    main()
