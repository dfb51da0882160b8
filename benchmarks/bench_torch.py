"""PyTorch side of the benchmark: the Week2 model, its training step, epoch, inference and
single kernels. Prints one JSON object (schema in common.py) on stdout.

    python benchmarks/bench_torch.py [--repeats 3] [--steps 50] [--quick] [--skip-epoch]

On the CPU by default; BENCH_DEVICE=gpu runs it on CUDA (eager), and BENCH_TORCH_GRAPHS=1 there
replays the training step from a captured CUDA graph (torch.cuda.graph, Adam(capturable=True)):
the framework is then reported as "pytorch-graphs".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

GRAPHS = os.environ.get("BENCH_TORCH_GRAPHS") == "1"
FRAMEWORK = "pytorch-graphs" if GRAPHS else "pytorch"
DEVICE = None  # torch.device, set in main


def build_model(nn):
    """The Week2 model in NCHW (PyTorch's native layout). Returns logits; the softmax is fused
    into the loss (CrossEntropyLoss = log_softmax + nll) and applied explicitly in predict."""
    layers, cin = [], C.INPUT_SHAPE[-1]
    for spec in C.WEEK2_LAYERS:
        kind = spec[0]
        if kind == "conv":
            _, filters, k, relu = spec
            layers.append(nn.Conv2d(cin, filters, k, bias=False))
            if relu:
                layers.append(nn.ReLU())
            cin = filters
        elif kind == "bn":
            # Keras momentum 0.99 == PyTorch momentum 0.01
            layers.append(nn.BatchNorm2d(cin, eps=C.BN_EPSILON, momentum=1 - C.BN_MOMENTUM))
        elif kind == "dropout":
            layers.append(nn.Dropout(spec[1]))
        elif kind == "maxpool":
            layers.append(nn.MaxPool2d(spec[1]))
        elif kind == "gap":
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        elif kind == "softmax":
            pass
        else:
            raise ValueError(kind)
    return nn.Sequential(*layers)


def count_params(model):
    """Keras-style count: learnable parameters + BatchNorm running mean/variance."""
    learnable = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for name, b in model.named_buffers()
                if name.endswith(("running_mean", "running_var")))
    return learnable + stats


def nchw(torch, x):
    """NHWC NumPy images -> contiguous NCHW tensor (a free reshape when C == 1)."""
    import numpy as np
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(DEVICE)


def main():
    C.claim_stdout()
    args = C.parse_args(__doc__)
    counts = C.Counts.from_args(args)
    try:
        import numpy as np
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except ImportError as exc:
        C.missing(FRAMEWORK, f"cannot import torch: {exc}")

    global DEVICE
    cuda = os.environ.get("BENCH_DEVICE", "cpu") == "gpu"
    if cuda and not torch.cuda.is_available():
        C.missing(FRAMEWORK, "BENCH_DEVICE=gpu but torch sees no CUDA device")
    if GRAPHS and not cuda:
        C.missing(FRAMEWORK, "CUDA graphs need BENCH_DEVICE=gpu")
    DEVICE = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else None
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as exc:       # only possible before any parallel work
        C.log("set_num_interop_threads:", exc)
    torch.manual_seed(C.SEED)

    result = C.new_result(FRAMEWORK, torch.__version__, torch.get_num_threads(), device="gpu" if cuda else "cpu",
                          counts=counts)
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    notes = [f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
             f"inter-op {torch.get_num_interop_threads()}, oneDNN {'on' if onednn else 'off'}",
             "NCHW contiguous tensors (PyTorch's native layout), eager mode, no torch.compile",
             "loss = F.cross_entropy on logits (fused log_softmax + nll); Adam(lr=0.003, "
             "betas=(0.9, 0.999), eps=1e-7) with PyTorch's default (for-loop) CPU implementation",
             "BatchNorm2d(eps=1e-3, momentum=0.01) = Keras momentum 0.99"]

    C.log("making data")
    x_train, y_train, x_test, y_test = C.make_data()
    X_train, Y_train = nchw(torch, x_train), torch.from_numpy(y_train).to(DEVICE)
    X_test, Y_test = nchw(torch, x_test), torch.from_numpy(y_test).to(DEVICE)
    xb_np, yb_np = C.step_batch(x_train, y_train)
    xb, yb = nchw(torch, xb_np), torch.from_numpy(yb_np).to(DEVICE)

    model = build_model(nn).to(DEVICE)
    if cuda:
        notes.append(f"CUDA device {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}, "
                     f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    result["params"] = count_params(model)
    if result["params"] != C.EXPECTED_PARAMS:
        notes.append(f"WARNING: {result['params']} params, expected {C.EXPECTED_PARAMS}")
    opt = torch.optim.Adam(model.parameters(), lr=C.ADAM["learning_rate"],
                           betas=(C.ADAM["beta_1"], C.ADAM["beta_2"]), eps=C.ADAM["epsilon"], capturable=GRAPHS)

    def eager_step(x=xb, y=yb):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    train_step = eager_step
    if GRAPHS:  # the whole step captured once (after warm-up on a side stream, as PyTorch's docs do)
        train_step = captured_step(torch, model, opt, F, xb, yb)
        notes.append("step: torch.cuda.graph capture of zero_grad + forward + cross_entropy + backward + "
                     "Adam(capturable=True) step on static batch tensors, replayed; the epoch copies each full "
                     "batch into them and replays, and runs the last, smaller batch eagerly")

    # ---- training step ------------------------------------------------------------------
    C.log("step: first step + warm-up")
    model.train()
    first_s = C.time_once(train_step, sync=sync)
    runs = C.time_per_call(train_step, counts.steps, counts.repeats, warmup=counts.warmup_steps, sync=sync)
    result["step_ms"] = C.stats(runs)
    result["compile_s"] = C.compile_seconds(first_s, result["step_ms"])
    C.log(f"step: {result['step_ms']['median']:.2f} ms (first step {first_s * 1e3:.1f} ms)")

    # ---- epoch -----------------------------------------------------------------------------
    perm_rng = np.random.default_rng(C.SEED + 1)

    def run_epoch(X, Y, Xv, Yv):
        model.train()
        n = X.shape[0]
        order = torch.from_numpy(perm_rng.permutation(n)).to(DEVICE)
        seen = correct = 0
        total_loss = 0.0
        for start in range(0, n, C.BATCH):
            idx = order[start:start + C.BATCH]
            x, y = X.index_select(0, idx), Y.index_select(0, idx)
            if GRAPHS and y.shape[0] == C.BATCH:
                train_step.x.copy_(x)
                train_step.y.copy_(y)
                train_step()
                loss, logits = train_step.loss, train_step.logits
            else:
                opt.zero_grad(set_to_none=not GRAPHS)  # a captured step's grads stay allocated
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
                opt.step()
            # on the CPU .item() per batch, as fit's metrics do; on a GPU that would sync every batch,
            # so the sums stay on the device until the epoch ends
            batch_loss, batch_correct = loss.detach() * y.shape[0], (logits.argmax(1) == y).sum()
            total_loss += batch_loss if cuda else batch_loss.item()
            correct += batch_correct if cuda else batch_correct.item()
            seen += y.shape[0]
        total_loss, correct = float(total_loss), int(correct)
        model.eval()
        v_loss = 0.0
        v_correct = 0
        with torch.no_grad():
            for start in range(0, Xv.shape[0], C.BATCH):
                x, y = Xv[start:start + C.BATCH], Yv[start:start + C.BATCH]
                logits = model(x)
                v_loss += F.cross_entropy(logits, y, reduction="sum").item()
                v_correct += (logits.argmax(1) == y).sum().item()
        return total_loss / seen, correct / seen, v_loss / Xv.shape[0], v_correct / Xv.shape[0]

    if counts.epoch:
        wx, wy, wvx, wvy = C.warmup_subset(x_train, y_train, x_test, y_test)
        run_epoch(nchw(torch, wx), torch.from_numpy(wy), nchw(torch, wvx), torch.from_numpy(wvy))
        ep = []
        for r in range(counts.repeats):
            C.log(f"epoch {r + 1}/{counts.repeats}")
            ep.append(C.time_once(lambda: run_epoch(X_train, Y_train, X_test, Y_test), sync=sync))
            C.log(f"epoch {r + 1}: {ep[-1]:.2f} s")
        result["epoch_s"] = C.stats(ep)
        notes.append("epoch: hand-written loop (shuffled index_select batches, loss/accuracy "
                     "tracked with .item() per batch as fit's metrics do) + eval at batch 128 "
                     "under no_grad; warm-up on a 352/272-image subset first")
    result["peak_rss_mb"] = C.peak_rss_mb()

    # ---- inference -------------------------------------------------------------------------
    def predict():
        model.eval()
        outs = []
        with torch.inference_mode():
            for start in range(0, X_test.shape[0], C.PREDICT_BATCH):
                outs.append(torch.softmax(model(X_test[start:start + C.PREDICT_BATCH]), dim=1))
        return torch.cat(outs).cpu().numpy()

    C.log("inference")
    predict()
    result["inference_s"] = C.stats(C.time_per_call(predict, 1, counts.repeats, scale=1.0, sync=sync))

    def predict_one():
        with torch.inference_mode():
            return torch.softmax(model(X_test[:1]), dim=1).cpu().numpy()

    C.log("predict one image")
    model.eval()
    result["predict_one_ms"] = C.stats(C.time_per_call(predict_one, C.PREDICT_ONE_CALLS, counts.repeats, warmup=10,
                                                       sync=sync))
    notes.append("predict_one = softmax(model(x[:1])) under inference_mode, eval mode, .numpy()")

    # ---- kernels ---------------------------------------------------------------------------
    if not args.no_kernels:
        result["kernels"] = kernels(torch, F, counts, notes, sync)

    result["notes"] = "; ".join(notes)
    C.emit(result)


def captured_step(torch, model, opt, F, xb, yb):
    """The training step on static copies of (xb, yb), captured as one CUDA graph: a callable that
    replays it, with .x/.y (the static inputs) and .loss/.logits (the static outputs)."""
    static_x, static_y = xb.clone(), yb.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: cuDNN's choices and the optimizer's state, before capture
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(static_x), static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_logits = model(static_x)
        static_loss = F.cross_entropy(static_logits, static_y)
        static_loss.backward()
        opt.step()

    def replay():
        graph.replay()

    replay.x, replay.y, replay.loss, replay.logits = static_x, static_y, static_loss, static_logits
    return replay


def kernels(torch, F, counts, notes, sync=None):
    """Single-op timings, ms per call, on NCHW tensors of the model's shapes at batch 128."""
    out = {}

    def t(name, fn):
        with torch.no_grad():
            out[name] = C.kernel_stats(fn, counts, sync=sync)
        C.log(f"kernel {name}: {out[name]['median']:.3f} ms")

    def tensor(shape_nhwc, seed):
        return nchw(torch, C.random_array(shape_nhwc, seed))

    for i, name in enumerate(C.CONVS):
        s = C.conv_shapes(name)
        x = tensor(s["x"], 10 + i)
        k, cin, cout = s["w"][0], s["w"][2], s["w"][3]
        w = torch.from_numpy(C.random_array((cout, cin, k, k), 20 + i)).to(DEVICE)
        gy = tensor(s["y"], 30 + i)
        t(f"{name}.fwd", lambda: F.conv2d(x, w))
        t(f"{name}.bwd_data", lambda: torch.nn.grad.conv2d_input(x.shape, w, gy))
        t(f"{name}.bwd_filter", lambda: torch.nn.grad.conv2d_weight(x, w.shape, gy))

    # BatchNorm: the ATen kernels autograd runs (native_batch_norm / native_batch_norm_backward)
    x = tensor(C.BN_SHAPE, 40)
    gy = tensor(C.BN_SHAPE, 41)
    c = x.shape[1]
    gamma, beta = torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE)
    rmean, rvar = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    mom, eps = 1 - C.BN_MOMENTUM, C.BN_EPSILON
    t("batchnorm.fwd_train",
      lambda: torch.native_batch_norm(x, gamma, beta, rmean, rvar, True, mom, eps))
    _, save_mean, save_invstd = torch.native_batch_norm(x, gamma, beta, rmean, rvar, True, mom, eps)
    t("batchnorm.bwd", lambda: torch.ops.aten.native_batch_norm_backward(
        gy, x, gamma, rmean, rvar, save_mean, save_invstd, True, eps, [True, True, True]))

    # MaxPool 2x2: forward with indices (what training uses), backward from the indices
    x = tensor(C.MAXPOOL_SHAPE, 50)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    gy = torch.from_numpy(C.random_array(tuple(y.shape), 51)).to(DEVICE)
    t("maxpool.fwd", lambda: F.max_pool2d(x, 2, return_indices=True))
    t("maxpool.bwd", lambda: torch.ops.aten.max_pool2d_with_indices_backward(
        gy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx))

    # Softmax + cross-entropy, forward and backward through autograd
    logits = torch.from_numpy(C.random_array(C.SOFTMAX_SHAPE, 60)).to(DEVICE).requires_grad_(True)
    labels = torch.from_numpy(C.random_labels(C.BATCH, 61)).to(DEVICE)

    def ce():
        with torch.enable_grad():
            return torch.autograd.grad(F.cross_entropy(logits, labels), logits)
    t("softmax_ce.fwd_bwd", ce)

    # Python dispatch cost of one tiny op, to judge the smallest kernels against
    tiny = torch.zeros(1, device=DEVICE)
    disp = C.kernel_stats(lambda: torch.relu(tiny), counts, sync=sync)
    notes.append("kernels: NCHW, torch.no_grad; conv fwd = F.conv2d, bwd_data = "
                 "torch.nn.grad.conv2d_input, bwd_filter = torch.nn.grad.conv2d_weight (both "
                 "call aten.convolution_backward, the op autograd uses); batchnorm = "
                 "torch.native_batch_norm / aten.native_batch_norm_backward (train mode); "
                 "maxpool = F.max_pool2d(return_indices=True) / "
                 "aten.max_pool2d_with_indices_backward; softmax_ce = autograd.grad of "
                 "F.cross_entropy; each includes Python dispatch, about "
                 f"{disp['median'] * 1e3:.1f} us for a 1-element relu")
    return out


if __name__ == "__main__":
    main()
