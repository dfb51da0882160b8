"""tinycnn side of the benchmark: the Week2 model's training step, epoch, inference and single
kernels, on the backend TINYCNN_DEVICE selects (cpu by default). One JSON object on stdout
(schema in common.py).

    python benchmarks/bench_tinycnn.py [--repeats 3] [--steps 50] [--quick] [--skip-epoch]
"""
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common as C  # noqa: E402

STEP = os.environ.get("TINYCNN_STEP", "eager")  # fit's step: eager, static, graphs (tinycnn.static_step)
FRAMEWORK = "tinycnn" if STEP == "eager" else f"tinycnn-{STEP}"


def cold_compile_seconds():
    """One Week2 training step in a fresh process with an empty numba cache, minus the same with
    the cache warm: what the first run on a new machine pays once."""
    code = ("import time; t = time.perf_counter(); import step_time as s; m = s.make_model('cpu'); "
            "x, y = s.batch(m); s.step(m, x, y); print(time.perf_counter() - t)")

    def run(env):
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
        return float(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as cache:
        cold = run({**os.environ, "NUMBA_CACHE_DIR": cache})
        warm = run({**os.environ, "NUMBA_CACHE_DIR": cache})
    with tempfile.TemporaryDirectory() as cache:  # python -m tinycnn.precompile first, as the README's install does
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tinycnn.precompile"], cwd=ROOT, env=env, capture_output=True,
                       check=True, timeout=900)
        precompile = time.perf_counter() - start
        after = run(env)
    return cold, warm, precompile, after


