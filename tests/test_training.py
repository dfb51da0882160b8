import io
import json
import math
import os
import re

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L
from tinycnn.backend import get_backend, to_numpy
from conftest import DATA


def _seed_log():
    with open(os.path.join(DATA, "week2_seed_log.json")) as f:
        return json.load(f)["log"]


def test_adam_step_equals_hand_computation(device):
    be = get_backend(device)
    p0 = np.array([0.5, -1.0, 2.0, 0.0])
    grads = [np.array([0.1, -0.2, 0.3, 0.0]), np.array([-0.4, 0.5, 0.6, 1e-3])]
    opt = tc.optimizers.Adam(0.003)
    params = be.asarray(p0.copy())
    opt.build(params, be)
    m = np.zeros(4)
    v = np.zeros(4)
    p = p0.copy()
    for t, g in enumerate(grads, start=1):
        opt.apply(params, be.asarray(g))
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lr_t = 0.003 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        p = p - lr_t * m / (np.sqrt(v) + 1e-7)
        np.testing.assert_allclose(to_numpy(params), p, rtol=1e-12, atol=1e-15)
    assert opt.iterations == 2
    # The first Adam step moves every parameter with a non-zero gradient by about lr.
    np.testing.assert_allclose(np.abs(p0 - (p0 - 0.003 * np.sign(grads[0])))[:3], 0.003)


def test_sgd_momentum_step_equals_hand_computation():
    be = get_backend("cpu")
    for nesterov in (False, True):
        opt = tc.optimizers.SGD(0.1, momentum=0.9, nesterov=nesterov)
        params = np.array([1.0, 2.0])
        opt.build(params, be)
        vel, p = np.zeros(2), params.copy()
        for g in (np.array([0.5, -1.0]), np.array([0.25, 0.5])):
            opt.apply(params, g)
            vel = 0.9 * vel - 0.1 * g
            p = p + (0.9 * vel - 0.1 * g if nesterov else vel)
        np.testing.assert_allclose(params, p, rtol=1e-14)


