"""The Keras API surface CNN scripts touch: losses, metrics, optimizers (each step against Keras 3's
update rule, written out here in float64 from Keras's source), initializers, regularizers,
trainable=False, sample and class weights, validation_split and the Keras entry points."""
import math

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import gradcheck
from tinycnn import layers as L
from tinycnn.backend import get_backend


# -- losses: the numbers of Keras's own documentation -------------------------------------------------
def test_loss_functions_give_kerass_documented_values():
    y_pred = [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    np.testing.assert_allclose(tc.losses.categorical_crossentropy([[0, 1, 0], [0, 0, 1]], y_pred), [0.0513, 2.303],
                               atol=1e-3)
    np.testing.assert_allclose(tc.losses.sparse_categorical_crossentropy([1, 2], y_pred), [0.0513, 2.303], atol=1e-3)
    np.testing.assert_allclose(tc.losses.binary_crossentropy([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]]),
                               [0.916, 0.714], atol=1e-3)
    np.testing.assert_allclose(tc.losses.mean_squared_error([[0, 1], [0, 0]], [[1, 1], [1, 0]]), [0.5, 0.5])


def test_loss_objects_reduce_like_keras():
    y_true, y_pred = [[0, 1, 0], [0, 0, 1]], [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]
    cce = tc.losses.CategoricalCrossentropy()
    assert cce(y_true, y_pred) == pytest.approx(1.177, abs=1e-3)
    assert cce(y_true, y_pred, sample_weight=[0.3, 0.7]) == pytest.approx(0.814, abs=1e-3)
    bce = tc.losses.BinaryCrossentropy(from_logits=True)
    assert bce([0, 1, 0, 0], [-18.6, 0.51, 2.94, -12.8]) == pytest.approx(0.865, abs=1e-3)
    assert tc.losses.get("mse").name == "mean_squared_error"
    assert isinstance(tc.losses.get(tc.losses.binary_crossentropy), tc.losses.BinaryCrossentropy)


