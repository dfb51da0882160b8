"""Train a small model for tests/test_distributed.py, on one process or under `mpiexec -n N`.

    python tests/distributed_run.py --out single.npz
    mpiexec -n 2 python tests/distributed_run.py --distributed --out two.npz

Rank 0 writes --out: the final weights, the history, evaluate's results and predict's outputs,
and every rank's weight fingerprint (all ranks must end with the same weights).
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import tinycnn as tc  # noqa: E402
from tinycnn import layers as L  # noqa: E402


def plain_model(seed, dtype, device="cpu"):
    """Convolutions, pooling, Dropout and Dense: no BatchNormalization."""
    return tc.Sequential([
        L.Conv2D(8, 3, activation="relu", input_shape=(28, 28, 1)), L.MaxPooling2D(2), L.Dropout(0.2),
        L.Conv2D(12, 3, activation="relu"), L.GlobalAveragePooling2D(), L.Dropout(0.1),
        L.Dense(10, activation="softmax"),
    ], device=device, seed=seed, dtype=dtype)


def data(samples, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.random((samples, 28, 28, 1), dtype=np.float32)
    labels = (x[:, 8:20, 8:20, 0].mean(axis=(1, 2)) * 40).astype(np.int64) % 10  # learnable from the pixels
    return x, np.eye(10, dtype=np.float32)[labels]


def fingerprint(weights):
    digest = hashlib.sha256()
    for w in weights:
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["plain", "week2"], default="plain")
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--samples", type=int, default=515)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--communicator", default="mpi")
    p.add_argument("--seed", type=int, default=0, help="the model's seed; -1: none (each process draws its own)")
    p.add_argument("--train-on-batch", action="store_true", help="train with train_on_batch on the first batches")
    p.add_argument("--checkpoint", help="write a checkpoint here after every epoch (rank 0)")
    p.add_argument("--resume", help="resume from this checkpoint")
    p.add_argument("--fail-rank", type=int, help="this rank raises in its 2nd training batch")
    p.add_argument("--other-data-rank", type=int, help="this rank passes different data to fit")
    p.add_argument("--sample-weight", action="store_true", help="weight the samples (1, 2, 3, 1, 2, 3, ...)")
    p.add_argument("--caught-error-first", action="store_true",
                   help="first call fit with a batch too small for the ranks, catch the error, then go on")
    p.add_argument("--stop-after-epoch-on-rank-0", type=int, help="rank 0 alone stops fit after this epoch")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    dp = tc.distributed.DataParallel(args.communicator, sync_batchnorm=args.sync_bn) if args.distributed else None
    seed = None if args.seed < 0 else args.seed
    if args.model == "plain":
        model = plain_model(seed, args.dtype, args.device)
    else:
        from week2_model import build_week2_model

        model = build_week2_model(device=args.device, seed=seed, dtype=args.dtype)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["acc"], distribution=dp)
    x, y = data(args.samples)
    rank = dp.rank if dp else 0
    if args.other_data_rank == rank:
        x = x.copy()
        x[0, 0, 0, 0] += 1.0
    done = 0
    if args.resume:
        done, _ = tc.saving.load_checkpoint(model, args.resume)
    callbacks = [tc.callbacks.LearningRateScheduler(lambda e: 0.003 / (1 + 0.319 * e))]
    if args.checkpoint:
        class Checkpoint(tc.callbacks.Callback):
            rank_zero_only = True

            def on_epoch_end(self, epoch, logs=None):
                tc.saving.save_checkpoint(self.model, f"{args.checkpoint}.{epoch + 1}", epoch + 1, [])

        callbacks.append(Checkpoint())
    if args.fail_rank is not None:
        class Fail(tc.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if batch == 1 and rank == args.fail_rank:
                    raise ValueError("an injected failure on this rank")

        callbacks.append(Fail())
    xv, yv = data(200, seed=2)
    weights = (np.arange(x.shape[0]) % 3 + 1.0) if args.sample_weight else None
    if args.caught_error_first:
        try:
            model.fit(x, y, batch_size=1, epochs=1, verbose=0)
        except tc.DistributedError:
            pass
    if args.stop_after_epoch_on_rank_0 is not None:
        class Stop(tc.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if rank == 0 and epoch + 1 >= args.stop_after_epoch_on_rank_0:
                    self.model.stop_training = True

        callbacks.append(Stop())
    if args.train_on_batch:
        logs = [model.train_on_batch(x[k : k + args.batch], y[k : k + args.batch],
                                     sample_weight=None if weights is None else weights[k : k + args.batch])
                for k in (0, 128, 256)]
        history = tc.callbacks.History()
        history.history = {"train_on_batch": logs, "test_on_batch": model.test_on_batch(xv, yv)}
    else:
        history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, initial_epoch=done, verbose=0,
                            validation_data=(xv, yv), callbacks=callbacks, sample_weight=weights)
    evaluated = model.evaluate(xv, yv, batch_size=64, verbose=0)
    predicted = model.predict(xv, batch_size=64, verbose=0)
    final = model.get_weights()
    prints = [fingerprint(final)]
    if dp is not None:  # every rank's fingerprint, to check that all hold the same weights
        mine = np.frombuffer(bytes.fromhex(prints[0]), dtype=np.uint8)[None]
        prints = [bytes(row).hex() for row in dp.gather(mine)]
    if rank == 0:
        np.savez(args.out, *final, history=json.dumps(history.history), evaluated=np.array(evaluated),
                 predicted=predicted, fingerprints=np.array(prints), seed=np.array(model.seed))


if __name__ == "__main__":
    main()
