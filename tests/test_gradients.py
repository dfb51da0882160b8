"""Every layer and loss against central finite differences in float64 (tolerance 1e-6, see
tinycnn.gradcheck for why): the configurations that break naive code included."""
import numpy as np
import pytest

import tinycnn as tc
from tinycnn import gradcheck
from tinycnn import layers as L

TOL = gradcheck.DEFAULT_TOLERANCE


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _check(layer, x, device, training=True, **kw):
    layer.build(x.shape[1:], backend=device, dtype="float64", seed=1)
    result = gradcheck.check_layer(layer, x, training=training, **kw)
    assert result.ok, str(result)
    return result


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(filters=4, kernel_size=3), (2, 7, 7, 3)),
        (dict(filters=4, kernel_size=3, strides=2, padding="same"), (2, 7, 8, 3)),
        (dict(filters=3, kernel_size=3, strides=2, padding="valid", use_bias=False), (2, 9, 8, 2)),
        (dict(filters=5, kernel_size=1, use_bias=False), (2, 5, 5, 3)),
        (dict(filters=5, kernel_size=1, strides=2, padding="same"), (2, 5, 5, 3)),
        (dict(filters=3, kernel_size=4, use_bias=False), (2, 6, 6, 2)),
        (dict(filters=3, kernel_size=4, strides=2, padding="same", use_bias=True), (2, 7, 7, 2)),
        (dict(filters=4, kernel_size=(2, 3), activation="relu"), (2, 6, 5, 3)),
        # >= 8 input channels at stride 1: the CPU's direct input gradient (a gather), not col2im
        (dict(filters=18, kernel_size=3, padding="same", use_bias=False), (2, 6, 5, 10)),
    ],
    ids=["3x3", "3x3-s2-same", "3x3-s2-valid-nobias", "1x1-nobias", "1x1-s2-same", "4x4-nobias", "4x4-s2-same", "2x3-relu",
         "3x3-same-10ch"],
)
def test_conv2d(device, kwargs, shape):
    _check(L.Conv2D(**kwargs), _x(shape), device)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh", "softmax"])
def test_dense(device, activation):
    _check(L.Dense(4, activation=activation), _x((3, 6)), device)


def test_batchnorm_training_uses_full_batch_statistics_gradient(device):
    layer = L.BatchNormalization()
    x = _x((4, 3, 3, 5)) * 3 + 1
    layer.build(x.shape[1:], backend=device, dtype="float64")
    layer.set_weights([np.linspace(0.5, 2, 5), np.linspace(-1, 1, 5), np.zeros(5), np.ones(5)])
    result = gradcheck.check_layer(layer, x, training=True)
    assert result.ok, str(result)


def test_batchnorm_inference_uses_moving_statistics(device):
    layer = L.BatchNormalization()
    x = _x((4, 3, 3, 5))
    layer.build(x.shape[1:], backend=device, dtype="float64")
    rng = np.random.default_rng(3)
    layer.set_weights([rng.uniform(0.5, 2, 5), rng.standard_normal(5), rng.standard_normal(5), rng.uniform(0.5, 2, 5)])
    result = gradcheck.check_layer(layer, x, training=False)
    assert result.ok, str(result)


def test_dropout_with_a_fixed_mask(device):
    layer = L.Dropout(0.4)
    x = _x((3, 4, 4, 2))
    layer.build(x.shape[1:], backend=device, dtype="float64")
    layer.reseed(7)
    y = np.asarray(tc.backend.to_numpy(layer.forward(layer.xp.asarray(x), training=True)))
    assert 0 < (y == 0).mean() < 0.8  # the mask really drops entries
    result = gradcheck.check_layer(layer, x, training=True, before_forward=lambda: layer.reseed(7))
    assert result.ok, str(result)


def _tie_free(shape, seed=0):
    """A shuffled linspace: every entry differs from every other by far more than the step h."""
    values = np.linspace(-2, 2, int(np.prod(shape)))
    return np.random.default_rng(seed).permutation(values).reshape(shape)


