"""Shared pieces of the CPU benchmark suite: the result schema, the workload, timing helpers.

Every ``benchmarks/bench_<framework>.py`` imports this module (it sits next to them, so a plain
``from common import ...`` works when the script is run as ``python benchmarks/bench_x.py``),
measures the same workload and prints ONE JSON object (the schema below) on stdout. Progress
and any library chatter go to stderr. ``benchmarks/run.py`` runs the scripts one after another
and merges what they print.

Only the standard library is imported at module level, so ``run.py`` can import this file with
any Python; NumPy is imported inside the functions that need it.

Result schema (``SCHEMA_VERSION`` 1)
------------------------------------
::

    {
      "schema": 1,
      "framework": "pytorch",            # "tinycnn" | "pytorch" | "keras" | ...
      "version": "2.13.0",               # the framework's own version string
      "device": "cpu",
      "threads": 2,                      # intra-op threads the framework was told to use
      "step_ms":     STATS,              # one training step (forward + backward + Adam update) at
                                         # batch 128, ms per step; "runs" holds one number per run,
                                         # each the mean over S consecutive steps after warm-up
      "epoch_s":     STATS | null,       # one epoch: 60,000 images at batch 128 (shuffled) plus the
                                         # evaluation over the 10,000 test images at batch 128, as
                                         # fit(..., validation_data=...) does; seconds per epoch;
                                         # null when skipped (--quick / --skip-epoch)
      "inference_s": STATS,              # predict over the 10,000 test images at batch 1000 in
                                         # inference mode (softmax probabilities back as NumPy), s
      "predict_one_ms": STATS,           # optional: serving latency, the softmax output of one
                                         # test image in inference mode, back as NumPy, ms per call
      "kernels": {                       # single-op timings, ms per call (see KERNEL_NAMES)
          "conv1.fwd": STATS, "conv1.bwd_data": STATS, "conv1.bwd_filter": STATS, ...,
          "im2col.conv2": STATS,         # only frameworks that have such a step
          "batchnorm.fwd_train": STATS, "batchnorm.bwd": STATS,
          "maxpool.fwd": STATS, "maxpool.bwd": STATS,
          "softmax_ce.fwd_bwd": STATS
      },
      "peak_rss_mb": 812.4,              # ru_maxrss of the process after the step and epoch parts
      "compile_s": 0.41 | null,          # first step minus a steady step (tracing / JIT / lazy
                                         # init), seconds; null where it means nothing
      "notes": "free text: how things were measured, settings that matter",
      # optional, filled in by new_result():
      "python": "3.11.7", "numpy": "2.4.6", "executable": "/path/to/python",
      "params": 12516,                   # parameter count the framework reports for the model
      "counts": {...}                    # the repeat counts used (see Counts)
    }

    STATS = {"median": float, "min": float, "max": float, "runs": [float, ...]}

A kernel a framework does not have is simply left out of ``kernels``. Extra keys are allowed
anywhere; ``run.py`` shows extra kernels in its table too.

A script that cannot run because its framework is not installed calls ``missing(reason)``:
it prints ``{"framework": ..., "missing": reason}`` on stdout and exits with ``EXIT_MISSING``
(3). Any other non-zero exit is a crash; ``run.py`` reports the tail of its stderr.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

SCHEMA_VERSION = 1
EXIT_MISSING = 3          # exit code of a bench script whose framework is not importable

# ---------------------------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------------------------
SEED = 0
BATCH = 128
N_TRAIN = 60_000
N_TEST = 10_000
PREDICT_BATCH = 1000
PREDICT_ONE_CALLS = 200  # calls averaged in one run of the one-image latency
NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)          # NHWC, without the batch axis
LEARNING_RATE = 0.003
ADAM = {"learning_rate": 0.003, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
BN_MOMENTUM = 0.99                 # Keras convention (new = m * old + (1 - m) * batch)
BN_EPSILON = 1e-3
DROPOUT = 0.1
EXPECTED_PARAMS = 12_516           # Keras count: conv weights + gamma/beta/moving mean/variance

# The "Week2" MNIST model, layer by layer. ("conv", filters, kernel, relu?) convolutions are
# "valid", stride 1, no bias.
WEEK2_LAYERS = [
    ("conv", 16, 3, True), ("bn",), ("dropout", DROPOUT),
    ("conv", 16, 3, True), ("bn",), ("dropout", DROPOUT),
    ("conv", 10, 1, True),
    ("maxpool", 2),
    ("conv", 10, 3, True), ("bn",), ("dropout", DROPOUT),
    ("conv", 16, 3, True), ("bn",), ("dropout", DROPOUT),
    ("conv", 16, 3, True), ("bn",), ("dropout", DROPOUT),
    ("conv", 16, 3, True), ("bn",), ("dropout", DROPOUT),
    ("conv", 10, 4, False), ("bn",),
    ("gap",),
    ("softmax",),
]

# Convolutions at their real place in the model: NHWC input (H, W, C_in) -> C_out, kernel k.
CONVS = {
    "conv1": (28, 28, 1, 16, 3),
    "conv2": (26, 26, 16, 16, 3),
    "conv3": (24, 24, 16, 10, 1),
    "conv4": (12, 12, 10, 10, 3),
    "conv5": (10, 10, 10, 16, 3),
    "conv6": (8, 8, 16, 16, 3),
    "conv7": (6, 6, 16, 16, 3),
    "conv8": (4, 4, 16, 10, 4),
}
BN_SHAPE = (BATCH, 26, 26, 16)         # NHWC, the conv1 output
MAXPOOL_SHAPE = (BATCH, 24, 24, 10)    # NHWC input of the pool
SOFTMAX_SHAPE = (BATCH, NUM_CLASSES)

CONV_PARTS = ("fwd", "bwd_data", "bwd_filter")
KERNEL_NAMES = (
    [f"{c}.{p}" for c in CONVS for p in CONV_PARTS]
    + ["im2col.conv2",
       "batchnorm.fwd_train", "batchnorm.bwd",
       "maxpool.fwd", "maxpool.bwd",
       "softmax_ce.fwd_bwd"]
)


def conv_shapes(name, batch=BATCH):
    """NHWC shapes of one model convolution: {"x": in, "w": (k, k, Cin, Cout) HWIO, "y": out}."""
    h, w, cin, cout, k = CONVS[name]
    return {"x": (batch, h, w, cin), "w": (k, k, cin, cout),
            "y": (batch, h - k + 1, w - k + 1, cout), "k": k}


def make_data(seed=SEED):
    """The synthetic data set, identical for every framework.

    One ``numpy.random.default_rng(seed)`` draws, in this order: x_train (60000, 28, 28, 1)
    float32 uniform [0, 1), y_train (60000,) int64 in 0..9, x_test (10000, 28, 28, 1),
    y_test (10000,). Labels are integers; use ``one_hot`` where a framework wants one-hot.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    x_train = rng.random((N_TRAIN,) + INPUT_SHAPE, dtype=np.float32)
    y_train = rng.integers(0, NUM_CLASSES, N_TRAIN)
    x_test = rng.random((N_TEST,) + INPUT_SHAPE, dtype=np.float32)
    y_test = rng.integers(0, NUM_CLASSES, N_TEST)
    return x_train, y_train, x_test, y_test


