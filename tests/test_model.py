import os

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L
from conftest import DATA
from week2_model import build_week2_model


def test_week2_summary_matches_the_seed_line_for_line():
    tc.backend.clear_session()  # as in a fresh process: the model is sequential_1, its layers conv2d_1, ...
    model = build_week2_model(device="cpu", seed=0)
    lines = []
    model.summary(print_fn=lines.append)
    with open(os.path.join(DATA, "week2_summary.txt")) as f:
        expected = f.read().splitlines()
    assert lines == expected
    assert model.count_params() == 12516
    trainable = sum(l.count_trainable_params() for l in model.layers)
    assert (trainable, model.count_params() - trainable) == (12316, 200)


def test_layer_names_count_per_process_like_keras_2():
    a, b = L.Conv2D(2, 3), L.Conv2D(2, 3)
    n = int(a.name.rsplit("_", 1)[1])
    assert a.name == f"conv2d_{n}" and b.name == f"conv2d_{n + 1}"
    assert L.BatchNormalization().name.startswith("batch_normalization_")
    assert L.MaxPooling2D().name.startswith("max_pooling2d_")
    assert L.GlobalAveragePooling2D().name.startswith("global_average_pooling2d_")
    assert L.Dense(3, name="head").name == "head"


def test_get_weights_in_keras_order():
    model = tc.Sequential([L.Conv2D(3, 3, input_shape=(5, 5, 2)), L.BatchNormalization(), L.Flatten(), L.Dense(4)], seed=1)
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(3, 3, 2, 3), (3,), (3,), (3,), (3,), (3,), (27, 4), (4,)]
    assert list(model.layers[1].weights) == ["gamma", "beta", "moving_mean", "moving_variance"]


def _two_models(seed_a=1, seed_b=2):
    def make(seed):
        m = tc.Sequential([L.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1)), L.BatchNormalization(),
                           L.Dropout(0.2), L.MaxPooling2D(2), L.Flatten(), L.Dense(3, activation="softmax")], seed=seed)
        m.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
        return m
    return make(seed_a), make(seed_b)


def _data(n=32, seed=0, shape=(8, 8, 1), classes=3):
    rng = np.random.default_rng(seed)
    return rng.random((n,) + shape, dtype=np.float32), np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]


def test_save_load_round_trips_bit_exactly(tmp_path):
    a, b = _two_models()
    x, y = _data()
    a.fit(x, y, batch_size=8, epochs=1, verbose=0)  # moving statistics and weights away from their init
    a.save_weights(tmp_path / "w.npz")
    b.load_weights(tmp_path / "w.npz")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert wa.dtype == wb.dtype and np.array_equal(wa, wb)
    assert np.array_equal(a.predict(x), b.predict(x))
    with np.load(tmp_path / "w.npz", allow_pickle=False) as f:  # no pickle needed to read it
        assert "__meta__" in f.files


def test_load_refuses_a_mismatched_file_and_leaves_the_model_untouched(tmp_path):
    a, _ = _two_models()
    a.save_weights(tmp_path / "w.npz")
    other = tc.Sequential([L.Conv2D(5, 3, activation="relu", input_shape=(8, 8, 1)), L.BatchNormalization(),
                           L.Dropout(0.2), L.MaxPooling2D(2), L.Flatten(), L.Dense(3, activation="softmax")], seed=3)
    before = other.get_weights()
    with pytest.raises(tc.WeightsFileError, match=r"layer 0 .*weight 'kernel' has shape \(3, 3, 1, 4\) in the file but \(3, 3, 1, 5\)"):
        other.load_weights(tmp_path / "w.npz")
    assert all(np.array_equal(p, q) for p, q in zip(before, other.get_weights()))
    shorter = tc.Sequential([L.Conv2D(4, 3, input_shape=(8, 8, 1))])
    with pytest.raises(tc.WeightsFileError, match="holds 6 layers but the model has 1"):
        shorter.load_weights(tmp_path / "w.npz")


def test_load_refuses_corrupt_truncated_and_foreign_files(tmp_path):
    a, b = _two_models()
    path = tmp_path / "w.npz"
    a.save_weights(path)
    data = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(tc.WeightsFileError, match="corrupt or truncated"):
        b.load_weights(tmp_path / "truncated.npz")
    np.savez(tmp_path / "foreign.npz", kernel=np.zeros(3))
    with pytest.raises(tc.WeightsFileError, match="not a tinycnn weights file"):
        b.load_weights(tmp_path / "foreign.npz")
    with pytest.raises(tc.WeightsFileError, match="does not exist"):
        b.load_weights(tmp_path / "missing.npz")


