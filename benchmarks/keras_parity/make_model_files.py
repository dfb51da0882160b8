#!/usr/bin/env python
"""Produce the `.keras` model-file fixture: files written by real Keras 3 for tinycnn to load, and
files written by tinycnn that real Keras loads, with Keras's predictions for both.

Two steps, each in its own environment (tinycnn never imports Keras):

    python benchmarks/keras_parity/make_model_files.py tinycnn        # tinycnn's venv
    /path/to/tf-venv/bin/python benchmarks/keras_parity/make_model_files.py keras   # tensorflow-cpu + keras 3

writes, in tests/data/keras_models/:

    tinycnn_functional.keras, tinycnn_sequential.keras   written by tinycnn (step 1)
    keras_functional.keras, keras_sequential.keras       written by Keras (step 2)
    reference.npz   the inputs, Keras's predictions of its own two files, and Keras's predictions
                    of tinycnn's two files after loading them with keras.models.load_model

The two architectures are the same in both frameworks: a functional network that uses every layer
kind a Keras CNN script meets and tinycnn has (rescaling, convolutions plain, depthwise and
separable, batch normalization, the activations, a residual Add, a Concatenate of two branches,
both poolings with 'same' padding, zero padding, global pooling, dropout, dense), and a Sequential
classifier that ends in logits and is compiled with a from_logits loss. Each is trained for a few
steps on random data first, so that its batch-normalization statistics are not the initial ones.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "..", "tests", "data", "keras_models")
IMAGE = (12, 12, 1)
FEATURES = (6,)


def inputs():
    rng = np.random.default_rng(0)
    return (rng.random((16,) + IMAGE, dtype=np.float32) * 255).astype(np.float32), \
        rng.standard_normal((16,) + FEATURES).astype(np.float32)


def build(K, L):
    """Both models with the API `K` (tinycnn or keras) and its layers module `L`."""
    inp = K.Input(shape=IMAGE, name="image")
    x = L.Rescaling(1 / 255, name="scale")(inp)
    x = L.Conv2D(6, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                 kernel_regularizer=K.regularizers.l2(1e-4), name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    y = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    y = L.SeparableConv2D(6, 3, padding="same", name="sep")(y)
    y = L.Activation("gelu", name="gelu")(y)
    x = L.Add(name="residual")([x, y])
    x = L.MaxPooling2D(2, padding="same", name="max_pool")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    a = L.Conv2D(4, 1, name="branch_a")(x)
    a = L.LeakyReLU(name="leaky")(a)
    b = L.AveragePooling2D(3, strides=1, padding="same", name="avg_pool")(x)
    b = L.Conv2D(3, 1, activation="elu", name="branch_b")(b)
    x = L.Concatenate(name="concat")([a, b])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, name="drop")(x)
    out = L.Dense(5, activation="softmax", name="classes")(x)
    functional = K.Model(inp, out, name="functional_cnn")
    functional.compile(optimizer=K.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
                       metrics=["accuracy"])
    sequential = K.Sequential([K.Input(shape=FEATURES), L.Dense(8, activation="relu", name="hidden"),
                               L.BatchNormalization(name="bn"), L.Dropout(0.1, name="dropout"),
                               L.Dense(3, name="logits")], name="sequential_logits")
    sequential.compile(optimizer=K.optimizers.RMSprop(0.01),
                       loss=K.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return functional, sequential


def train(functional, sequential):
    rng = np.random.default_rng(1)
    images, features = inputs()
    functional.fit(images, rng.integers(0, 5, 16), batch_size=8, epochs=2, verbose=0)
    sequential.fit(features, rng.integers(0, 3, 16), batch_size=8, epochs=2, verbose=0)


def tinycnn_side():
    sys.path.insert(0, os.path.join(HERE, "..", ".."))
    import tinycnn as tc

    tc.utils.set_random_seed(0)
    functional, sequential = build(tc, tc.layers)
    train(functional, sequential)
    os.makedirs(OUT, exist_ok=True)
    functional.save(os.path.join(OUT, "tinycnn_functional.keras"))
    sequential.save(os.path.join(OUT, "tinycnn_sequential.keras"))
    print("wrote tinycnn_functional.keras, tinycnn_sequential.keras")


def keras_side():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    functional, sequential = build(keras, keras.layers)
    train(functional, sequential)
    functional.save(os.path.join(OUT, "keras_functional.keras"))
    sequential.save(os.path.join(OUT, "keras_sequential.keras"))
    images, features = inputs()
    reference = {"images": images, "features": features,
                 "keras_functional": functional.predict(images, verbose=0),
                 "keras_sequential": sequential.predict(features, verbose=0)}
    for name, x in (("functional", images), ("sequential", features)):
        loaded = keras.models.load_model(os.path.join(OUT, f"tinycnn_{name}.keras"))
        reference[f"tinycnn_{name}"] = loaded.predict(x, verbose=0)
        print(f"Keras loaded tinycnn_{name}.keras: {len(loaded.layers)} layers, compiled with "
              f"{type(loaded.optimizer).__name__} and {loaded.loss}")
    np.savez(os.path.join(OUT, "reference.npz"), **reference)
    print(f"keras {keras.__version__}: wrote keras_functional.keras, keras_sequential.keras, reference.npz")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=["tinycnn", "keras"])
    {"tinycnn": tinycnn_side, "keras": keras_side}[parser.parse_args().side]()