def test_from_logits_trains_a_model_that_ends_in_a_linear_layer():
    """The silent failure of the issue: a linear Dense(10) with a probability loss. from_logits
    fixes it, and compile warns when it is missing."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)
    inputs = tc.Input(shape=(4,))
    model = tc.Model(inputs, L.Dense(4)(L.Dense(16, activation="relu")(inputs)), seed=1)
    with pytest.warns(UserWarning, match="pass from_logits=True"):
        model.compile("adam", "sparse_categorical_crossentropy")
    model.compile(tc.optimizers.Adam(0.02), tc.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    history = model.fit(x, labels, batch_size=16, epochs=40, verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    assert model.predict(x, verbose=0).min() < 0  # predict returns the logits, as Keras does


def test_binary_crossentropy_trains_a_sigmoid_model_and_reports_binary_accuracy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 3)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.float32)
    model = tc.Sequential([L.Dense(1, activation="sigmoid", input_shape=(3,))], seed=0)
    model.compile(tc.optimizers.Adam(0.05), "binary_crossentropy", ["accuracy"])
    assert model.plan(strip_activation="sigmoid").describe()[-1].endswith("(logits: sigmoid fused into the loss)")
    history = model.fit(x, y, batch_size=16, epochs=30, verbose=0)
    assert isinstance(model.metrics[0], tc.metrics.BinaryAccuracy) and model.metrics[0].name == "accuracy"
    assert history.history["accuracy"][-1] > 0.9
    predicted = model.predict(x, verbose=0)
    assert predicted.shape == (80, 1) and 0 <= predicted.min() and predicted.max() <= 1


def test_mean_squared_error_regression_with_any_output_shape():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 4, 4, 1)).astype(np.float32)
    model = tc.Sequential([L.Conv2D(1, 3, padding="same", input_shape=(4, 4, 1))], seed=0)
    model.compile(tc.optimizers.Adam(0.05), "mse")
    history = model.fit(x, 2 * x, batch_size=8, epochs=30, verbose=0)
    assert history.history["loss"][-1] < 0.05 * history.history["loss"][0]


# -- metrics ----------------------------------------------------------------------------------------------
def _classifier(seed=0, loss="categorical_crossentropy", metrics=("accuracy",)):
    model = tc.Sequential([L.Dense(8, activation="relu", input_shape=(5,)), L.Dense(3, activation="softmax")],
                          seed=seed)
    model.compile(tc.optimizers.Adam(0.02), loss, list(metrics))
    return model


def _three_classes(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    labels = np.argmax(x[:, :3], axis=1)
    return x, labels, tc.utils.to_categorical(labels, 3)


def test_history_keys_carry_the_names_the_user_gave():
    x, labels, y = _three_classes()
    model = _classifier(metrics=["accuracy", tc.metrics.TopKCategoricalAccuracy(k=2), "acc"])
    history = model.fit(x, y, epochs=2, verbose=0, validation_data=(x, y))
    assert set(history.history) == {"loss", "accuracy", "top_k_categorical_accuracy", "acc", "val_loss",
                                    "val_accuracy", "val_top_k_categorical_accuracy", "val_acc", "seconds"}
    assert history.history["accuracy"] == history.history["acc"]
    model = _classifier(loss="sparse_categorical_crossentropy", metrics=[tc.metrics.SparseCategoricalAccuracy()])
    assert "sparse_categorical_accuracy" in model.fit(x, labels, epochs=1, verbose=0).history
    assert model.metrics_names == ["loss", "sparse_categorical_accuracy"]


def test_metric_functions_and_objects_compute_kerass_values():
    y_true, y_pred = [[0, 0, 1], [0, 1, 0]], [[0.1, 0.9, 0.8], [0.05, 0.95, 0]]
    np.testing.assert_array_equal(tc.metrics.categorical_accuracy(y_true, y_pred), [0.0, 1.0])
    np.testing.assert_array_equal(tc.metrics.sparse_categorical_accuracy([2, 1], y_pred), [0.0, 1.0])
    top = tc.metrics.TopKCategoricalAccuracy(k=2)
    top.update_state(y_true, y_pred)
    assert top.result() == 1.0
    acc = tc.metrics.BinaryAccuracy()
    acc.update_state([[1], [1], [0], [0]], [[0.98], [1], [0], [0.6]])
    assert acc.result() == 0.75
    acc.reset_state()
    acc.update_state([[1], [1], [0], [0]], [[0.98], [1], [0], [0.6]], sample_weight=[1, 0, 0, 1])
    assert acc.result() == 0.5
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        tc.metrics.get("f1")


def test_evaluate_return_dict_and_the_single_batch_methods():
    x, labels, y = _three_classes()
    model = _classifier()
    model.fit(x, y, epochs=3, verbose=0)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert list(result) == ["loss", "accuracy"]
    assert model.evaluate(x, y, verbose=0) == list(result.values())
    assert model.test_on_batch(x, y, return_dict=True)["accuracy"] == pytest.approx(result["accuracy"])
    np.testing.assert_array_equal(model.predict_on_batch(x), model.predict(x, verbose=0))
    logs = model.train_on_batch(x[:16], y[:16], return_dict=True)
    assert set(logs) == {"loss", "accuracy"}


# -- sample weights, class weights, validation_split -------------------------------------------------------
def test_sample_weights_weigh_the_loss_as_keras_does():
    """Keras 3: sum(w * loss) / batch size, and the gradient of that."""
    x, labels, y = _three_classes(n=12)
    w = np.linspace(0.0, 2.0, 12)
    model = _classifier(seed=3)
    model.compile(tc.optimizers.SGD(0.1), "categorical_crossentropy", ["accuracy"])
    per_sample = tc.losses.categorical_crossentropy(y, model.predict(x, verbose=0))
    loss, grads = model.loss_and_gradients(x, y, sample_weight=w)
    assert loss == pytest.approx((per_sample * w).sum() / 12, rel=1e-5)
    # the same gradient as duplicating each sample in proportion to its weight
    model64 = tc.Sequential([L.Dense(8, activation="relu", input_shape=(5,)), L.Dense(3, activation="softmax")],
                            seed=3, dtype="float64")
    model64.compile("sgd", "categorical_crossentropy")
    result = gradcheck.check_model(model64, x.astype(np.float64), y.astype(np.float64))
    assert result.ok
    _, g_weighted = model64.loss_and_gradients(x, y, sample_weight=w)
    g_each = [model64.loss_and_gradients(x[i : i + 1], y[i : i + 1])[1] for i in range(12)]
    for k in range(len(g_weighted)):
        np.testing.assert_allclose(g_weighted[k], sum(w[i] * g_each[i][k] for i in range(12)) / 12, atol=1e-12)


def test_class_weight_equals_the_sample_weights_it_stands_for():
    x, labels, y = _three_classes(n=48)
    class_weight = {0: 1.0, 1: 3.0, 2: 0.5}
    runs = []
    for kwargs in ({"class_weight": class_weight},
                   {"sample_weight": np.array([class_weight[c] for c in labels])}):
        model = _classifier(seed=4)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, **kwargs)
        runs.append((model.get_weights(), history.history["loss"]))
    assert runs[0][1] == runs[1][1] and all(np.array_equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    with pytest.raises(tc.ShapeError, match=r"sample_weight must have shape \(48,\)"):
        _classifier().fit(x, y, sample_weight=np.ones(5), verbose=0)


def test_validation_split_holds_out_the_last_samples(capsys):
    x, labels, y = _three_classes(n=40)
    model = _classifier(seed=5)
    history = model.fit(x, y, batch_size=10, epochs=1, validation_split=0.25, shuffle=False, verbose=1)
    assert "Train on 30 samples, validate on 10 samples" in capsys.readouterr().out
    assert history.history["val_loss"][0] == pytest.approx(model.evaluate(x[30:], y[30:], verbose=0)[0], rel=1e-6)
    model.fit(x[:10], y[:10], epochs=1, validation_split=0.25, verbose=1)  # Keras 3: floor(10 * 0.75) = 7 train
    assert "Train on 7 samples, validate on 3 samples" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"validation_split must be in \[0, 1\)"):
        model.fit(x, y, validation_split=1.5, verbose=0)


# Numbers from Keras 3.15.1 (TensorFlow 2.21) for this model, data and these weights.
KERAS_WEIGHTING = {
    "kernel": [[0.03436267375946045, -0.41832423210144043, 0.7425023317337036],
               [-0.8618922233581543, -0.23019659519195557, -0.686377227306366]],
    "evaluate": {"loss": 5.970718860626221, "accuracy": 0.10000000149011612, "weighted_accuracy": 0.15555556118488312},
    "fit": {"loss": 3.665522336959839, "accuracy": 0.0, "weighted_accuracy": 0.0, "val_loss": 1.2237194776535034,
            "val_accuracy": 0.3333333432674408, "val_weighted_accuracy": 0.3333333432674408},
}


def test_metrics_ignore_sample_weights_and_weighted_metrics_use_them_as_in_keras():
    """Keras 3: sample and class weights reach the loss and compile's weighted_metrics (logged as
    weighted_<name> when the name is taken), not the metrics; class_weight weighs only the training
    part of a validation_split (floor(n * (1 - split)) samples)."""
    x = np.random.default_rng(0).standard_normal((10, 2)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    model = tc.Sequential([L.Dense(3, activation="softmax", input_shape=(2,))])
    model.set_weights([np.array(KERAS_WEIGHTING["kernel"], np.float32), np.zeros(3, np.float32)])
    model.compile(tc.optimizers.SGD(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"],
                  weighted_metrics=["accuracy"])
    result = model.evaluate(x, labels, sample_weight=np.arange(10, dtype=np.float32), verbose=0, return_dict=True)
    assert list(result) == ["loss", "accuracy", "weighted_accuracy"]
    assert result == pytest.approx(KERAS_WEIGHTING["evaluate"], rel=1e-6)
    history = model.fit(x, labels, validation_split=0.25, epochs=1, verbose=0, shuffle=False,
                        class_weight={0: 5.0, 1: 1.0, 2: 1.0})
    logged = {k: v[0] for k, v in history.history.items() if k != "seconds"}
    assert logged == pytest.approx(KERAS_WEIGHTING["fit"], rel=1e-6)


def test_accuracy_is_resolved_from_the_output_as_keras_3_does():
    multi_label = tc.Sequential([L.Dense(3, activation="sigmoid", input_shape=(2,))])
    multi_label.compile("sgd", "binary_crossentropy", metrics=["accuracy"])
    assert type(multi_label.metrics[0]) is tc.metrics.CategoricalAccuracy  # Keras 3: binary only for one unit
    one_unit = tc.Sequential([L.Dense(1, input_shape=(2,))])
    one_unit.compile("sgd", "mse", metrics=["Accuracy"])
    assert type(one_unit.metrics[0]) is tc.metrics.BinaryAccuracy and one_unit.metrics[0].name == "Accuracy"


def test_declared_logits_are_not_clipped_but_probabilities_are():
    """Keras 3: from_logits=True is the exact softmax cross-entropy; probabilities are clipped at 1e-7."""
    y, z = np.array([[0.0, 1.0, 0.0]]), np.array([[30.0, -10.0, 0.0]], np.float32)
    assert tc.losses.CategoricalCrossentropy(from_logits=True)(y, z) == pytest.approx(40.0)
    softmax = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert tc.losses.CategoricalCrossentropy()(y, softmax) == pytest.approx(-math.log(1e-7), rel=1e-6)
    model = tc.Sequential([L.Dense(3, input_shape=(3,))])
    model.set_weights([np.eye(3, dtype=np.float32), np.zeros(3, np.float32)])
    model.compile("sgd", tc.losses.CategoricalCrossentropy(from_logits=True))
    assert model.evaluate(z, y, verbose=0) == pytest.approx(40.0, rel=1e-6)


def test_training_and_evaluating_with_only_a_loss_returns_a_number():
    x, labels, y = _three_classes(n=8)
    model = tc.Sequential([L.Dense(3, activation="softmax", input_shape=(5,))], seed=0)
    model.compile("sgd", "categorical_crossentropy")
    for value in (model.evaluate(x, y, verbose=0), model.test_on_batch(x, y), model.train_on_batch(x, y)):
        assert isinstance(value, float)


# -- optimizers: one step each against Keras 3's rule ------------------------------------------------------
def _steps(optimizer, grads, p0, views=None):
    be = get_backend("cpu")
    params = p0.copy()
    optimizer.build(params, be)
    for g in grads:
        g = g.copy()
        optimizer.apply(params, g, views(g) if views else None)
    return params


P0 = np.array([0.5, -1.0, 2.0, 0.25])
GRADS = [np.array([0.1, -0.2, 0.3, 0.0]), np.array([-0.4, 0.5, 0.6, 1e-3]), np.array([0.2, 0.2, -0.1, -0.3])]


def test_rmsprop_plain_momentum_and_centered_follow_keras():
    for momentum, centered in [(0.0, False), (0.5, False), (0.0, True), (0.5, True)]:
        p, v, m, a = P0.copy(), np.zeros(4), np.zeros(4), np.zeros(4)
        for g in GRADS:
            v = 0.9 * v + 0.1 * g * g
            if centered:
                a = 0.9 * a + 0.1 * g
                denominator = v - a * a + 1e-7
            else:
                denominator = v + 1e-7
            increment = 0.01 * g / np.sqrt(denominator)
            if momentum:
                m = momentum * m + increment
                p = p - m
            else:
                p = p - increment
        got = _steps(tc.optimizers.RMSprop(0.01, momentum=momentum, centered=centered), GRADS, P0)
        np.testing.assert_allclose(got, p, rtol=1e-13)


def test_adadelta_follows_keras():
    p, ag, ad = P0.copy(), np.zeros(4), np.zeros(4)
    for g in GRADS:
        ag = 0.95 * ag + 0.05 * g * g
        delta = -np.sqrt(ad + 1e-7) * g / np.sqrt(ag + 1e-7)
        ad = 0.95 * ad + 0.05 * delta * delta
        p = p + 1.0 * delta
    np.testing.assert_allclose(_steps(tc.optimizers.Adadelta(1.0), GRADS, P0), p, rtol=1e-13)


def test_adamw_decays_before_the_adam_step():
    p, m, v = P0.copy(), np.zeros(4), np.zeros(4)
    for t, g in enumerate(GRADS, start=1):
        p = p - p * 0.004 * 0.01  # decoupled weight decay with the current learning rate, first
        m = m + (g - m) * 0.1
        v = v + (g * g - v) * 0.001
        p = p - 0.01 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(_steps(tc.optimizers.AdamW(0.01), GRADS, P0), p, rtol=1e-12)
    opt = tc.optimizers.get("adamw")
    assert isinstance(opt, tc.optimizers.AdamW) and opt.weight_decay == 0.004


def test_sgd_with_weight_decay_and_every_clipping_follows_keras():
    views = lambda g: [g[:2], g[2:]]  # noqa: E731 - two weights in one flat buffer
    # clipnorm: each weight's gradient scaled to norm <= 0.3; then w -= w * wd * lr; then w -= lr * g
    p = P0.copy()
    for g in GRADS:
        parts = [g[:2], g[2:]]
        clipped = np.concatenate([part * 0.3 / max(np.linalg.norm(part), 0.3) for part in parts])
        p = p - p * 0.1 * 0.5
        p = p - 0.5 * clipped
    got = _steps(tc.optimizers.SGD(0.5, weight_decay=0.1, clipnorm=0.3), GRADS, P0, views)
    np.testing.assert_allclose(got, p, rtol=1e-13)
    p = P0.copy()
    for g in GRADS:
        p = p - 0.5 * g * min(1.0, 0.3 / np.linalg.norm(g))
    np.testing.assert_allclose(_steps(tc.optimizers.SGD(0.5, global_clipnorm=0.3), GRADS, P0), p, rtol=1e-13)
    p = P0.copy()
    for g in GRADS:
        p = p - 0.5 * np.clip(g, -0.25, 0.25)
    np.testing.assert_allclose(_steps(tc.optimizers.SGD(0.5, clipvalue=0.25), GRADS, P0), p, rtol=1e-13)
    with pytest.raises(ValueError, match="at most one of clipnorm"):
        tc.optimizers.SGD(clipnorm=1.0, clipvalue=1.0)


def test_schedules():
    S = tc.optimizers.schedules
    assert S.ExponentialDecay(0.1, 10, 0.5)(20) == pytest.approx(0.025)
    assert S.ExponentialDecay(0.1, 10, 0.5, staircase=True)(15) == pytest.approx(0.05)
    assert [S.PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])(s) for s in (0, 10, 11, 25)] == [1.0, 1.0, 0.5, 0.1]
    assert S.CosineDecay(1.0, 100)(50) == pytest.approx(0.5) and S.CosineDecay(1.0, 100, alpha=0.1)(200) == 0.1
    warm = S.CosineDecay(0.0, 10, alpha=0.1, warmup_target=0.01, warmup_steps=4)  # Keras 3.15's values:
    assert [warm(s) for s in (0, 2, 4, 9, 14, 20)] == pytest.approx([0.0, 0.005, 0.01, 0.0055, 0.001, 0.001])


# -- initializers and regularizers --------------------------------------------------------------------------
def test_initializers_have_kerass_scales():
    rng = np.random.default_rng(0)
    I = tc.initializers
    w = I.get("he_normal")((400, 300), "float64", rng)
    assert np.abs(w).max() <= 2 * math.sqrt(2 / 400) / 0.87962566103423978 + 1e-12  # truncated at 2 deviations
    assert w.std() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    w = I.GlorotUniform()((3, 3, 16, 32), "float32", rng)
    limit = math.sqrt(6 / (9 * 16 + 9 * 32))
    assert w.dtype == np.float32 and np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit
    assert I.get("lecun_uniform")((1000, 10), "float64", rng).max() <= math.sqrt(3 / 1000)
    assert np.all(I.get({"class_name": "Constant", "config": {"value": 0.5}})((2, 2), "float32", rng) == 0.5)
    a, b = I.RandomNormal(seed=3)((5,), "float64", rng), I.RandomNormal(seed=3)((5,), "float64", rng)
    assert np.array_equal(a, b)  # an initializer's own seed wins over the layer's stream
    with pytest.raises(ValueError, match="unknown initializer 'xavier'"):
        L.Dense(3, kernel_initializer="xavier")


def test_layers_take_initializers_and_keep_the_default_numbers():
    a = tc.Sequential([L.Conv2D(4, 3, input_shape=(5, 5, 2))], seed=7)
    b = tc.Sequential([L.Conv2D(4, 3, input_shape=(5, 5, 2), kernel_initializer=tc.initializers.GlorotUniform())],
                      seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(a.get_weights(), b.get_weights()))
    c = tc.Sequential([L.Dense(3, input_shape=(2,), kernel_initializer="zeros", bias_initializer="ones")], seed=0)
    kernel, bias = c.get_weights()
    assert not kernel.any() and np.all(bias == 1)


def test_regularizers_join_the_loss_and_its_gradient():
    rng = np.random.default_rng(6)
    model = tc.Sequential([L.Dense(4, activation="tanh", input_shape=(3,), kernel_regularizer=tc.regularizers.l1_l2(0.01, 0.02)),
                           L.Dense(2, activation="softmax", bias_regularizer="l2")], seed=0, dtype="float64")
    model.compile("sgd", "categorical_crossentropy")
    x, y = rng.standard_normal((6, 3)), np.eye(2)[rng.integers(0, 2, 6)]
    result = gradcheck.check_model(model, x, y)  # the penalty's gradient is checked with the rest
    assert result.ok, str(result)
    kernel, _, _, bias = model.get_weights()
    penalty = 0.01 * np.abs(kernel).sum() + 0.02 * (kernel ** 2).sum() + 0.01 * (bias ** 2).sum()
    plain = tc.losses.categorical_crossentropy(y, model.predict(x, verbose=0)).mean()
    assert model.evaluate(x, y, verbose=0) == pytest.approx(plain + penalty, rel=1e-10)  # the loss alone: a float
    assert tc.regularizers.l1_l2().get_config() == {"l1": 0.0, "l2": 0.0}  # Keras 3's defaults (Keras 2: 0.01)


# -- trainable = False ----------------------------------------------------------------------------------------
def test_a_frozen_layer_keeps_its_weights_and_counts_as_non_trainable():
    x, labels, y = _three_classes(n=40)
    base = L.Dense(8, activation="relu", input_shape=(5,))
    bn = L.BatchNormalization()
    model = tc.Sequential([base, bn, L.Dense(3, activation="softmax")], seed=0)
    model.compile(tc.optimizers.Adam(0.05), "categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    base.trainable = bn.trainable = False
    frozen = base.get_weights() + bn.get_weights()
    head = model.layers[2].get_weights()
    lines = []
    model.summary(print_fn=lines.append)
    assert "Non-trainable params: 80" in lines and "Trainable params: 27" in lines  # Dense 48 + BN 32 frozen
    model.fit(x, y, epochs=2, verbose=0)
    assert all(np.array_equal(p, q) for p, q in zip(frozen, base.get_weights() + bn.get_weights()))  # BN stats too
    assert not np.array_equal(head[0], model.layers[2].get_weights()[0])
    base.trainable = True  # unfrozen: trains again
    model.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(frozen[0], base.get_weights()[0])


def test_batchnorm_without_center_or_scale():
    layer = L.BatchNormalization(center=False)
    x = np.random.default_rng(0).standard_normal((4, 3, 3, 5)) * 2 + 1
    layer.build(x.shape[1:], backend="cpu", dtype="float64")
    assert list(layer.weights) == ["gamma", "moving_mean", "moving_variance"]
    assert gradcheck.check_layer(layer, x).ok
    layer = L.BatchNormalization(scale=False, center=False)
    layer.build(x.shape[1:], backend="cpu", dtype="float64")
    assert list(layer.weights) == ["moving_mean", "moving_variance"] and layer.trainable_names == []


# -- namespaces and utilities -----------------------------------------------------------------------------------
def test_keras_namespaces_exist():
    assert tc.models.Sequential is tc.Sequential and tc.models.Model is tc.Model
    assert tc.optimizers.schedules.InverseTimeDecay is tc.schedules.InverseTimeDecay
    for module, names in [(tc.metrics, ["Accuracy", "SparseCategoricalAccuracy", "TopKCategoricalAccuracy"]),
                          (tc.initializers, ["HeNormal", "GlorotUniform", "Zeros", "Constant"]),
                          (tc.regularizers, ["L1", "L2", "L1L2", "l2"]),
                          (tc.utils, ["to_categorical", "set_random_seed"])]:
        assert all(hasattr(module, n) for n in names), module


def test_to_categorical_and_set_random_seed():
    np.testing.assert_array_equal(tc.utils.to_categorical([[1], [0]], 3), [[0, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="does not fit num_classes=2"):
        tc.utils.to_categorical([2], 2)
    seeds = []
    for _ in range(2):
        tc.utils.set_random_seed(42)
        seeds.append((tc.Sequential([L.Dense(2, input_shape=(3,))]).seed, np.random.random()))
    assert seeds[0] == seeds[1]
    tc.randomness.set_global_seed(None)