def main():
    C.claim_stdout()
    args = C.parse_args(__doc__)
    counts = C.Counts.from_args(args)
    try:
        import numpy as np

        import tinycnn as tc
        from step_time import make_model, step
    except ImportError as exc:
        C.missing(FRAMEWORK, f"cannot import tinycnn: {exc}")

    device = os.environ.get("TINYCNN_DEVICE", "cpu")
    try:
        model = make_model(device, seed=C.SEED)
    except tc.DeviceError as exc:
        C.missing(FRAMEWORK, str(exc))
    be = model.backend
    threads = int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count()))
    result = C.new_result(FRAMEWORK, tc.__version__, threads, device=be.name, counts=counts)
    result["params"] = model.count_params()
    notes = [f"backend {be.describe()}", "float32 NHWC; numba on OpenMP threads on all cores, idle threads spin 1000 rounds then sleep (GOMP_SPINCOUNT=1000); no BLAS in the step",
             "step = forward + fused softmax-CE + backward + one fused Adam update over the flat parameter buffer",
             "on the CPU the step's batch and inference's sub-batches run as two halves, each on one numba thread "
             "(tinycnn.batch_split): in fit the second half in a forked process (tinycnn.share_process), elsewhere "
             "in a second thread (kernel timings below use all threads on the whole batch)",
             "numba kernels load from the on-disk cache; compile_s = first step - steady step with a warm cache, "
             "compile_cold_s = the same in a fresh process with an empty cache"]

    def sync():
        if be.name == "gpu":
            be.xp.cuda.Device().synchronize()

    C.log("making data")
    x_train, y_train, x_test, y_test = C.make_data()
    y_train1, y_test1 = C.one_hot(y_train), C.one_hot(y_test)
    xb_np, yb_np = C.step_batch(x_train, y_train)
    xb, yb = be.asarray(xb_np), be.asarray(C.one_hot(yb_np))

    C.log("step: first step + warm-up")
    xs_steps, ys_steps = x_train[: counts.steps * C.BATCH], y_train1[: counts.steps * C.BATCH]

    def steps_in_fit():
        model.fit(xs_steps, ys_steps, batch_size=C.BATCH, epochs=1, verbose=0, shuffle=True)

    if STEP == "eager":
        def one_step():
            step(model, xb, yb)
        first_s = C.time_once(one_step, sync=sync)
        runs = C.time_per_call(one_step, counts.steps, counts.repeats, warmup=counts.warmup_steps, sync=sync)
        if be.name == "cpu":  # fit runs a split batch's second half in a process (tinycnn.share_process)
            result["train_step_ms"] = C.stats(runs)
            runs = C.fit_batch_ms(model, x_train, y_train1, C.BATCH, counts.warmup_steps, counts.steps,
                                  counts.repeats)
            notes.append(f"step: the steady state of model.fit, as the peers' step loops: one fit (shuffled, no "
                         f"validation) over {counts.warmup_steps} + {counts.repeats} x {counts.steps} batches of "
                         f"{C.BATCH}, each run the mean batch time (between on_train_batch_end calls) of "
                         f"{counts.steps} consecutive batches after the first {counts.warmup_steps} (which include "
                         "the fork of fit's share process, tinycnn.share_process); train_step_ms: model.train_step "
                         "on one batch in a loop (both halves in threads)")
    else:  # static steps run inside fit: time fit over `steps` full batches, per batch
        first_s = C.time_once(steps_in_fit, sync=sync) / counts.steps
        runs = [C.time_once(steps_in_fit, sync=sync) * 1e3 / counts.steps for _ in range(counts.repeats)]
        notes.append(f"step ({STEP}): model.fit over {counts.steps} batches of {C.BATCH} (one epoch, "
                     "shuffled, no validation) per run, divided by the batches; first_s: the first such fit "
                     "(the warm-up and capture) per batch")
    result["step_ms"] = C.stats(runs)
    result["compile_s"] = C.compile_seconds(first_s, result["step_ms"])
    C.log(f"step: {result['step_ms']['median']:.2f} ms (first step {first_s * 1e3:.1f} ms)")

    if counts.epoch:
        wx, wy, wvx, wvy = C.warmup_subset(x_train, y_train, x_test, y_test)

        def epoch(x, y, xv, yv):
            model.fit(x, y, batch_size=C.BATCH, epochs=1, validation_data=(xv, yv), verbose=0)

        epoch(wx, C.one_hot(wy), wvx, C.one_hot(wvy))
        ep = []
        for r in range(counts.repeats):
            ep.append(C.time_once(lambda: epoch(x_train, y_train1, x_test, y_test1), sync=sync))
            C.log(f"epoch {r + 1}: {ep[-1]:.2f} s")
        result["epoch_s"] = C.stats(ep)
        notes.append("epoch: model.fit(epochs=1, batch_size=128, validation_data=10,000 test images, verbose=0), "
                     "input checks and device-side shuffling included; warm-up fit on a small subset first")
    result["peak_rss_mb"] = C.peak_rss_mb()

    C.log("inference")
    model.predict(x_test[: C.PREDICT_BATCH], batch_size=C.PREDICT_BATCH, verbose=0)
    result["inference_s"] = C.stats(C.time_per_call(lambda: model.predict(x_test, batch_size=C.PREDICT_BATCH, verbose=0), 1,
                                                    counts.repeats, scale=1.0, sync=sync))

    C.log("predict one image")
    one = x_test[:1]
    result["predict_one_ms"] = C.stats(C.time_per_call(lambda: model.predict(one, verbose=0), C.PREDICT_ONE_CALLS,
                                                       counts.repeats, warmup=10, sync=sync))
    notes.append("predict_one = model.predict(x_test[:1], verbose=0): input checks, callbacks and the NumPy result "
                 "included")

    if not args.no_kernels:
        result["kernels"] = kernels(np, be, counts, notes, sync)
    if be.name == "cpu" and not args.quick:
        C.log("numba compile: cold cache vs warm cache")
        cold, warm, precompile, after = cold_compile_seconds()
        result["compile_cold_s"] = C.rounded(cold - warm)
        result["precompile_s"], result["first_step_after_precompile_s"] = C.rounded(precompile), C.rounded(after)
        notes.append(f"first step in a fresh process: {cold:.1f} s with an empty numba cache, {warm:.1f} s with it "
                     f"warm; `python -m tinycnn.precompile` into an empty cache {precompile:.1f} s, and the first step "
                     f"after it {after:.1f} s")
    result["notes"] = "; ".join(notes)
    C.emit(result)


