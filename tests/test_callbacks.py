"""Keras's callbacks with Keras 3's semantics: EarlyStopping, ModelCheckpoint, CSVLogger,
ReduceLROnPlateau, TerminateOnNaN, LambdaCallback, TensorBoard (read back with TensorBoard's reader)."""
import csv
import os

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L


def _problem(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    labels = (x[:, 0] + x[:, 1] > 0).astype(int)
    return x, labels


def _model(seed=0, lr=0.05):
    model = tc.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2, activation="softmax")], seed=seed)
    model.compile(tc.optimizers.SGD(lr), "sparse_categorical_crossentropy", ["accuracy"])
    return model


class ScriptedLogs(tc.callbacks.Callback):
    """Replaces each epoch's monitored value with a scripted one (to drive the monitor callbacks)."""

    def __init__(self, key, values):
        super().__init__()
        self.key, self.values = key, values

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    x, y = _problem()
    model = _model()
    weights_at = {}
    record = tc.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: weights_at.__setitem__(epoch, model.get_weights()))
    script = ScriptedLogs("val_loss", [1.0, 0.5, 0.6, 0.55, 0.7, 0.1])
    stop = tc.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    history = model.fit(x, y, epochs=6, verbose=0, validation_data=(x, y), callbacks=[script, record, stop])
    assert len(history.history["loss"]) == 4 and stop.stopped_epoch == 3 and stop.best_epoch == 1
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights_at[1]))


def test_early_stopping_min_delta_mode_and_baseline():
    x, y = _problem()
    up = tc.callbacks.EarlyStopping(monitor="accuracy", patience=1, min_delta=0.05)  # mode auto: accuracy goes up
    script = ScriptedLogs("accuracy", [0.5, 0.52, 0.53, 0.9])
    history = _model().fit(x, y, epochs=4, verbose=0, callbacks=[script, up])
    assert len(history.history["loss"]) == 2  # +0.02 is not an improvement of at least 0.05
    # Keras's rule: an epoch that improves never stops training; short of the baseline it still counts toward
    # patience, so a baseline that is never reached stops a worsening run one epoch earlier
    worse = [0.9, 0.95, 0.97, 0.99, 1.0]
    for baseline, epochs in ((None, 4), (0.01, 3)):
        stop = tc.callbacks.EarlyStopping(monitor="loss", patience=3, baseline=baseline)
        history = _model().fit(x, y, epochs=5, verbose=0, callbacks=[ScriptedLogs("loss", worse), stop])
        assert len(history.history["loss"]) == epochs, baseline
    improving = tc.callbacks.EarlyStopping(monitor="loss", patience=1, baseline=0.01)
    history = _model().fit(x, y, epochs=5, verbose=0, callbacks=[ScriptedLogs("loss", [0.9, 0.8, 0.7, 0.6, 0.5]),
                                                                  improving])
    assert len(history.history["loss"]) == 5
    with pytest.raises(ValueError, match="cannot tell whether 'val_f1' should go up or down"):
        _model().fit(x, y, epochs=1, verbose=0, callbacks=[ScriptedLogs("val_f1", [1.0]),
                                                         tc.callbacks.EarlyStopping(monitor="val_f1")])


def test_model_checkpoint_formats_paths_and_saves_the_best(tmp_path):
    x, y = _problem()
    model = _model()
    script = ScriptedLogs("val_loss", [0.9, 0.5, 0.7, 0.4])
    best = tc.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), save_best_only=True)
    every = tc.callbacks.ModelCheckpoint(str(tmp_path / "w-{epoch:02d}-{val_loss:.2f}.weights.h5"),
                                         save_weights_only=True)
    saved = []
    watch = tc.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: saved.append(os.path.getmtime(tmp_path / "best.keras")))
    model.fit(x, y, epochs=4, verbose=0, validation_data=(x, y), callbacks=[script, best, every, watch])
    assert sorted(os.listdir(tmp_path)) == ["best.keras", "w-01-0.90.weights.h5", "w-02-0.50.weights.h5",
                                            "w-03-0.70.weights.h5", "w-04-0.40.weights.h5"]
    assert saved[2] == saved[1] and best.best == 0.4  # epoch 3 did not improve: not saved
    loaded = tc.models.load_model(tmp_path / "best.keras")
    assert np.array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.raises(ValueError, match="must end in .keras"):
        tc.callbacks.ModelCheckpoint("model.h5")
    with pytest.raises(ValueError, match="must end in .weights.h5"):
        tc.callbacks.ModelCheckpoint("model.keras", save_weights_only=True)


def test_csv_logger_writes_a_row_per_epoch_and_appends(tmp_path):
    x, y = _problem()
    path = tmp_path / "log.csv"
    _model().fit(x, y, epochs=2, verbose=0, validation_data=(x, y), callbacks=[tc.callbacks.CSVLogger(path)])
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert set(rows[0]) == {"epoch", "accuracy", "loss", "seconds", "val_accuracy", "val_loss"}
    _model().fit(x, y, epochs=1, verbose=0, callbacks=[tc.callbacks.CSVLogger(path, append=True)])
    lines = open(path).read().splitlines()
    assert len(lines) == 4 and lines[0].startswith("epoch,")  # one header


def test_reduce_lr_on_plateau_waits_for_patience_then_cools_down():
    x, y = _problem()
    model = _model(lr=0.1)
    script = ScriptedLogs("val_loss", [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    rates = []
    watch = tc.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: rates.append(model.optimizer.learning_rate))
    reduce = tc.callbacks.ReduceLROnPlateau(factor=0.5, patience=2, cooldown=1, min_lr=0.03)
    history = model.fit(x, y, epochs=7, verbose=0, validation_data=(x, y), callbacks=[script, reduce, watch])
    # Keras 3's trace: reduce at epoch 2 (patience 2), one epoch of cooldown, reduce at epoch 4 (to min_lr)
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.03, 0.03, 0.03])
    assert history.history["learning_rate"][:3] == pytest.approx([0.1, 0.1, 0.1])