def one_hot(labels, num_classes=NUM_CLASSES):
    import numpy as np
    return np.eye(num_classes, dtype=np.float32)[labels]


def step_batch(x_train, y_train):
    """The batch every step benchmark trains on: the first 128 training images and labels."""
    return x_train[:BATCH], y_train[:BATCH]


def warmup_subset(x_train, y_train, x_test, y_test):
    """A small slice for warm-up fits: 2 full batches + a 96-image tail (60000 % 128) of
    training data and 2 full batches + a 16-image tail (10000 % 128) of test data, so every
    batch shape the real epoch meets is traced/compiled before the timed epoch."""
    n_tr = 2 * BATCH + N_TRAIN % BATCH
    n_te = 2 * BATCH + N_TEST % BATCH
    return x_train[:n_tr], y_train[:n_tr], x_test[:n_te], y_test[:n_te]


def random_array(shape, seed=1, low=-1.0, high=1.0):
    """Float32 uniform noise for the kernel benchmarks (values do not matter, shapes do)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return (low + (high - low) * rng.random(shape, dtype=np.float32)).astype(np.float32)


def random_labels(n, seed=2):
    """Integer labels 0..9 for the kernel benchmarks."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, n)


# ---------------------------------------------------------------------------------------------
# Command line and repeat counts
# ---------------------------------------------------------------------------------------------
class Counts:
    """How often to repeat things. Build with ``Counts.from_args(args)``.

    repeats        runs per measurement (the median over them is reported)
    steps          training steps averaged inside one step run
    warmup_steps   untimed steps before the step runs (after the timed first step)
    kernel_calls   calls averaged inside one kernel run
    kernel_warmup  untimed calls before a kernel's runs
    epoch          whether to time epochs
    """

    def __init__(self, repeats=3, steps=50, warmup_steps=5, kernel_calls=20, kernel_warmup=3,
                 epoch=True):
        self.repeats = repeats
        self.steps = steps
        self.warmup_steps = warmup_steps
        self.kernel_calls = kernel_calls
        self.kernel_warmup = kernel_warmup
        self.epoch = epoch

    @classmethod
    def from_args(cls, args):
        if args.quick:
            return cls(repeats=min(args.repeats, 2), steps=min(args.steps, 5), warmup_steps=2,
                       kernel_calls=min(args.kernel_calls, 3), kernel_warmup=1, epoch=False)
        return cls(repeats=args.repeats, steps=args.steps, kernel_calls=args.kernel_calls,
                   epoch=not args.skip_epoch)

    def as_dict(self):
        return dict(vars(self))