def test_schedule_gives_the_seeds_twenty_learning_rates_to_the_last_digit():
    schedule = tc.schedules.InverseTimeDecay(0.003, decay_steps=1, decay_rate=0.319)
    log = _seed_log()
    assert len(log) == 20
    for entry in log:
        assert repr(schedule(entry["epoch"] - 1)) == entry["lr_text"]
    assert repr(0.003 / (1 + 0.319 * 1)) == "0.002274450341167551"
    stairs = tc.schedules.InverseTimeDecay(1.0, decay_steps=10, decay_rate=1.0, staircase=True)
    assert [stairs(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 1 / 3]


def test_schedule_works_as_a_per_step_learning_rate():
    schedule = tc.schedules.InverseTimeDecay(0.01, decay_steps=2, decay_rate=1.0)
    opt = tc.optimizers.Adam(schedule)
    params = np.zeros(3)
    opt.build(params, get_backend("cpu"))
    seen = []
    for _ in range(3):
        seen.append(opt.current_learning_rate())
        opt.apply(params, np.ones(3))
    assert seen == [0.01, 0.01 / 1.5, 0.01 / 2]


def _tiny_problem(n=48, seed=0):
    """Which quadrant of an 8x8 image holds a bright 3x3 square: 4 classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    x = rng.random((n, 8, 8, 1), dtype=np.float32) * 0.2
    for i, c in enumerate(labels):
        r, col = (c // 2) * 4 + rng.integers(0, 2), (c % 2) * 4 + rng.integers(0, 2)
        x[i, r : r + 3, col : col + 3, 0] += 1.0
    return x, np.eye(4, dtype=np.float32)[labels], labels


def _tiny_cnn(device, seed=0):
    model = tc.Sequential([L.Conv2D(8, 3, activation="relu", padding="same", input_shape=(8, 8, 1)),
                           L.BatchNormalization(), L.Dropout(0.1), L.MaxPooling2D(2),
                           L.Conv2D(8, 3, activation="relu", padding="same"), L.Flatten(),
                           L.Dense(4), L.Activation("softmax")], device=device, seed=seed)
    model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["acc"])
    return model


def test_tiny_cnn_learns_a_synthetic_problem_to_100_percent(device):
    x, y, labels = _tiny_problem()
    model = _tiny_cnn(device)
    history = model.fit(x, y, batch_size=16, epochs=40, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0] / 5
    assert model.evaluate(x, y, verbose=0)[1] == 1.0
    assert np.array_equal(model.predict(x).argmax(axis=1), labels)


def test_inference_is_deterministic_and_leaves_statistics_alone(device):
    x, y, _ = _tiny_problem()
    model = _tiny_cnn(device)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    before = model.get_weights()
    p1, p2 = model.predict(x), model.predict(x, batch_size=5)
    assert np.array_equal(p1, model.predict(x))
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-7)  # batch size changes only GEMM blocking
    np.testing.assert_allclose(p1.sum(axis=1), 1.0, rtol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_batchnorm_moving_statistics_follow_keras(device):
    layer = L.BatchNormalization(momentum=0.9)
    layer.build((3,), backend=device)
    x = np.random.default_rng(0).standard_normal((16, 3)).astype(np.float32) * 2 + 5
    layer.forward(layer.xp.asarray(x), training=True)
    mean, var = layer.get_weights()[2:]
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(var, 0.9 + 0.1 * x.var(axis=0), rtol=1e-5)  # biased batch variance, as Keras 3


def test_same_seed_same_training(device):
    x, y, _ = _tiny_problem()
    runs = []
    for _ in range(2):
        model = _tiny_cnn(device, seed=11)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        runs.append(model.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_resumed_training_equals_uninterrupted(tmp_path, device):
    x, y, _ = _tiny_problem()
    straight = _tiny_cnn(device, seed=4)
    straight.fit(x, y, batch_size=16, epochs=3, verbose=0)

    first = _tiny_cnn(device, seed=4)
    first.fit(x, y, batch_size=16, epochs=2, verbose=0)
    tc.saving.save_checkpoint(first, tmp_path / "ckpt.npz", epoch=2, history={"loss": [1.0, 0.5]})
    resumed = _tiny_cnn(device, seed=4)
    done, history = tc.saving.load_checkpoint(resumed, tmp_path / "ckpt.npz")
    assert (done, history) == (2, {"loss": [1.0, 0.5]})
    resumed.fit(x, y, batch_size=16, epochs=3, verbose=0, initial_epoch=done)
    assert all(np.array_equal(a, b) for a, b in zip(straight.get_weights(), resumed.get_weights()))


LINE = re.compile(
    r"^(\d+)/\1 \[={30}\] - \d+s \d+(us|ms|s)/step - loss: \d\.\d{4} - acc: \d\.\d{4} - val_loss: \d\.\d{4} - val_acc: \d\.\d{4}$"
)


def test_fit_prints_the_keras_2_log(capsys):
    x, y, _ = _tiny_problem(n=40)
    model = _tiny_cnn("cpu")
    sched = tc.callbacks.LearningRateScheduler(lambda epoch: 0.003 / (1 + 0.319 * epoch), verbose=1)
    history = model.fit(x, y, batch_size=16, epochs=2, validation_data=(x[:8], y[:8]), callbacks=[sched])
    lines = capsys.readouterr().out.split("\n")
    assert lines[:5] == ["Train on 40 samples, validate on 8 samples", "Epoch 1/2", "",
                         "Epoch 00001: LearningRateScheduler setting learning rate to 0.003.", lines[4]]
    assert LINE.match(lines[4]), lines[4]
    assert lines[5:8] == ["Epoch 2/2", "", "Epoch 00002: LearningRateScheduler setting learning rate to 0.002274450341167551."]
    assert LINE.match(lines[8]) and lines[9:] == [""]
    assert history.history["lr"] == [0.003, 0.002274450341167551]
    assert set(history.history) >= {"loss", "acc", "val_loss", "val_acc", "seconds"}
    assert f"loss: {history.history['loss'][1]:.4f}" in lines[8]


def test_verbose_0_is_silent_and_verbose_2_prints_one_line_per_epoch(capsys):
    x, y, _ = _tiny_problem(n=32)
    model = _tiny_cnn("cpu")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert capsys.readouterr().out == ""
    model.fit(x, y, batch_size=16, epochs=2, verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2"
    assert re.match(r"^ - \d+s - loss: \d\.\d{4} - acc: \d\.\d{4}$", lines[1]), lines[1]


def test_progbar_moves_in_place_on_a_terminal():
    out = io.StringIO()
    bar = tc.callbacks.Progbar(100, stream=out, dynamic=True, interval=0)
    bar.update(30, lambda: {"loss": 0.5})
    bar.update(100, lambda: {"loss": 0.25, "acc": 0.0001}, finalize=True)
    text = out.getvalue()
    assert text.startswith("\r 30/100 [========>.....................] - ETA:")
    assert "\r100/100 [==============================] - 0s" in text
    assert text.endswith(" - loss: 0.2500 - acc: 1.0000e-04\n")


def test_metric_formatting_switches_to_exponent_below_1e_3():
    assert tc.callbacks.format_metrics({"loss": 0.0009, "acc": 0.99}) == " - loss: 9.0000e-04 - acc: 0.9900"


def test_divergence_is_reported_not_hidden():
    x, y, _ = _tiny_problem(n=32)
    model = _tiny_cnn("cpu")
    model.compile(tc.optimizers.SGD(1e30), "categorical_crossentropy", ["accuracy"])
    with pytest.raises(FloatingPointError, match="diverged"):
        with np.errstate(all="ignore"):
            model.fit(x, y, batch_size=16, epochs=3, verbose=0)


def test_batchnorm_dropout_fusion_changes_nothing_but_speed(device):
    x, y, _ = _tiny_problem()
    runs, plans = [], []
    for fuse in (True, False):
        model = tc.Sequential([L.Conv2D(8, 3, activation="relu", input_shape=(8, 8, 1)), L.BatchNormalization(),
                               L.Dropout(0.3), L.Flatten(), L.Dense(4, activation="softmax")],
                              device=device, seed=2, fuse=fuse)
        model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        runs.append(model.get_weights())
        plans.append(model.plan(strip_activation="softmax").describe())
    names = [layer.name for layer in model.layers]
    # the fused model ran BatchNormalization and Dropout as one step (and the Conv(relu) before them,
    # where the kernels read a ReLU inside BatchNorm's); the other ran them apart
    joined = 2 if model.backend.kernels.fuses_relu_batchnorm else 1
    fused = [d for d in plans[0] if d.endswith("fused in training)")]
    assert len(fused) == 1 and "dropout" in fused[0] and len(plans[0]) == len(plans[1]) - joined
    assert plans[1][1:3] == names[1:3]
    for a, b in zip(*runs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class Recorder(tc.callbacks.Callback):
    """Records every hook Keras would call, with copies of its logs."""

    def __init__(self, stop_after_batch=None):
        super().__init__()
        self.events, self.stop_after_batch = [], stop_after_batch

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("epoch_begin", epoch))

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("batch_end", batch, {k: float(v) for k, v in logs.items()}))
        if batch == self.stop_after_batch:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch_end", epoch, dict(logs)))

    def on_train_end(self, logs=None):
        self.events.append(("train_end",))


def test_callbacks_get_keras_hooks_and_batch_logs():
    x, y, _ = _tiny_problem(n=40)
    model = _tiny_cnn("cpu")
    rec = Recorder()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[rec])
    kinds = [e[0] for e in rec.events]
    assert kinds == ["train_begin"] + (["epoch_begin"] + ["batch_begin", "batch_end"] * 3 + ["epoch_end"]) * 2 + [
        "train_end"]
    batch_logs = [e[2] for e in rec.events if e[0] == "batch_end"]
    assert all(set(logs) == {"loss", "acc"} for logs in batch_logs)
    # Keras's batch logs are the epoch's running means: the last batch's equal the epoch's
    epoch_logs = [e[2] for e in rec.events if e[0] == "epoch_end"]
    assert batch_logs[2]["loss"] == pytest.approx(epoch_logs[0]["loss"], rel=1e-6)
    assert batch_logs[2]["acc"] == pytest.approx(epoch_logs[0]["acc"], rel=1e-6)


def test_keras_2_batch_hook_names_are_called():
    seen = []

    class Old(tc.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            seen.append((batch, sorted(logs)))

    x, y, _ = _tiny_problem(n=32)
    _tiny_cnn("cpu").fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Old()])
    assert seen == [(0, ["acc", "loss"]), (1, ["acc", "loss"])]


def test_stop_training_ends_fit_after_the_current_batch():
    x, y, _ = _tiny_problem(n=48)
    model = _tiny_cnn("cpu")
    rec = Recorder(stop_after_batch=1)
    history = model.fit(x, y, batch_size=16, epochs=5, verbose=0, callbacks=[rec])
    assert [e[1] for e in rec.events if e[0] == "batch_end"] == [0, 1]
    assert len(history.history["loss"]) == 1 and model.optimizer.iterations == 2
    assert rec.events[-1] == ("train_end",)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # a new fit starts afresh
    assert model.optimizer.iterations == 5


def test_set_weights_with_a_bad_last_array_leaves_the_model_untouched():
    model = tc.Sequential([L.Dense(3, input_shape=(4,)), L.Dense(2)], seed=1)
    before = model.get_weights()
    new = [w + 1 for w in before]
    new[-1][0] = np.nan
    with pytest.raises(ValueError, match="contains NaN or inf"):
        model.set_weights(new)
    assert all(np.array_equal(p, q) for p, q in zip(before, model.get_weights()))


def test_inference_keeps_nothing_for_a_backward_pass():
    """predict frees each activation after its last reader and keeps no backward caches: its peak
    memory is a fraction of what the training forward holds on its tape."""
    import tracemalloc

    import week2_model

    model = week2_model.build_week2_model(device="cpu", seed=0)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["accuracy"])
    x = np.random.default_rng(0).random((128, 28, 28, 1), dtype=np.float32)
    model.predict(x, batch_size=128)  # warm up: compile, scratch buffers
    xs = model.check_inputs(x)
    model.plan().forward(xs, training=True, keep_for_backward=True)  # and the training kernels' compile
    tracemalloc.start()
    model.plan().forward(xs, training=True, keep_for_backward=True)  # the tape, dropped on return
    _, training_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    model.predict(x, batch_size=128)
    _, inference_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert inference_peak < 0.5 * training_peak, (inference_peak, training_peak)  # Week2: 12.5 MB vs 31 MB
    _, tape = model.plan().forward(xs, training=False, keep_for_backward=False)
    assert tape is None
    for layer in model.layers:  # layers hold weights and configuration, never activations
        arrays = [k for k, v in vars(layer).items() if isinstance(v, np.ndarray)]
        assert arrays == [], (layer.name, arrays)


def test_evaluate_checks_its_batch_size():
    x, y, _ = _tiny_problem(n=16)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        _tiny_cnn("cpu").evaluate(x, y, batch_size=0, verbose=0)


def test_weight_gradients_are_computed_in_their_slots_of_the_gradient_buffer():
    """A backward pass hands a layer its weight's slot in the model's gradient buffer, once (no
    copy after: on a GPU each would be a kernel launch); another use of the weight in the same
    pass gets None, writes a new array, and the pass adds it; a weight no step reached is zero."""
    from tinycnn import parameters
    from tinycnn.parameters import ParameterBuffer

    layer = tc.layers.Dense(3)
    layer.build((4,), seed=0)
    buffer = ParameterBuffer([(layer, "kernel"), (layer, "bias")], np, np.float32)
    buffer.grads[...] = 7  # a previous step's
    assert parameters.gradient_target(layer, "kernel") is None  # no backward pass running
    with buffer.collecting():
        slot = parameters.gradient_target(layer, "kernel")
        assert slot is buffer.grad_views[0] and np.shares_memory(slot, buffer.grads)
        assert parameters.gradient_target(layer, "kernel") is None  # handed out once
        slot[...] = 1
        buffer.add_gradient(layer, "kernel", slot.reshape(-1, 3))  # written in place: kept as it is
        np.testing.assert_array_equal(buffer.grad_views[0], 1)
        buffer.add_gradient(layer, "kernel", np.ones((4, 3), np.float32))  # a second use: added
    np.testing.assert_array_equal(buffer.grad_views[0], 2)
    np.testing.assert_array_equal(buffer.grad_views[1], 0)  # the bias: no gradient came
    assert parameters.gradient_target(layer, "kernel") is None


@pytest.mark.parametrize("rate", [0.3, None])
def test_the_relu_batchnorm_step_gives_the_gradients_of_the_layers_apart(rate):
    """Where a kernel set reads a ReLU inside its BatchNorm kernels (the GPU's), the plan runs
    Conv(relu) -> BatchNorm (-> Dropout) as one step. On the reference kernels, whose fused entries
    are the composite, that step gives the layers' own outputs and gradients to the bit: what the
    step wires (linear part, kernel, saved state, the gradients of two layers) is right."""
    from tinycnn.plan import Plan

    with tc.config.using(kernels="reference"):
        model = tc.Sequential([L.Conv2D(6, 3, activation="relu", input_shape=(8, 8, 2)), L.BatchNormalization(),
                               *([L.Dropout(rate)] if rate else []), L.Conv2D(4, 3), L.BatchNormalization(),
                               L.Flatten(), L.Dense(3)], device="cpu", seed=1)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 8, 8, 2)).astype(np.float32)
    model.plan()  # builds the weights and the gradient buffer
    results = []
    for fuse in (True, False):
        plan = Plan(model.nodes, model.inputs, model.outputs, fuse_relu_batchnorm=fuse)
        assert ("(ReLU and BatchNorm fused in training)" in plan.describe()[0]) == fuse
        for layer in model.layers:
            layer.reseed(11)
        (out,), tape = plan.forward([x], training=True, keep_for_backward=True)
        plan.backward(tape, [np.cos(out)], model.params)
        results.append((out, model.params.grads.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert np.count_nonzero(results[0][1]) > 0.9 * results[0][1].size  # and the gradients are there


def test_a_metric_subclass_is_summed_from_its_own_values():
    """CategoricalAccuracy sums through the kernel set's count; a subclass that redefines `values`
    must be summed from those values, not from the count."""
    class Never(tc.metrics.CategoricalAccuracy):
        name = "never"

        def values(self, predictions, targets):
            return super().values(predictions, targets) & False

    k = tc.backend.get_backend("cpu").kernels
    predictions = np.eye(4, dtype=np.float32)
    assert int(tc.metrics.CategoricalAccuracy().total(predictions, predictions, k)) == 4
    assert int(Never().total(predictions, predictions, k)) == 0


def test_a_metric_accumulates_an_epochs_sum_in_place_where_it_is_an_array():
    """Metric.accumulate: the first batch's total becomes the running sum, host scalars add as
    values, and a 0-d array (a device sum) is added into in place: the same object comes back
    (the accuracy's GPU kernel counts into it: tests/test_gpu_kernels_on_cpu.py)."""
    metric = tc.metrics.CategoricalAccuracy()
    kernels = tc.get_backend("cpu").kernels
    predictions = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    targets = np.eye(4, dtype=np.float32)[[0, 1, 2, 0, 0]]  # 4 hits of 5
    first = metric.accumulate(0, predictions, targets, kernels)
    assert int(first) == 4
    assert int(metric.accumulate(first, predictions, targets, kernels)) == 8
    running = np.array(3, dtype=np.int64)
    assert metric.accumulate(running, predictions, targets, kernels) is running and int(running) == 7
    assert metric.accumulate(running, predictions, targets) is running and int(running) == 11  # no kernels
