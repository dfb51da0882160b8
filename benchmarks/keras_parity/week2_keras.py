"""Train the Week2 model in Keras 3 on this machine, as the seed did in Keras 2: Adam(0.003),
lr = 0.003 / (1 + 0.319 * epoch), batch 128, 20 epochs, validation on the test set. A reference
log to read beside tinycnn's (results/keras_week2/).

    PYTHONPATH=. /work/venvs/tf/bin/python benchmarks/keras_parity/week2_keras.py [--epochs 20] [--out results/keras_week2]
"""
import argparse
import json
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixture import build_week2  # noqa: E402

from tinycnn.datasets import mnist  # noqa: E402  (numpy only: no numba needed here)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/keras_week2")
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    (x, y), (xt, yt) = mnist.load_data()
    x, xt = (x.astype("float32") / 255)[..., None], (xt.astype("float32") / 255)[..., None]
    y, yt = np.eye(10, dtype="float32")[y], np.eye(10, dtype="float32")[yt]
    model = build_week2(0.1)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="categorical_crossentropy", metrics=["accuracy"])
    model.summary()
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=128, epochs=args.epochs, validation_data=(xt, yt), verbose=2,
                        callbacks=[keras.callbacks.LearningRateScheduler(lambda e: 0.003 / (1 + 0.319 * e), verbose=1)])
    wall = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"keras": keras.__version__, "wall_seconds": wall, "history": history.history}, f, indent=1)
    acc = history.history["val_accuracy"]
    print(f"best val_accuracy {max(acc):.4f} (epoch {int(np.argmax(acc)) + 1}), final {acc[-1]:.4f}, {wall:.0f} s")


if __name__ == "__main__":
    main()