def parse_args(description, argv=None):
    """The flags every bench script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--steps", type=int, default=50, help="training steps per step run")
    p.add_argument("--kernel-calls", type=int, default=20, help="calls per kernel run")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")),
                   help="intra-op threads (default $BENCH_THREADS or 2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny counts, no epoch: a smoke test, not a measurement")
    p.add_argument("--skip-epoch", action="store_true", help="do not time full epochs")
    p.add_argument("--no-kernels", action="store_true", help="skip the single-kernel timings")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.kernel_calls < 1:
        p.error("--repeats, --steps and --kernel-calls must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def stats(values):
    """{"median", "min", "max", "runs"} of a list of numbers (rounded to 4 significant-ish
    decimals for readability)."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    return {"median": rounded(statistics.median(vals)), "min": rounded(min(vals)), "max": rounded(max(vals)),
            "runs": [rounded(v) for v in vals]}


def rounded(v):
    return float(f"{v:.6g}")


def time_per_call(fn, calls, repeats, warmup=0, sync=None, scale=1e3):
    """Run ``fn()`` ``warmup`` times, then ``repeats`` runs of ``calls`` calls each; return one
    number per run: the mean time of one call in ms (``scale`` 1e3) or s (``scale`` 1).
    ``sync`` (optional) is called before reading the clock, for asynchronous devices."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    runs = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        runs.append((time.perf_counter() - start) / calls * scale)
    return runs


def fit_batch_ms(model, x, y, batch, warmup, steps, repeats):
    """tinycnn: ms per batch in the steady state of one long `model.fit` (shuffled, no validation),
    as a peer's step loop after its warm-up: `repeats` windows of `steps` consecutive batches after
    the first `warmup` (fit's first batch runs in threads and the second forks its share process,
    tinycnn.share_process: a one-off cost per fit), timed between on_train_batch_end calls. x and y
    are repeated as needed."""
    import numpy as np

    import tinycnn as tc

    rows = (warmup + repeats * steps) * batch
    xs, ys = x[:rows], y[:rows]  # views: no copy of a data set that is long enough
    if xs.shape[0] < rows:
        reps = -(-rows // xs.shape[0])
        xs, ys = np.concatenate([xs] * reps)[:rows], np.concatenate([ys] * reps)[:rows]

    class Clock(tc.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch_index, logs=None):
            self.times.append(time.perf_counter())

    clock = Clock()
    model.fit(xs, ys, batch_size=batch, epochs=1, verbose=0, shuffle=True, callbacks=[clock])
    ends = clock.times[warmup:]  # [k]: the end of batch warmup + k
    return [(ends[(k + 1) * steps] - ends[k * steps]) / steps * 1e3 for k in range(repeats)]


def time_once(fn, sync=None):
    """Seconds taken by one call of ``fn()``."""
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def kernel_stats(fn, counts, sync=None):
    """Stats (ms per call) of one kernel benchmark, with the counts' warm-up and repeats."""
    return stats(time_per_call(fn, counts.kernel_calls, counts.repeats,
                               warmup=counts.kernel_warmup, sync=sync))


