"""Keras 3 as the oracle: the fixture in tests/data/keras_parity was made by real Keras 3.15
(benchmarks/keras_parity/make_fixture.py); these tests need only NumPy and h5py.

Tolerances (float32 everywhere; errors relative to the largest entry of each quantity):
- weights loaded from the .h5: exact.
- outputs and loss: 1e-5. Eight convolutions and seven BatchNorms in float32 accumulate
  rounding of order 1e-6 relative; the summation order differs from TensorFlow's.
- gradients: 1e-4, with Keras's ReLU decisions replayed. One pre-activation of the Week2
  batch (conv2d_6, 1.1e-5 here in float64, <= 0 in TensorFlow's float32) sits within
  float32 rounding of the ReLU kink; taking the other side changes every gradient below
  that layer by 1-4 %, in either implementation. With the same decisions, what is left is
  float32 rounding amplified by the batch-statistics BatchNorm backward (~1e-5).
- one Adam step from Keras's gradients: 3e-7 absolute, float32 rounding of weights <= 2.
- one full training step (train_on_batch) from the same weights: 1e-6 absolute on the
  entries whose Keras gradient exceeds 1e-3, where the first Adam step is lr * sign(g);
  for gradients near epsilon (1e-7; e.g. a bias feeding a BatchNorm, mathematically 0)
  the step is proportional to g and compares float32 noise with noise.
"""
import os

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import batch_split
from tinycnn import layers as L
from conftest import DATA
from week2_model import build_week2_model

h5py = pytest.importorskip("h5py", reason='Keras weight interchange needs h5py: pip install "tinycnn[keras]"')
FIXTURES = os.path.join(DATA, "keras_parity")


