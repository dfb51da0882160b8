"""Reproduce the Week2 Keras MNIST model and its training log with tinycnn.

    python examples/week2_mnist.py [--device auto|cpu|gpu] [--epochs 20] [--batch-size 128]
                                   [--seed 0] [--train-limit N] [--out runs/week2] [--summary] [--resume]
                                   [--onnx] [--distributed [--sync-bn]]

    mpiexec -n 2 python examples/week2_mnist.py --distributed     # data parallel on 2 processes

Prints the model summary and the Keras 2 training log, then this run's validation accuracy
beside the seed's for every epoch. Writes to --out: log.txt, history.json, weights.npz,
checkpoint.npz (after every epoch, atomically; --resume continues from it), curves.png and
misclassified.png (with matplotlib installed), and with --onnx week2.onnx, the inference graph.
With --distributed (under mpiexec) the ranks share every batch of --batch-size (the global batch)
and rank 0 alone prints and writes; --sync-bn makes BatchNormalization use the global batch's
statistics, as one process does.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from example_tools import (EpochRecorder, cli_integer, machine, plot_curves, plot_misclassified,  # noqa: E402
                           resume_settings, run_logged, write_json_atomic)
from week2_model import build_week2_model  # noqa: E402

import tinycnn as tc  # noqa: E402
from tinycnn.datasets import DatasetError, mnist  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_BEST, TARGET_FINAL = 0.9940, 0.9935


def learning_rate(epoch):
    """The seed's per-epoch schedule: 0.003 / (1 + 0.319 * epoch), epoch counted from 0."""
    return 0.003 / (1 + 0.319 * epoch)


def load_mnist(limit):
    (x_train, y_train), (x_test, y_test) = mnist.load_data()
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]

    def prepare(x, y):  # [0, 1] floats with a channel axis, one-hot labels
        return (x.astype(np.float32) / 255.0)[..., None], np.eye(10, dtype=np.float32)[y]

    return prepare(x_train, y_train), prepare(x_test, y_test), y_test


def comparison_table(records, seed_log):
    lines = ["", "epoch  val_acc (tinycnn)  val_acc (seed)"]
    seed = {e["epoch"]: e["val_acc"] for e in seed_log}
    for r in records:
        s = seed.get(r["epoch"])
        lines.append(f"{r['epoch']:5d}  {r['val_acc']:17.4f}  {'' if s is None else f'{s:14.4f}'}")
    accs = [r["val_acc"] for r in records]
    best = int(np.argmax(accs))
    lines.append(f"best val_acc {accs[best]:.4f} (epoch {records[best]['epoch']}), final {accs[-1]:.4f}; "
                 f"seed: best {max(seed.values()):.4f}, final {seed[max(seed)]:.4f}")
    return "\n".join(lines)


def plot(out, records, seed_log, x_test, labels, predicted):
    plot_curves(os.path.join(out, "curves.png"), records, seed_log, "seed (Keras) validation", TARGET_BEST)
    plot_misclassified(os.path.join(out, "misclassified.png"), x_test, labels, predicted)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--epochs", type=cli_integer(0), default=20)
    parser.add_argument("--batch-size", type=cli_integer(1), default=128)
    parser.add_argument("--seed", type=cli_integer(0), default=0)
    parser.add_argument("--train-limit", type=cli_integer(1), default=None, metavar="N",
                        help="train on the first N images")
    parser.add_argument("--out", default="runs/week2")
    parser.add_argument("--summary", action="store_true", help="print the model summary and exit")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--onnx", action="store_true", help="also write week2.onnx (needs the onnx package)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training under mpiexec (tinycnn.distributed; needs mpi4py)")
    parser.add_argument("--sync-bn", action="store_true", help="with --distributed: synchronized BatchNormalization")
    args = parser.parse_args(argv)

    dp = None
    try:
        if args.distributed:  # first: it chooses each rank's GPU and CPU threads
            dp = tc.distributed.DataParallel(sync_batchnorm=args.sync_bn)
        model = build_week2_model(device=args.device, seed=args.seed)
    except (tc.DeviceError, tc.DistributedError) as exc:
        print(f"week2_mnist: {exc}", file=sys.stderr)
        return 2
    if dp is not None and not dp.is_chief:  # rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
    if args.summary:
        model.summary()
        return 0

    checkpoint = os.path.join(args.out, "checkpoint.npz")
    resuming = args.resume and os.path.exists(checkpoint)
    if dp is not None and not dp.is_chief:
        return run(args, model, checkpoint, resuming, dp)
    return run_logged(args.out, lambda: run(args, model, checkpoint, resuming, dp), append=resuming)


def run(args, model, checkpoint, resuming, dp=None):
    model.summary()
    print(f"\nbackend: {model.backend.describe()}")
    try:
        with dp.rank_zero_first() if dp is not None else contextlib.nullcontext():  # one download
            (x_train, y_train), (x_test, y_test), test_labels = load_mnist(args.train_limit)
    except DatasetError as exc:
        print(f"week2_mnist: {exc}", file=sys.stderr)
        return 1
    model.compile(optimizer=tc.optimizers.Adam(0.003), loss="categorical_crossentropy", metrics=["acc"],
                  distribution=dp)
    records, done = [], 0
    run_info = {"device": model.backend.name, "backend": model.backend.describe(), "seed": args.seed,
                "batch_size": args.batch_size, "train_samples": int(x_train.shape[0]), "machine": machine()}
    if dp is not None:
        run_info["distributed"] = dp.describe()
    if args.resume and not resuming:
        print(f"(no checkpoint in {args.out}: starting from epoch 1)")
    if resuming:
        try:
            done, records = tc.saving.load_checkpoint(model, checkpoint, settings=resume_settings(run_info))
        except tc.WeightsFileError as exc:
            print(f"week2_mnist: cannot resume: {exc}", file=sys.stderr)
            return 2
        print(f"resuming after epoch {done} from {checkpoint}")
    started = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, initial_epoch=done,
              validation_data=(x_test, y_test), verbose=1,
              callbacks=[tc.callbacks.LearningRateScheduler(learning_rate, verbose=1),
                         EpochRecorder(args.out, run_info, records)])
    wall = time.perf_counter() - started
    predicted = model.predict(x_test, batch_size=1000, verbose=0).argmax(axis=1)  # every rank: a collective
    if dp is not None and not dp.is_chief:
        return 0
    model.save_weights(os.path.join(args.out, "weights.npz"))
    if args.onnx:
        model.export_onnx(os.path.join(args.out, "week2.onnx"))
        print(f"wrote {os.path.join(args.out, 'week2.onnx')} (serve it with ONNX Runtime: see the README)")
    with open(os.path.join(HERE, "week2_seed_log.json")) as f:
        seed_log = json.load(f)["log"]
    if records:
        print(comparison_table(records, seed_log))
        accs = [r["val_acc"] for r in records]
        met = max(accs) >= TARGET_BEST and accs[-1] >= TARGET_FINAL
        print(f"target (best >= {TARGET_BEST:.2%}, final >= {TARGET_FINAL:.2%}): {'met' if met else 'not met'}; "
              f"this run's training took {wall:.0f} s")
        # what EpochRecorder wrote after the last epoch, and this invocation's wall time
        write_json_atomic(os.path.join(args.out, "history.json"),
                          {**run_info, "epochs": records, "wall_seconds_this_invocation": wall})
        plot(args.out, records, seed_log, x_test, test_labels, predicted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