def test_load_by_name(tmp_path):
    a = tc.Sequential([L.Dense(3, input_shape=(4,), name="hidden"), L.Dense(2, name="out")], seed=1)
    b = tc.Sequential([L.Dense(3, input_shape=(4,), name="hidden"), L.Dense(2, name="out")], seed=2)
    a.save_weights(tmp_path / "w.npz")
    b.load_weights(tmp_path / "w.npz", by_name=True)
    assert all(np.array_equal(p, q) for p, q in zip(a.get_weights(), b.get_weights()))
    c = tc.Sequential([L.Dense(3, input_shape=(4,), name="other")], seed=2)
    with pytest.raises(tc.WeightsFileError, match="no layer named 'other'"):
        c.load_weights(tmp_path / "w.npz", by_name=True)


def test_set_weights_checks_every_shape_first():
    model = tc.Sequential([L.Dense(3, input_shape=(4,)), L.Dense(2)], seed=1)
    before = model.get_weights()
    bad = [np.ones((4, 3)), np.ones(3), np.ones((3, 5)), np.ones(2)]
    with pytest.raises(tc.ShapeError, match=r"expected shape \(3, 2\), got \(3, 5\)"):
        model.set_weights(bad)
    assert all(np.array_equal(p, q) for p, q in zip(before, model.get_weights()))


class TestBadInput:
    def setup_method(self):
        self.model, _ = _two_models()

    def test_wrong_rank_suggests_the_channel_axis(self):
        x, y = _data()
        with pytest.raises(tc.ShapeError, match=r"x has shape \(32, 8, 8\).*x\[\.\.\., None\]"):
            self.model.fit(x[..., 0], y, verbose=0)

    def test_wrong_shape(self):
        with pytest.raises(tc.ShapeError, match=r"expects \(batch, 8, 8, 1\)"):
            self.model.predict(np.zeros((2, 9, 8, 1), np.float32))

    def test_non_finite_values(self):
        x, y = _data()
        x[3, 2, 2, 0] = np.nan
        x[4, 1, 1, 0] = np.inf
        with pytest.raises(ValueError, match="2 NaN or infinite"):
            self.model.fit(x, y, verbose=0)

    def test_non_numeric_dtype(self):
        with pytest.raises(TypeError, match="must hold numbers"):
            self.model.predict(np.array([["a"] * 8] * 8, dtype=object).reshape(1, 8, 8, 1))

    def test_labels_out_of_range(self):
        x, _ = _data()
        self.model.compile(tc.optimizers.Adam(), "sparse_categorical_crossentropy", ["accuracy"])
        with pytest.raises(ValueError, match=r"labels outside 0\.\.2 \(found min 0, max 3\)"):
            self.model.fit(x, np.array([0, 1, 2, 3] * 8), verbose=0)

    def test_integer_labels_with_categorical_loss(self):
        x, _ = _data()
        with pytest.raises(tc.ShapeError, match="one-hot encode them"):
            self.model.fit(x, np.zeros(32, int), verbose=0)

    def test_row_count_mismatch(self):
        x, y = _data()
        with pytest.raises(tc.ShapeError, match="y has 31 rows but x has 32"):
            self.model.fit(x, y[:31], verbose=0)

    def test_unknown_layer_argument_is_named(self):
        with pytest.raises(TypeError, match=r"Conv2D got unknown argument\(s\) 'kernel_initalizer'"):
            L.Conv2D(16, 3, kernel_initalizer="he_normal")

    def test_bad_layer_values(self):
        with pytest.raises(ValueError, match="padding"):
            L.Conv2D(4, 3, padding="full")
        with pytest.raises(ValueError, match="unknown activation 'relu6'"):
            L.Dense(4, activation="relu6")
        with pytest.raises(ValueError, match=r"Dropout rate must be in \[0, 1\)"):
            L.Dropout(1.0)

    def test_fit_before_compile(self):
        m = tc.Sequential([L.Dense(2, input_shape=(3,))])
        with pytest.raises(RuntimeError, match="compile"):
            m.fit(np.zeros((2, 3)), np.zeros((2, 2)))

    def test_unknown_loss_and_metric(self):
        with pytest.raises(ValueError, match="unknown loss 'hinge'"):
            self.model.compile("adam", "hinge")
        with pytest.raises(ValueError, match="custom loss function 'my_loss'.*no backward pass"):
            def my_loss(y_true, y_pred):
                return y_pred
            self.model.compile("adam", my_loss)
        with pytest.raises(ValueError, match="unknown metric 'f1'"):
            self.model.compile("adam", "categorical_crossentropy", ["f1"])