TIMER_FLOOR_MS = 1e-3  # the least a difference of two timings is reported as (a drifting host can make it <= 0)


def paired_runs(fn_a, fn_b, counts, sync=None):
    """Runs of two kernel benchmarks, alternating run by run (a's first, b's second, ...), so that
    the i-th runs of each saw the host at about the same speed: (a's ms per call, b's)."""
    for _ in range(counts.kernel_warmup):
        fn_a()
        fn_b()
    runs_a, runs_b = [], []
    for _ in range(counts.repeats):
        runs_a += time_per_call(fn_a, counts.kernel_calls, 1, sync=sync)
        runs_b += time_per_call(fn_b, counts.kernel_calls, 1, sync=sync)
    return runs_a, runs_b


def compile_seconds(first_step_s, step_ms_stats):
    """First step minus the steady (median) step, in s; never negative."""
    if first_step_s is None or not step_ms_stats:
        return None
    return rounded(max(0.0, first_step_s - step_ms_stats["median"] / 1e3))


def peak_rss_mb():
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on
    macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        rss /= 1024
    return rounded(rss / 1024)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
_real_stdout_fd = None


def claim_stdout():
    """Send everything written to stdout (Python or C level) to stderr from now on, and keep
    the real stdout for ``emit``/``missing``. Call first thing in a bench script, so that
    library chatter can never corrupt the JSON."""
    global _real_stdout_fd
    if _real_stdout_fd is None:
        sys.stdout.flush()
        _real_stdout_fd = os.dup(1)
        os.dup2(2, 1)


def _write_json(obj):
    text = json.dumps(obj, allow_nan=False) + "\n"
    sys.stdout.flush()
    if _real_stdout_fd is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        os.write(_real_stdout_fd, text.encode())


def log(*parts):
    """Progress line on stderr."""
    print("[bench]", *parts, file=sys.stderr, flush=True)


def missing(framework, reason):
    """The framework cannot be imported: say why and exit with EXIT_MISSING."""
    log(f"{framework} missing: {reason}")
    _write_json({"schema": SCHEMA_VERSION, "framework": framework, "missing": str(reason)})
    sys.exit(EXIT_MISSING)


def new_result(framework, version, threads, device="cpu", counts=None):
    """A result dict with every schema key present (to be filled in)."""
    try:
        import numpy
        np_version = numpy.__version__
    except ImportError:
        np_version = None
    return {
        "schema": SCHEMA_VERSION,
        "framework": framework,
        "version": str(version),
        "device": device,
        "threads": threads,
        "step_ms": None,
        "epoch_s": None,
        "inference_s": None,
        "kernels": {},
        "peak_rss_mb": None,
        "compile_s": None,
        "notes": "",
        "python": platform.python_version(),
        "numpy": np_version,
        "executable": sys.executable,
        "counts": counts.as_dict() if counts is not None else None,
    }