def kernels(np, be, counts, notes, sync):
    """ms per call of the backend's kernels at the Week2 shapes, batch 128."""
    k, xp = be.kernels, be.xp
    out = {}

    def t(name, fn):
        out[name] = C.kernel_stats(fn, counts, sync=sync)
        C.log(f"kernel {name}: {out[name]['median']:.3f} ms")

    nopad = (0, 0, 0, 0)
    for i, name in enumerate(C.CONVS):
        s = C.conv_shapes(name)
        kk = s["k"]
        x = be.asarray(C.random_array(s["x"], 10 + i))
        w2d = be.asarray(C.random_array(s["w"], 20 + i).reshape(-1, s["w"][3]))
        dz = be.asarray(C.random_array(s["y"], 30 + i).reshape(-1, s["w"][3]))
        dk = xp.empty(w2d.shape, dtype=w2d.dtype)
        _, saved = k.conv2d_forward(x, w2d, kk, kk, (1, 1), nopad)
        t(f"{name}.fwd", lambda: k.conv2d_forward(x, w2d, kk, kk, (1, 1), nopad))
        # bwd_data is what computing dx adds to the call that computes the filter gradient alone: the
        # two calls' runs alternate and each pair's difference counts (against the median filter-only
        # run, a drifting host once made every difference of Week2's conv8, 0.03 ms, zero or less)
        only_filter, both = C.paired_runs(
            lambda: k.conv2d_backward(dz, saved, s["x"], w2d, kk, kk, (1, 1), nopad, dk, False),
            lambda: k.conv2d_backward(dz, saved, s["x"], w2d, kk, kk, (1, 1), nopad, dk, True), counts, sync=sync)
        out[f"{name}.bwd_filter"] = C.stats(only_filter)
        C.log(f"kernel {name}.bwd_filter: {out[f'{name}.bwd_filter']['median']:.3f} ms")
        data = C.stats([max(C.TIMER_FLOOR_MS, b - f) for f, b in zip(only_filter, both)])
        # its best: the best call with dx minus the best without (the least of the differences would
        # take the one run whose filter-only half the host slowed)
        data["min"] = C.rounded(max(C.TIMER_FLOOR_MS, min(both) - min(only_filter)))
        out[f"{name}.bwd_data"] = data
    x = be.asarray(C.random_array(C.conv_shapes("conv2")["x"], 70))
    t("im2col.conv2", lambda: k.im2col(x, 3, 3, (1, 1), nopad))

    x2d = be.asarray(C.random_array(C.BN_SHAPE, 40).reshape(-1, C.BN_SHAPE[-1]))
    dy2d = be.asarray(C.random_array(C.BN_SHAPE, 41).reshape(-1, C.BN_SHAPE[-1]))
    gamma, beta = xp.ones(x2d.shape[1], dtype=xp.float32), xp.zeros(x2d.shape[1], dtype=xp.float32)
    t("batchnorm.fwd_train", lambda: k.batchnorm_forward_train(x2d, gamma, beta, C.BN_EPSILON))
    _, xhat, _, _, inv_std = k.batchnorm_forward_train(x2d, gamma, beta, C.BN_EPSILON)
    t("batchnorm.bwd", lambda: k.batchnorm_backward_train(dy2d, xhat, gamma, inv_std))

    x = be.asarray(C.random_array(C.MAXPOOL_SHAPE, 50))
    y, argmax = k.maxpool_forward(x, (2, 2), (2, 2), nopad)
    dy = be.asarray(C.random_array(tuple(y.shape), 51))
    t("maxpool.fwd", lambda: k.maxpool_forward(x, (2, 2), (2, 2), nopad))
    t("maxpool.bwd", lambda: k.maxpool_backward(dy, argmax, C.MAXPOOL_SHAPE, (2, 2), (2, 2), nopad))

    logits = be.asarray(C.random_array(C.SOFTMAX_SHAPE, 60))
    targets = be.asarray(C.one_hot(C.random_labels(C.BATCH, 61)))
    t("softmax_ce.fwd_bwd", lambda: k.softmax_cross_entropy(logits, targets))
    from tinycnn.kernels.cpu_conv import HEIGHT

    registers = "AVX-512" if HEIGHT == 8 else "AVX2"
    notes.append("kernels: the backend's kernel table at the model's shapes (NHWC); on the CPU every Week2 "
                 f"convolution (1x1 included) is a direct convolution: generated numba loops holding {HEIGHT} output "
                 f"pixels x 16 filters in {registers} registers (LLVM's SLP vectorizer on for these kernels only), no "
                 f"im2col and no BLAS; bwd_filter = conv2d_backward without dx (register-blocked over {HEIGHT} kernel "
                 "elements x 16 filters, in L1-sized strips of rows); bwd_data = conv2d_backward with dx minus "
                 "bwd_filter, run by run, the two alternating (dx as a gather, the padded output gradient convolved "
                 "with the flipped kernel, or where that pads mostly zeros, as conv2 and conv5-conv8, a scatter of "
                 "each output pixel's products into the input pixels it read); "
                 "im2col.conv2 is timed for reference (only TINYCNN_CONV=gemm uses it); batchnorm = fused "
                 "numba passes; maxpool keeps an int32 argmax")
    return out


if __name__ == "__main__":
    main()
