"""`.keras` model files both ways, against the fixture made with real Keras 3.15
(benchmarks/keras_parity/make_model_files.py), and weights files chosen by suffix."""
import json
import os
import zipfile

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L
from conftest import DATA

pytest.importorskip("h5py", reason='.keras files hold HDF5 weights: pip install "tinycnn[keras]"')
MODELS = os.path.join(DATA, "keras_models")
REFERENCE = np.load(os.path.join(MODELS, "reference.npz"))
INPUTS = {"functional": REFERENCE["images"], "sequential": REFERENCE["features"]}


@pytest.mark.parametrize("name", ["functional", "sequential"])
def test_models_keras_wrote_load_and_predict_as_keras_did(name):
    model = tc.models.load_model(os.path.join(MODELS, f"keras_{name}.keras"))
    predicted = model.predict(INPUTS[name], verbose=0)
    expected = REFERENCE[f"keras_{name}"]
    assert np.abs(predicted - expected).max() < 1e-5
    assert np.array_equal(predicted.argmax(axis=1), expected.argmax(axis=1))
    assert model.metrics_names == ["loss", "accuracy"]  # the compile arguments came with it
    if name == "sequential":
        assert isinstance(model.optimizer, tc.optimizers.RMSprop) and model.loss.from_logits
        assert model.optimizer.current_learning_rate() == pytest.approx(0.01)
    else:
        assert isinstance(model.optimizer, tc.optimizers.Adam) and not model.loss.from_logits
        assert [l.name for l in model.compute_layers][:4] == ["scale", "stem", "stem_bn", "stem_relu"]


@pytest.mark.parametrize("name", ["functional", "sequential"])
def test_files_tinycnn_wrote_are_what_keras_loaded(name):
    """Keras loaded these files (when the fixture was made) and predicted REFERENCE[tinycnn_*]."""
    path = os.path.join(MODELS, f"tinycnn_{name}.keras")
    model = tc.models.load_model(path)
    assert np.abs(model.predict(INPUTS[name], verbose=0) - REFERENCE[f"tinycnn_{name}"]).max() < 1e-5


@pytest.mark.parametrize("name", ["functional", "sequential"])
def test_the_writer_still_writes_what_keras_verified(name, tmp_path):
    """Saving the loaded tinycnn file again gives the same configuration and weights: a change to the
    writer fails here until the fixture is remade (and so checked by Keras) again."""
    path = os.path.join(MODELS, f"tinycnn_{name}.keras")
    model = tc.models.load_model(path)
    model.save(tmp_path / "again.keras")
    with zipfile.ZipFile(path) as old, zipfile.ZipFile(tmp_path / "again.keras") as new:
        assert json.loads(old.read("config.json")) == json.loads(new.read("config.json"))
        assert sorted(old.namelist()) == sorted(new.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
    again = tc.models.load_model(tmp_path / "again.keras")
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights()))


