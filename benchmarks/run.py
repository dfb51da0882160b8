"""Run the benchmark of every framework and write the comparison.

    python benchmarks/run.py [--frameworks tinycnn,pytorch,keras] [--peer-python PATH]
                             [--repeats 3] [--steps 50] [--quick] [--skip-epoch] [--vgg]
                             [--device cpu|gpu] [--out benchmarks/results]

With --device gpu the default frameworks are tinycnn (TINYCNN_DEVICE=gpu, eager steps),
tinycnn-graphs (its static steps captured as CUDA graphs, TINYCNN_STEP=graphs), pytorch (CUDA,
eager), pytorch-graphs (its training step replayed from a CUDA graph) and keras-jax (Keras 3 on
JAX). tinycnn-static (TINYCNN_STEP=static) runs anywhere.

Each framework's ``benchmarks/bench_<name>.py`` runs in its own subprocess, one after another,
with the thread variables of ``common.thread_env`` set (``tinycnn`` with this Python, the
others with ``--peer-python``, default this Python too). Each prints one JSON object (schema:
``common.py``). A framework whose script is absent or that exits with ``common.EXIT_MISSING``
is listed as missing; one that crashes is reported with the tail of its stderr; the run goes
on either way. Writes ``results.json``, ``RESULTS.md`` and ``step_ratio.png`` to ``--out``.

With --vgg (CPU) it then runs ``vgg_scaling.py``'s grid (the VGG-style network as channels, batch
and image size grow, tinycnn against PyTorch from --peer-python; about 10 minutes on 2 cores),
writes ``vgg_scaling.md`` and ``.json`` beside the results and adds its table to ``RESULTS.md``.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)  # tinycnn.files, also when tinycnn is not installed in this Python
import common as C  # noqa: E402
from tinycnn.files import atomic_path, atomic_write  # noqa: E402

DEFAULT_FRAMEWORKS = "tinycnn,pytorch,keras"
GPU_FRAMEWORKS = "tinycnn,tinycnn-graphs,pytorch,pytorch-graphs,keras-jax"
SCRIPT_NAMES = {"pytorch": "bench_torch.py", "torch": "bench_torch.py",
                "keras": "bench_keras.py", "tinycnn": "bench_tinycnn.py"}
# A variant: another framework name for a script run with extra environment variables.
VARIANTS = {"tinycnn-graphs": ("tinycnn", {"TINYCNN_STEP": "graphs"}),
            "tinycnn-static": ("tinycnn", {"TINYCNN_STEP": "static"}),
            "pytorch-graphs": ("pytorch", {"BENCH_TORCH_GRAPHS": "1"}),
            "keras-jax": ("keras", {"KERAS_BACKEND": "jax"})}
GPU_ENV = {"TINYCNN_DEVICE": "gpu", "BENCH_DEVICE": "gpu"}  # and CUDA_VISIBLE_DEVICES as the caller has it
STDERR_TAIL = 40


def script_for(framework):
    framework = VARIANTS.get(framework, (framework, {}))[0]
    return os.path.join(HERE, SCRIPT_NAMES.get(framework, f"bench_{framework}.py"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frameworks", default=None,
                   help=f"comma-separated (default {DEFAULT_FRAMEWORKS}; with --device gpu {GPU_FRAMEWORKS})")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--peer-python", default=sys.executable,
                   help="Python that has torch / tensorflow / keras (default: this one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--kernel-calls", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny counts, no epoch")
    p.add_argument("--skip-epoch", action="store_true")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--vgg", action="store_true",
                   help="also the VGG-style scaling grid (vgg_scaling.py) against PyTorch, into RESULTS.md")
    p.add_argument("--baseline", default=None,
                   help="framework the ratios are taken from, baseline / peer (default tinycnn)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per framework")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment variable for the children (repeatable), e.g. "
                        "OMP_WAIT_POLICY=PASSIVE on a busy machine")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--render", metavar="RESULTS_JSON",
                   help="run nothing: redraw RESULTS.md and step_ratio.png in --out from an "
                        "existing results.json (with --baseline, if given)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Running one framework
# ---------------------------------------------------------------------------------------------
def run_one(framework, python, args, env):
    """Run one bench script. Returns ("ok", result) | ("missing", why) | ("crashed", why)."""
    script = script_for(framework)
    if not os.path.exists(script):
        return "missing", f"no benchmark script {os.path.relpath(script, os.getcwd())}"
    if not (os.path.exists(python) or _which(python)):
        return "missing", f"Python {python} not found"
    cmd = [python, script, "--repeats", str(args.repeats), "--steps", str(args.steps),
           "--kernel-calls", str(args.kernel_calls), "--threads", str(args.threads)]
    cmd += [flag for flag, on in (("--quick", args.quick), ("--skip-epoch", args.skip_epoch),
                                  ("--no-kernels", args.no_kernels)) if on]
    print(f"== {framework}: {' '.join(cmd)}", file=sys.stderr, flush=True)

    tail = collections.deque(maxlen=STDERR_TAIL)
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE,
                                    env={**env, **VARIANTS.get(framework, (None, {}))[1]}, cwd=ROOT)
        except OSError as exc:
            return "missing", f"cannot start {python}: {exc}"

        def pump():
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                print(f"   {framework} | {line}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            return "crashed", (f"timed out after {args.timeout:.0f} s\n" + "\n".join(tail))
        reader.join(5)
        elapsed = time.perf_counter() - start
        out.seek(0)
        stdout = out.read().decode(errors="replace")

    parsed = _last_json(stdout)
    if rc == C.EXIT_MISSING:
        why = parsed.get("missing") if isinstance(parsed, dict) else None
        return "missing", why or (tail[-1] if tail else f"exit code {rc}")
    if rc != 0:
        return "crashed", f"exit code {rc}\n" + "\n".join(tail)
    if not isinstance(parsed, dict):
        return "crashed", "exit code 0 but no JSON object on stdout\n" + "\n".join(tail)
    parsed.setdefault("framework", framework)
    parsed["wall_s"] = round(elapsed, 1)
    problems = C.validate(parsed)
    if problems:
        parsed["schema_problems"] = problems
    return "ok", parsed


def _which(name):
    from shutil import which
    return which(name)


def _last_json(text):
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _median(s):
    return s.get("median") if isinstance(s, dict) else None


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_ROWS = [
    ("training step (ms)", lambda r: _median(r.get("step_ms"))),
    ("epoch + eval (s)", lambda r: _median(r.get("epoch_s"))),
    ("inference 10k (s)", lambda r: _median(r.get("inference_s"))),
    ("predict, one image (ms)", lambda r: _median(r.get("predict_one_ms"))),
    ("peak RSS (MB)", lambda r: r.get("peak_rss_mb")),
    ("compile / warm-up (s)", lambda r: r.get("compile_s")),
]


def render_markdown(report):
    ok = report["results"]
    names = list(ok)
    base = report["baseline"] if report["baseline"] in ok else None
    peers = [n for n in names if n != base] if base else []
    ratio_cols = [f"{base} ÷ {p}" for p in peers] if base else []
    m = report["machine"]
    md = [f"# {report.get('device', 'cpu').upper()} benchmark results", ""]
    md.append(f"Measured {m['date']} with `{report['command']}`.")
    md.append("")
    md.append("## Machine")
    md.append("")
    np_info = m.get("numpy") or {}
    blas = np_info.get("blas")
    blas_s = (f"{blas.get('name')} {blas.get('version', '')}".strip()
              if isinstance(blas, dict) else str(blas))
    md += [f"- GPU: {m['gpu']}"] if m.get("gpu") else []
    md += [f"- CPU: {m['cpu_model']}",
           f"- logical cores: {m['logical_cores']}, os.cpu_count: {m['os_cpu_count']}, "
           f"usable: {m['usable_cpus']}, memory: {m['memory_gb']} GB",
           f"- load average at start: {m['load_average']}",
           f"- {m['platform']}, Python {m['python']}",
           f"- NumPy {np_info.get('version')}, BLAS: {blas_s}",
           f"- threads: {report['threads']} per framework "
           f"({', '.join(f'{k}={v}' for k, v in report['thread_env'].items())})",
           f"- counts: repeats {report['counts']['repeats']}, steps {report['counts']['steps']}, "
           f"kernel calls {report['counts']['kernel_calls']}"
           + (" (**--quick: a smoke test, not a measurement**)" if report["counts"]["quick"] else ""),
           ""]

    md.append("## Summary (medians)")
    md.append("")
    if not names:
        md.append("No framework produced results.")
    else:
        header = ["", *[f"{n} {ok[n].get('version', '')}" for n in names], *ratio_cols]
        rows = []
        for label, get in SUMMARY_ROWS:
            vals = {n: get(ok[n]) for n in names}
            rows.append([label, *[_fmt(vals[n]) for n in names],
                         *[_ratio(vals[base], vals[p]) for p in peers]])
        md.append(_table(header, rows))
        md.append("")
        if base:
            md.append(f"Ratios are {base} ÷ peer: above 1× means {base} takes longer "
                      "(or more memory) than that peer.")
        else:
            md.append(f"No {report['baseline']} result, so no ratios.")
        md.append("")

        kernel_names = list(C.KERNEL_NAMES)
        for n in names:
            for k in ok[n].get("kernels") or {}:
                if k not in kernel_names:
                    kernel_names.append(k)
        kernel_names = [k for k in kernel_names if any(k in (ok[n].get("kernels") or {})
                                                       for n in names)]
        if kernel_names:
            md.append("## Kernels (median ms per call, batch 128)")
            md.append("")
            rows = []
            for k in kernel_names:
                vals = {n: _median((ok[n].get("kernels") or {}).get(k)) for n in names}
                rows.append([f"`{k}`", *[_fmt(vals[n]) for n in names],
                             *[_ratio(vals[base], vals[p]) for p in peers]])
            md.append(_table(["kernel", *names, *ratio_cols], rows))
            md.append("")

    md.append("## Notes")
    md.append("")
    if not names:
        md.append("(none)")
    for n in names:
        r = ok[n]
        extra = ""
        if r.get("schema_problems"):
            extra = f" **Schema problems:** {'; '.join(r['schema_problems'])}."
        md.append(f"- **{n}** {r.get('version', '')} (params {r.get('params', '?')}, "
                  f"wall {r.get('wall_s', '?')} s): {r.get('notes') or ''}{extra}")
    md.append("")
    if report["missing"] or report["crashed"]:
        md.append("## Missing or failed")
        md.append("")
        for n, why in report["missing"].items():
            md.append(f"- **{n}**: missing: {why}")
        for n, why in report["crashed"].items():
            tail = "\n".join("    " + line for line in why.splitlines()[-15:])
            md.append(f"- **{n}**: crashed:\n\n{tail}\n")
        md.append("")
    if report.get("vgg_scaling"):
        import vgg_scaling  # beside this script

        md.append("## Scaling: " + vgg_scaling.report(report["vgg_scaling"]).removeprefix("# "))
    return "\n".join(md)


def write_atomic(path, data, mode="w"):
    with atomic_write(path, mode) as f:
        f.write(data)


def plot_steps(report, path):
    """Bar chart of the median step time per framework, min..max as error bars, baseline ratio
    annotated on each peer. Returns a message when it cannot plot."""
    ok = {n: r for n, r in report["results"].items() if _median(r.get("step_ms"))}
    if not ok:
        if os.path.exists(path):
            os.remove(path)          # do not leave an older run's chart next to these results
        return "no step results to plot"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not available ({exc}); skipped {os.path.basename(path)}"
    names = list(ok)
    med = [ok[n]["step_ms"]["median"] for n in names]
    lo = [m - ok[n]["step_ms"]["min"] for n, m in zip(names, med)]
    hi = [ok[n]["step_ms"]["max"] - m for n, m in zip(names, med)]
    base = report["baseline"] if report["baseline"] in ok else None
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    colors = ["#d62728" if n == base else "#1f77b4" for n in names]
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=4, color=colors)
    for bar, n, m in zip(bars, names, med):
        label = f"{m:.1f} ms"
        if base and n != base:
            label += f"\n{base} = {ok[base]['step_ms']['median'] / m:.2f}×"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                    fontsize=9)
    ax.set_ylabel("ms per training step (median, min–max)")
    title = f"Week2 model, batch 128, CPU, {report['threads']} threads"
    if report["counts"]["quick"]:
        title += " (--quick)"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(m + h for m, h in zip(med, hi)) * 1.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        if args.baseline:
            report["baseline"] = args.baseline
        os.makedirs(args.out, exist_ok=True)
        return write_reports(report, args.out)
    chosen = args.frameworks or (GPU_FRAMEWORKS if args.device == "gpu" else DEFAULT_FRAMEWORKS)
    frameworks = [f.strip() for f in chosen.split(",") if f.strip()]
    env = C.thread_env(args.threads)
    if args.device == "gpu":
        env.update(GPU_ENV)
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            env.pop("CUDA_VISIBLE_DEVICES")
    # the repository root, so bench_tinycnn.py finds tinycnn without an install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--env wants KEY=VALUE, got {item!r}")
        env[key] = value
    thread_vars = {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                       "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}
    thread_vars.update(dict(item.partition("=")[::2] for item in args.env))

    report = {
        "schema": C.SCHEMA_VERSION,
        "command": " ".join(["python", os.path.relpath(__file__, os.getcwd())]
                            + (argv if argv is not None else sys.argv[1:])),
        "machine": C.machine_info(),
        "device": args.device,
        "threads": args.threads,
        "thread_env": thread_vars,
        "counts": {"repeats": args.repeats, "steps": args.steps,
                   "kernel_calls": args.kernel_calls, "quick": args.quick,
                   "skip_epoch": args.skip_epoch},
        "baseline": args.baseline or "tinycnn",
        "pythons": {},
        "results": {},
        "missing": {},
        "crashed": {},
    }
    for fw in frameworks:
        python = sys.executable if fw.startswith("tinycnn") else args.peer_python
        report["pythons"][fw] = python
        status, payload = run_one(fw, python, args, env)
        if status == "ok":
            name = payload.get("framework", fw)
            report["results"][name] = payload
            print(f"== {fw}: ok, step {_fmt(_median(payload.get('step_ms')))} ms",
                  file=sys.stderr, flush=True)
        else:
            report[status][fw] = payload
            first = payload.splitlines()[0] if payload else ""
            print(f"== {fw}: {status}: {first}", file=sys.stderr, flush=True)
        # after every framework: a run cut short (a borrowed GPU's time limit) keeps what it measured
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "results.json"), json.dumps(report, indent=1) + "\n")
    if args.vgg:
        import vgg_scaling  # beside this script

        report["vgg_scaling"] = vgg_scaling.driver(args.peer_python, args.threads, args.out)
        write_atomic(os.path.join(args.out, "results.json"), json.dumps(report, indent=1) + "\n")
    return write_reports(report, args.out)


def write_reports(report, out):
    write_atomic(os.path.join(out, "RESULTS.md"), render_markdown(report) + "\n")
    msg = plot_steps(report, os.path.join(out, "step_ratio.png"))
    if msg:
        print(f"step_ratio.png: {msg}", file=sys.stderr)
    print(f"wrote {out}: RESULTS.md"
          + ("" if msg else ", step_ratio.png"), file=sys.stderr)
    for n, why in report["missing"].items():
        print(f"missing: {n}: {why}", file=sys.stderr)
    for n, why in report["crashed"].items():
        print(f"crashed: {n}: {why.splitlines()[0] if why else ''}", file=sys.stderr)
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