@pytest.mark.parametrize("pool, strides, shape", [(2, None, (2, 6, 6, 3)), (2, None, (2, 5, 7, 2)), (3, 2, (2, 7, 7, 2)), ((2, 3), (1, 2), (1, 5, 7, 2))])
def test_maxpooling(device, pool, strides, shape):
    _check(L.MaxPooling2D(pool, strides=strides), _tie_free(shape), device)


def test_global_average_pooling(device):
    _check(L.GlobalAveragePooling2D(), _x((3, 4, 5, 6)), device)


def test_flatten(device):
    _check(L.Flatten(), _x((2, 3, 4, 2)), device)


@pytest.mark.parametrize("layer_factory", [lambda: L.Activation("relu"), lambda: L.ReLU(), lambda: L.Activation("tanh"),
                                           lambda: L.Activation("sigmoid"), lambda: L.Softmax()],
                         ids=["relu", "ReLU", "tanh", "sigmoid", "softmax"])
def test_activations(device, layer_factory):
    _check(layer_factory(), _x((3, 7)), device)


@pytest.mark.parametrize("from_logits", [True, False])
def test_categorical_crossentropy(from_logits):
    rng = np.random.default_rng(0)
    targets = np.eye(5)[rng.integers(0, 5, 6)]
    output = rng.standard_normal((6, 5)) * 3
    if not from_logits:
        output = tc.activations.softmax(output)
    result = gradcheck.check_loss(tc.losses.CategoricalCrossentropy(), output, targets, from_logits=from_logits)
    assert result.ok, str(result)


def test_sparse_categorical_crossentropy_equals_dense_on_one_hot():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 8)
    logits = rng.standard_normal((8, 4))
    sparse = tc.losses.SparseCategoricalCrossentropy()
    dense = sparse.targets_to_dense(labels, 4)
    result = gradcheck.check_loss(sparse, logits, dense)
    assert result.ok, str(result)
    p = tc.activations.softmax(logits)
    assert sparse(labels, p) == pytest.approx(-np.log(p[np.arange(8), labels]).mean(), rel=1e-6)


def _small_model(device, dense=False):
    if dense:
        body = [L.Flatten(input_shape=(6, 6, 2)), L.Dense(7, activation="tanh"), L.BatchNormalization(),
                L.Dropout(0.2), L.Dense(4), L.Activation("softmax")]
    else:
        body = [L.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 2)), L.BatchNormalization(), L.Dropout(0.2),
                L.MaxPooling2D(2), L.Conv2D(5, 1, activation="relu", use_bias=False), L.Conv2D(4, 3, padding="same"),
                L.BatchNormalization(), L.GlobalAveragePooling2D(), L.Activation("softmax")]
    model = tc.Sequential(body, device=device, dtype="float64", seed=5)
    model.compile(tc.optimizers.Adam(), "categorical_crossentropy", ["accuracy"])
    return model


@pytest.mark.parametrize("dense", [False, True], ids=["cnn", "dense"])
def test_whole_model_loss_gradient_against_every_parameter(device, dense):
    model = _small_model(device, dense)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6,) + model.input_shape)
    y = np.eye(4)[rng.integers(0, 4, 6)]
    result = gradcheck.check_model(model, x, y)
    assert result.ok, str(result)
    assert sum(e["checked"] for e in result.entries) == sum(l.count_trainable_params() for l in model.layers)


def test_gradcheck_catches_a_wrong_backward():
    """The checker itself must fail on a gradient that is off by 1 %."""
    layer = L.Conv2D(3, 3)
    x = _x((2, 5, 5, 2))
    layer.build(x.shape[1:], backend="cpu", dtype="float64")
    right = layer.backward
    layer.backward = lambda dy: right(dy) * 1.01
    result = gradcheck.check_layer(layer, x)
    assert not result.ok
    assert result.entries[0]["name"] == "input" and result.entries[0]["error"] > 1e-3
    assert "FAIL" in str(result)