REQUIRED_KEYS = ("framework", "version", "device", "threads", "step_ms", "epoch_s",
                 "inference_s", "kernels", "peak_rss_mb", "compile_s", "notes")
STATS_KEYS = ("median", "min", "max", "runs")


def validate(result):
    """A list of problems with a result dict (empty when it follows the schema)."""
    problems = []
    if not isinstance(result, dict):
        return ["result is not a JSON object"]
    for key in REQUIRED_KEYS:
        if key not in result:
            problems.append(f"missing key {key!r}")

    def check_stats(where, s, nullable):
        if s is None:
            if not nullable:
                problems.append(f"{where} is null")
            return
        if not isinstance(s, dict) or any(k not in s for k in STATS_KEYS):
            problems.append(f"{where} is not a stats object {STATS_KEYS}")

    check_stats("step_ms", result.get("step_ms"), nullable=False)
    check_stats("epoch_s", result.get("epoch_s"), nullable=True)
    check_stats("inference_s", result.get("inference_s"), nullable=True)
    check_stats("predict_one_ms", result.get("predict_one_ms"), nullable=True)
    kernels = result.get("kernels")
    if not isinstance(kernels, dict):
        problems.append("kernels is not an object")
    else:
        for name, s in kernels.items():
            check_stats(f"kernels[{name!r}]", s, nullable=False)
    return problems


def emit(result):
    """Print the result as one JSON line on the real stdout (after checking it)."""
    for problem in validate(result):
        log("schema warning:", problem)
    _write_json(result)


# ---------------------------------------------------------------------------------------------
# Runner side: environment and machine
# ---------------------------------------------------------------------------------------------
def thread_env(threads=2, base=None):
    """A copy of the environment with every thread knob we know of set to ``threads``
    (inter-op pools to 1), for the benchmark child processes."""
    env = dict(os.environ if base is None else base)
    t = str(threads)
    env.update({
        "OMP_NUM_THREADS": t,
        "MKL_NUM_THREADS": t,
        "OPENBLAS_NUM_THREADS": t,
        "BLIS_NUM_THREADS": t,
        "VECLIB_MAXIMUM_THREADS": t,
        "NUMEXPR_NUM_THREADS": t,
        "NUMBA_NUM_THREADS": t,
        "TF_NUM_INTRAOP_THREADS": t,
        "TF_NUM_INTEROP_THREADS": "1",
        "BENCH_THREADS": t,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KERAS_BACKEND": "tensorflow",
        "TINYCNN_DEVICE": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), None
    model, logical = None, 0
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key == "model name" and model is None:
            model = value.strip()
    return model or platform.machine(), logical or None


def _numpy_info():
    try:
        import numpy
    except ImportError:
        return {"version": None}
    info = {"version": numpy.__version__}
    try:
        cfg = numpy.show_config(mode="dicts")
        deps = cfg.get("Build Dependencies", {})
        info["blas"] = deps.get("blas")
        info["lapack"] = deps.get("lapack")
        simd = cfg.get("SIMD Extensions")
        if simd:
            info["simd"] = simd
    except Exception as exc:       # old NumPy: no mode="dicts"
        info["blas"] = f"unavailable ({type(exc).__name__})"
    return info


def _gpu_name():
    """'NAME, driver VERSION, MEMORY' of the first NVIDIA GPU (nvidia-smi), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def machine_info():
    """What the results were measured on."""
    model, logical = _cpu_model()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
                    break
    except OSError:
        pass
    return {
        "gpu": _gpu_name(),
        "cpu_model": model,
        "logical_cores": logical,
        "os_cpu_count": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": _numpy_info(),
        "load_average": load,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(name, result, text, folder=None):
    """benchmarks/results/<name>.json (the numbers) and <name>.md (the report); returns the text."""
    folder = folder or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(text)
    return text