def fixture(name):
    with np.load(os.path.join(FIXTURES, f"{name}_fixture.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def dense_model(dropout=0.1, device="cpu"):
    return tc.Sequential([L.Flatten(input_shape=(28, 28, 1)), L.Dense(32, activation="relu"), L.BatchNormalization(),
                          L.Dropout(dropout), L.Dense(10, activation="softmax")], device=device, seed=0)


def make(name, dropout, device="cpu"):
    model = build_week2_model(device=device, seed=0, dropout=dropout) if name == "week2" else dense_model(dropout, device)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["accuracy"])
    model.load_keras_weights(os.path.join(FIXTURES, f"{name}.weights.h5"))
    return model


def rel_error(a, b, floor=1e-3):
    """max|a - b| relative to max|b|; a quantity Keras gives as ~0 (a BatchNorm beta whose
    gradient vanishes mathematically, |g| ~ 1e-8 of noise) is compared against `floor`."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


MODELS = ["week2", "dense"]


@pytest.mark.parametrize("name", MODELS)
def test_loaded_weights_equal_keras_weights_exactly(name):
    ref = fixture(name)
    weights = make(name, 0.1).get_weights()
    assert len(weights) == len(ref["weight_names"])
    for i, w in enumerate(weights):
        assert np.array_equal(w, ref[f"weights/{i:03d}"]), ref["weight_names"][i]


@pytest.mark.parametrize("name", MODELS)
def test_inference_outputs_match_keras(name, device):
    ref = fixture(name)
    probs = make(name, 0.1, device).predict(ref["images"])
    assert rel_error(probs, ref["probs_infer"]) < 1e-5


def replay_keras_relu_decisions(model, ref):
    """Make each ReLU's backward use Keras's mask (y > 0) instead of our own: the rows of the mask
    that the running share of the batch holds (tinycnn.batch_split), so the split path is the one
    compared with Keras."""
    def keras_mask(dy, x, y, kernels, m):
        first = batch_split.first_sample()
        return dy * m[first : first + dy.shape[0]]

    for key in (k for k in ref if k.startswith("relu_mask/")):
        layer = model.layers[int(key.split("/")[1])]
        shape = (ref["images"].shape[0],) + tuple(layer.output_shape)
        mask = model.backend.asarray(np.unpackbits(ref[key])[: int(np.prod(shape))].reshape(shape).astype(model.dtype))
        layer.activation = tc.activations.ActivationFunction(
            "relu with Keras's decisions", tc.activations.relu.forward,
            lambda dy, x, y, kernels, m=mask: keras_mask(dy, x, y, kernels, m), ())


def count_relu_disagreements(model, ref):
    x, disagree = model.backend.asarray(ref["images"]), 0
    for i, layer in enumerate(model.layers):
        x = layer(x, training=True)
        if f"relu_mask/{i:03d}" in ref:
            ours = np.packbits(tc.backend.to_numpy(x) > 0)
            disagree += int(np.unpackbits(ours ^ ref[f"relu_mask/{i:03d}"]).sum())
    return disagree


@pytest.mark.parametrize("name", MODELS)
def test_training_loss_gradients_and_moving_statistics_match_keras(name, device):
    ref = fixture(name)
    model = make(name, 0.0, device)  # the rate-0 copy, as in the fixture
    replay_keras_relu_decisions(model, ref)
    loss, grads = model.loss_and_gradients(ref["images"], ref["labels"])
    assert abs(loss - float(ref["loss_train"])) / float(ref["loss_train"]) < 1e-5
    assert len(grads) == len(ref["trainable_index"])
    for k, g in enumerate(grads):
        assert rel_error(g, ref[f"grads/{k:03d}"]) < 1e-4, (k, rel_error(g, ref[f"grads/{k:03d}"]))
    weights = model.get_weights()  # the forward above updated the moving statistics, as Keras's did
    for key in (k for k in ref if k.startswith("moving_after_step/")):
        i = int(key.split("/")[1])
        assert rel_error(weights[i], ref[key]) < 1e-5, key


def test_relu_decisions_differ_from_keras_only_at_the_kink():
    """Our float32 forward takes Keras's side of every ReLU but a handful of near-zero inputs."""
    ref = fixture("week2")
    assert count_relu_disagreements(make("week2", 0.0), ref) <= 3  # of about 480,000


@pytest.mark.parametrize("name", MODELS)
def test_one_adam_step_from_keras_gradients_matches_keras(name, device):
    ref = fixture(name)
    model = make(name, 0.0, device)  # a fresh optimizer: its first step is t = 1
    for k, grad in enumerate(model.params.grad_views):  # every trainable weight's gradient, in Keras order
        grad[...] = model.backend.asarray(ref[f"grads/{k:03d}"])
    model.optimizer.apply(model.params.params, model.params.grads)
    weights = model.get_weights()
    for k, i in enumerate(ref["trainable_index"]):
        assert np.abs(weights[i] - ref[f"after_adam/{k:03d}"]).max() < 3e-7, k


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_matches_keras(name, device):
    ref = fixture(name)
    model = make(name, 0.0, device)
    replay_keras_relu_decisions(model, ref)
    model.train_on_batch(ref["images"], ref["labels"])
    weights = model.get_weights()
    for k, i in enumerate(ref["trainable_index"]):
        saturated = np.abs(ref[f"grads/{k:03d}"]) > 1e-3
        assert np.abs(weights[i] - ref[f"after_adam/{k:03d}"])[saturated].max(initial=0) < 1e-6, k


@pytest.mark.parametrize("name", MODELS)
def test_written_file_has_the_keras_layout_and_round_trips(name, tmp_path):
    model = make(name, 0.1)
    path = tmp_path / f"{name}.weights.h5"
    model.save_keras_weights(path)
    with h5py.File(path, "r") as ours, h5py.File(os.path.join(FIXTURES, f"{name}.weights.h5"), "r") as keras:
        def datasets(f):
            out = {}
            f["layers"].visititems(lambda p, obj: out.__setitem__(p, obj.shape) if isinstance(obj, h5py.Dataset) else None)
            return out
        assert datasets(ours) == datasets(keras)
        assert sorted(ours["layers"]) == sorted(keras["layers"])
    other = build_week2_model(seed=9) if name == "week2" else dense_model()
    other.load_keras_weights(path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), other.get_weights()))


def test_mismatched_keras_file_is_refused_and_nothing_is_loaded(tmp_path):
    model = tc.Sequential([L.Flatten(input_shape=(28, 28, 1)), L.Dense(16, activation="relu"), L.BatchNormalization(),
                           L.Dropout(0.1), L.Dense(10, activation="softmax")], seed=0)
    before = model.get_weights()
    with pytest.raises(tc.WeightsFileError, match=r"layer dense_\d+ \(Dense, file group 'layers/dense'\).*\(784, 32\) in the file but \(784, 16\)"):
        model.load_keras_weights(os.path.join(FIXTURES, "dense.weights.h5"))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    with pytest.raises(tc.WeightsFileError, match="1 arrays in the file, 2 in the model"):
        tc.Sequential([L.Conv2D(16, 3, input_shape=(28, 28, 1))]).load_keras_weights(os.path.join(FIXTURES, "week2.weights.h5"))
    (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(tc.WeightsFileError, match="not a readable HDF5"):
        model.load_keras_weights(tmp_path / "junk.weights.h5")
    with pytest.raises(ValueError, match=r"\*\.weights\.h5"):
        model.save_keras_weights(tmp_path / "model.h5")