def test_reduce_lr_on_plateau_refuses_a_schedule_before_training():
    x, y = _problem()
    model = _model()
    model.compile(tc.optimizers.SGD(tc.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)),
                  "sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(TypeError, match="follows a schedule"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[tc.callbacks.ReduceLROnPlateau(monitor="loss")])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_terminate_on_nan():
    x, y = _problem()
    model = _model(lr=1e30)
    model.compile(tc.optimizers.SGD(1e30), "sparse_categorical_crossentropy")
    with np.errstate(all="ignore"):
        ended = []
        with pytest.raises(FloatingPointError):  # without the callback the epoch runs on and fit reports it
            model.fit(x, y, batch_size=10, epochs=1, verbose=0,
                      callbacks=[tc.callbacks.LambdaCallback(on_train_end=lambda logs: ended.append(True))])
        assert ended  # callbacks end (and close their files) before the exception
        model = _model()
        model.compile(tc.optimizers.SGD(1e30), "sparse_categorical_crossentropy")
        batches, ended = [], []
        watch = tc.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: batches.append(b),
                                            on_train_end=lambda logs: ended.append(True))
        history = model.fit(x, y, batch_size=10, epochs=3, verbose=0, callbacks=[watch, tc.callbacks.TerminateOnNaN()])
    assert len(batches) < 6 and ended  # stopped inside the first epoch, as Keras does: no exception
    assert len(history.history["loss"]) == 1 and not np.isfinite(history.history["loss"][0])


def test_lambda_callback_runs_every_hook_it_is_given():
    x, y = _problem()
    seen = []
    cb = tc.callbacks.LambdaCallback(on_train_begin=lambda logs: seen.append("begin"),
                                     on_epoch_begin=lambda epoch, logs: seen.append(f"epoch {epoch}"),
                                     on_batch_end=lambda batch, logs: seen.append(f"batch {batch}"),
                                     on_train_end=lambda logs: seen.append("end"))
    _model().fit(x, y, batch_size=30, epochs=2, verbose=0, callbacks=[cb])
    assert seen == ["begin", "epoch 0", "batch 0", "batch 1", "epoch 1", "batch 0", "batch 1", "end"]
    with pytest.raises(TypeError, match="unknown hook"):
        tc.callbacks.LambdaCallback(on_epoch_stop=print)


def test_tensorboard_curves_read_back_with_tensorboards_reader(tmp_path):
    pytest.importorskip("tensorboardX", reason='the TensorBoard callback needs tensorboardX: pip install "tinycnn[tensorboard]"')
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    x, y = _problem()
    board = tc.callbacks.TensorBoard(log_dir=str(tmp_path), histogram_freq=1, update_freq="batch")
    history = _model().fit(x, y, batch_size=20, epochs=3, verbose=0, validation_data=(x, y), callbacks=[board])
    train = event_accumulator.EventAccumulator(str(tmp_path / "train"), size_guidance={"histograms": 0})
    train.Reload()
    tags = train.Tags()
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "batch_loss"} <= set(tags["scalars"])
    losses = [event.value for event in train.Scalars("epoch_loss")]
    assert losses == pytest.approx(history.history["loss"], rel=1e-6)
    assert len(train.Scalars("batch_loss")) == 9  # 3 batches x 3 epochs
    assert any(tag.endswith("/kernel") for tag in tags["histograms"])
    validation = event_accumulator.EventAccumulator(str(tmp_path / "validation"))
    validation.Reload()
    assert [e.value for e in validation.Scalars("epoch_accuracy")] == pytest.approx(history.history["val_accuracy"])


def test_evaluate_predict_and_validation_call_kerass_test_and_predict_hooks():
    x, y = _problem(n=40)
    seen = []
    hooks = {name: (lambda name: lambda *args: seen.append(name))(name) for name in (
        "on_test_begin", "on_test_end", "on_test_batch_end", "on_predict_begin", "on_predict_batch_end",
        "on_predict_end")}
    model = _model()
    model.evaluate(x, y, batch_size=20, verbose=0, callbacks=[tc.callbacks.LambdaCallback(**hooks)])
    assert seen[0] == "on_test_begin" and seen[-1] == "on_test_end" and "on_test_batch_end" in seen
    seen.clear()
    model.predict(x, batch_size=20, verbose=0, callbacks=[tc.callbacks.LambdaCallback(**hooks)])
    assert seen == ["on_predict_begin", "on_predict_batch_end", "on_predict_batch_end", "on_predict_end"]
    seen.clear()
    model.fit(x, y, epochs=1, verbose=0, validation_data=(x, y), callbacks=[tc.callbacks.LambdaCallback(**hooks)])
    assert seen[0] == "on_test_begin" and seen[-1] == "on_test_end"


def test_layers_expose_their_weights_by_keras_name():
    model = _model()
    dense = model.layers[0]
    assert dense.kernel is dense.weights["kernel"] and dense.bias.shape == (8,)
    bn = tc.layers.BatchNormalization()
    tc.Sequential([tc.layers.Dense(3, input_shape=(2,)), bn])
    assert bn.moving_variance.shape == (3,) and bn.gamma is bn.weights["gamma"]
    with pytest.raises(AttributeError, match="no attribute 'kernal'"):
        dense.kernal
