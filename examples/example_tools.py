"""What the examples share: command-line number types, a log that tees the terminal to log.txt, a
description of the machine, atomic JSON, per-epoch records with a checkpoint, and the learning-curve
and misclassified plots."""
import argparse
import json
import os
import platform
import sys

import numpy as np

import tinycnn as tc


def cli_integer(minimum):
    """An argparse type: an integer >= minimum (argparse then prints usage and the problem, not a traceback)."""
    def parse(text):
        try:
            return tc.arguments.integer(int(text), "value", minimum=minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None

    parse.__name__ = f"integer >= {minimum}"
    return parse


# What a resumed run must share with the run that wrote its checkpoint (else its log mixes two runs).
RESUME_SETTINGS = ("seed", "batch_size", "train_samples", "width")


def resume_settings(run_info):
    return {key: run_info[key] for key in RESUME_SETTINGS if key in run_info}


class TeeLog:
    """Writes to the terminal and to a log file; the file gets each line as it finally reads
    (a progress bar redrawn in place with \\r appears once, finished)."""

    def __init__(self, stream, path, mode):
        self.stream, self.file, self.pending = stream, open(path, mode), ""

    def write(self, text):
        self.stream.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.file.write(line.rsplit("\r", 1)[-1].replace("\b", "") + "\n")
        self.file.flush()

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return self.stream.isatty()

    def close(self):
        self.file.close()


def run_logged(out, run, append=False):
    """`run()` with everything it prints also written to out/log.txt; returns what run returns
    (exit status 2, with the reason, when `out` cannot be a directory of results)."""
    try:
        os.makedirs(out, exist_ok=True)
        log = TeeLog(sys.stdout, os.path.join(out, "log.txt"), "a" if append else "w")
    except OSError as exc:
        print(f"{os.path.basename(sys.argv[0])}: cannot write results to {out!r}: {exc.strerror or exc} "
              "(--out must be a directory, or a path where one can be made)", file=sys.stderr)
        return 2
    sys.stdout = log
    try:
        return run()
    finally:
        sys.stdout = log.stream
        log.close()


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}


def write_json_atomic(path, data):
    with tc.files.atomic_write(path, "w") as f:
        json.dump(data, f, indent=1)


class EpochRecorder(tc.callbacks.Callback):
    """After every epoch: the history so far to history.json and a checkpoint to resume from
    (rank 0 alone, in data-parallel training)."""

    rank_zero_only = True

    def __init__(self, out, run_info, records):
        super().__init__()
        self.out, self.run_info, self.records = out, run_info, records

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        self.records.append(entry)
        tc.saving.save_checkpoint(self.model, os.path.join(self.out, "checkpoint.npz"), epoch + 1, self.records,
                                  settings=resume_settings(self.run_info))
        write_json_atomic(os.path.join(self.out, "history.json"), {**self.run_info, "epochs": self.records})


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('(matplotlib is not installed: no plots; pip install -e ".[plot]")')
        return None
    return plt


def plot_curves(path, records, reference=None, reference_label="reference", target=None, acc_range=(0.97, 1.0)):
    """Loss (log scale) and accuracy per epoch, train and validation, with an optional reference
    run's validation curve and a target line."""
    plt = pyplot()
    if plt is None:
        return
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [r["loss"] for r in records], label="train")
    ax1.plot(epochs, [r["val_loss"] for r in records], label="validation")
    ax2.plot(epochs, [r["acc"] for r in records], label="train")
    ax2.plot(epochs, [r["val_acc"] for r in records], label="validation")
    if reference:
        ax1.plot([e["epoch"] for e in reference], [e["val_loss"] for e in reference], "k--", label=reference_label)
        ax2.plot([e["epoch"] for e in reference], [e["val_acc"] for e in reference], "k--", label=reference_label)
    if target is not None:
        ax2.axhline(target, color="grey", lw=0.5)
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=acc_range, title="accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with tc.files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_misclassified(path, images, labels, predicted, names=None, count=48):
    """The first `count` misclassified images, titled true -> predicted."""
    plt = pyplot()
    if plt is None:
        return
    wrong = np.flatnonzero(predicted != labels)[:count]
    cols = 12
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(images[i].reshape(images.shape[1], images.shape[2]), cmap="gray_r")
        true, guess = (names[labels[i]], names[predicted[i]]) if names else (labels[i], predicted[i])
        ax.set_title(f"{true}→{guess}", fontsize=7 if names else 9)
    fig.suptitle(f"{int((predicted != labels).sum())} misclassified test images (true→predicted), first {len(wrong)}")
    fig.tight_layout()
    with tc.files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