def test_save_and_load_round_trip_a_trained_model(tmp_path):
    rng = np.random.default_rng(0)
    inputs = tc.Input(shape=(6, 6, 1))
    x = L.Conv2D(3, 3, padding="same", activation="relu")(inputs)
    x = L.BatchNormalization()(x)
    x = L.Concatenate()([x, L.Conv2D(2, 1)(inputs)])
    x = L.Flatten()(x)
    out = L.Dense(2, activation="sigmoid")(x)
    model = tc.Model(inputs, out, seed=1)
    model.compile(tc.optimizers.SGD(0.1, momentum=0.9), "binary_crossentropy",
                  [tc.metrics.BinaryAccuracy(threshold=0.4)])
    x_data = rng.random((16, 6, 6, 1), dtype=np.float32)
    model.fit(x_data, (rng.random((16, 2)) > 0.5).astype(np.float32), epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = tc.models.load_model(tmp_path / "m.keras")
    assert np.array_equal(model.predict(x_data, verbose=0), loaded.predict(x_data, verbose=0))
    assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
    assert isinstance(loaded.optimizer, tc.optimizers.SGD) and loaded.optimizer.momentum == 0.9
    assert loaded.metrics[0].threshold == 0.4 and loaded.loss.name == "binary_crossentropy"
    uncompiled = tc.models.load_model(tmp_path / "m.keras", compile=False)
    assert uncompiled.loss is None


def test_weighted_metrics_and_a_warmup_schedule_survive_the_file(tmp_path):
    model = tc.Sequential([L.Dense(3, activation="softmax", input_shape=(4,))], seed=0)
    schedule = tc.optimizers.schedules.CosineDecay(0.0, 100, warmup_target=0.01, warmup_steps=10)
    model.compile(tc.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"],
                  weighted_metrics=["accuracy"])
    model.save(tmp_path / "m.keras")
    loaded = tc.models.load_model(tmp_path / "m.keras")
    assert loaded.metrics_names == ["loss", "accuracy", "weighted_accuracy"] and loaded.metric_weighted == [False, True]
    assert [loaded.optimizer.learning_rate(s) for s in (5, 10, 60)] == [schedule(s) for s in (5, 10, 60)]


def test_a_schedule_option_tinycnn_lacks_is_named(tmp_path):
    def schedule(config):
        config["compile_config"]["optimizer"]["config"]["learning_rate"] = {
            "module": "keras.optimizers.schedules", "class_name": "CosineDecay", "registered_name": None,
            "config": {"initial_learning_rate": 0.1, "decay_steps": 10, "cycles": 3}}

    with pytest.raises(ValueError, match=r"schedule CosineDecay with options .*'cycles'.*unexpected keyword"):
        tc.models.load_model(_edited(tmp_path, "keras_functional.keras", schedule))


def _edited(tmp_path, source, edit):
    """A copy of a fixture file whose config.json `edit(config)` changed."""
    path = tmp_path / "edited.keras"
    with zipfile.ZipFile(os.path.join(MODELS, source)) as zin, zipfile.ZipFile(path, "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                config = json.loads(data)
                edit(config)
                data = json.dumps(config)
            zout.writestr(item, data)
    return path


def test_a_layer_tinycnn_lacks_is_named(tmp_path):
    def add_lstm(config):
        config["config"]["layers"][1]["class_name"] = "LSTM"

    with pytest.raises(ValueError, match=r"a layer tinycnn lacks: hidden \(LSTM\)"):
        tc.models.load_model(_edited(tmp_path, "keras_sequential.keras", add_lstm))


def test_an_option_tinycnn_lacks_is_named(tmp_path):
    def dilate(config):
        stem = next(l for l in config["config"]["layers"] if l["name"] == "stem")
        stem["config"]["dilation_rate"] = [2, 2]

    with pytest.raises(ValueError, match=r"layer stem \(Conv2D\): Conv2D supports dilation_rate=1 only, got \[2, 2\]"):
        tc.models.load_model(_edited(tmp_path, "keras_functional.keras", dilate))


def test_broken_and_foreign_files_are_refused(tmp_path):
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(tc.WeightsFileError, match="not a .keras model file"):
        tc.models.load_model(tmp_path / "junk.keras")
    (tmp_path / "old.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"0" * 100)
    with pytest.raises(tc.WeightsFileError, match="legacy Keras 2 .h5 model"):
        tc.models.load_model(tmp_path / "old.h5")
    with zipfile.ZipFile(tmp_path / "partial.keras", "w") as zf:
        zf.writestr("config.json", "{}")
    with pytest.raises(tc.WeightsFileError, match="has no model.weights.h5"):
        tc.models.load_model(tmp_path / "partial.keras")
    with pytest.raises(tc.WeightsFileError, match="does not exist"):
        tc.models.load_model(tmp_path / "missing.keras")
    model = tc.Sequential([L.Dense(2, input_shape=(3,))])
    with pytest.raises(ValueError, match=r"must end in .keras"):
        model.save(tmp_path / "model.h5")


def test_weights_files_take_the_format_their_name_asks_for(tmp_path):
    model = tc.Sequential([L.Dense(3, input_shape=(4,)), L.Dense(2)], seed=0)
    model.save_weights(tmp_path / "w.weights.h5")
    model.save_weights(tmp_path / "w.npz")
    assert (tmp_path / "w.weights.h5").read_bytes()[:4] == b"\x89HDF"  # HDF5, not an npz under an .h5 name
    assert (tmp_path / "w.npz").read_bytes()[:2] == b"PK"
    for name in ("w.weights.h5", "w.npz"):
        other = tc.Sequential([L.Dense(3, input_shape=(4,)), L.Dense(2)], seed=5)
        other.load_weights(tmp_path / name)  # the format is read from the file itself
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), other.get_weights()))
    with pytest.raises(ValueError, match=r"writes .weights.h5 \(Keras's format\) or .npz"):
        model.save_weights(tmp_path / "w.h5")
    (tmp_path / "text.weights.h5").write_text("hello")
    with pytest.raises(tc.WeightsFileError, match="neither an HDF5"):
        model.load_weights(tmp_path / "text.weights.h5")


def test_load_weights_reads_a_real_keras_weights_file():
    import week2_model

    model = week2_model.build_week2_model(seed=0)
    model.load_weights(os.path.join(DATA, "keras_parity", "week2.weights.h5"))
    with np.load(os.path.join(DATA, "keras_parity", "week2_fixture.npz")) as ref:
        assert np.array_equal(model.get_weights()[0], ref["weights/000"])
