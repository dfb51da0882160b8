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
    shapes = [a.shape[1:] for a in x] if isinstance(x, list) else x.shape[1:]
    layer.build(shapes, backend=device, dtype="float64", seed=1)
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
        # ... and 'valid' on a small image, where the padded gather would be mostly zeros: the scatter
        (dict(filters=6, kernel_size=3, use_bias=False), (2, 6, 5, 10)),
    ],
    ids=["3x3", "3x3-s2-same", "3x3-s2-valid-nobias", "1x1-nobias", "1x1-s2-same", "4x4-nobias", "4x4-s2-same", "2x3-relu",
         "3x3-same-10ch", "3x3-valid-10ch"],
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
    y = np.asarray(tc.backend.to_numpy(layer(layer.xp.asarray(x), training=True)))
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


ACTIVATIONS = ["linear", "relu", "sigmoid", "tanh", "softmax", "elu", "selu", "leaky_relu", "gelu", "silu", "swish"]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_layers(device, name):
    _check(L.Activation(name), _x((3, 7)) * 2, device)


@pytest.mark.parametrize("layer_factory", [lambda: L.ReLU(), lambda: L.Softmax(), lambda: L.LeakyReLU(),
                                           lambda: L.LeakyReLU(negative_slope=0.05), lambda: L.ELU()],
                         ids=["ReLU", "Softmax", "LeakyReLU", "LeakyReLU-0.05", "ELU"])
def test_activation_layer_classes(device, layer_factory):
    _check(layer_factory(), _x((3, 4, 5)) * 2, device)


@pytest.mark.parametrize("name", ["elu", "selu", "gelu", "silu", "leaky_relu"])
def test_activations_inside_conv_and_dense(device, name):
    """A layer keeps the pre-activation for activations whose backward reads x (gelu, silu, leaky_relu)."""
    _check(L.Conv2D(3, 3, activation=name), _x((2, 5, 5, 2)), device)
    _check(L.Dense(4, activation=name), _x((3, 5)), device)


def test_activation_values_match_their_definitions():
    x = np.linspace(-3, 3, 13)
    A = tc.activations
    np.testing.assert_allclose(A.elu(x), np.where(x > 0, x, np.expm1(x)), rtol=1e-15)
    np.testing.assert_allclose(A.selu(x), A.SELU_SCALE * np.where(x > 0, x, A.SELU_ALPHA * np.expm1(x)), rtol=1e-15)
    np.testing.assert_allclose(A.leaky_relu(x), np.where(x > 0, x, 0.2 * x), rtol=1e-15)
    np.testing.assert_allclose(A.silu(x), x / (1 + np.exp(-x)), rtol=1e-14)
    import math
    np.testing.assert_allclose(A.gelu(x), [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x], rtol=1e-14)
    np.testing.assert_allclose(A.gelu(x.astype(np.float32)), A.gelu(x), rtol=1e-6, atol=1e-7)
    assert A.get("swish") is A.silu and A.get(None) is A.linear
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        A.get("relu6")


# -- the layers added with the functional API ----------------------------------------------------------
@pytest.mark.parametrize("kwargs, shape", [
    (dict(pool_size=2), (2, 6, 6, 3)),
    (dict(pool_size=3, strides=2), (2, 7, 7, 2)),
    (dict(pool_size=2, padding="same"), (2, 5, 7, 2)),
    (dict(pool_size=3, strides=1, padding="same"), (1, 5, 4, 2)),
], ids=["2", "3-s2", "2-same-odd", "3-s1-same"])
def test_average_pooling(device, kwargs, shape):
    _check(L.AveragePooling2D(**kwargs), _x(shape), device)


@pytest.mark.parametrize("kwargs, shape", [(dict(pool_size=2, padding="same"), (2, 5, 7, 2)),
                                           (dict(pool_size=3, strides=1, padding="same"), (1, 5, 4, 2))],
                         ids=["2-same-odd", "3-s1-same"])
def test_max_pooling_same(device, kwargs, shape):
    _check(L.MaxPooling2D(**kwargs), _tie_free(shape), device)


def test_global_max_pooling(device):
    _check(L.GlobalMaxPooling2D(), _tie_free((3, 4, 5, 6)), device)


def test_zero_padding(device):
    _check(L.ZeroPadding2D(((1, 2), (0, 3))), _x((2, 3, 4, 2)), device)
    _check(L.ZeroPadding2D(1), _x((2, 3, 4, 2)), device)


def test_rescaling(device):
    _check(L.Rescaling(1 / 255, offset=-0.5), _x((2, 3, 3, 1)), device)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(kernel_size=3), (2, 6, 6, 3)),
    (dict(kernel_size=3, padding="same", depth_multiplier=2, activation="relu"), (2, 5, 6, 2)),
    (dict(kernel_size=(2, 3), strides=2, padding="same", use_bias=False), (2, 7, 6, 3)),
], ids=["3x3", "3x3-same-m2-relu", "2x3-s2-same-nobias"])
def test_depthwise_conv2d(device, kwargs, shape):
    _check(L.DepthwiseConv2D(**kwargs), _x(shape), device)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(filters=4, kernel_size=3), (2, 6, 6, 3)),
    (dict(filters=5, kernel_size=3, strides=2, padding="same", depth_multiplier=2, activation="relu"), (2, 7, 6, 2)),
], ids=["3x3", "3x3-s2-same-m2-relu"])
def test_separable_conv2d(device, kwargs, shape):
    _check(L.SeparableConv2D(**kwargs), _x(shape), device)


def test_add(device):
    _check(L.Add(), [_x((2, 3, 3, 4), 1), _x((2, 3, 3, 4), 2), _x((2, 3, 3, 4), 3)], device)


@pytest.mark.parametrize("axis", [-1, 2])
def test_concatenate(device, axis):
    shapes = [(2, 3, 3, 2), (2, 3, 3, 5)] if axis == -1 else [(2, 3, 2, 4), (2, 3, 4, 4)]
    _check(L.Concatenate(axis=axis), [_x(s, k) for k, s in enumerate(shapes)], device)


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
    dense = sparse.dense_targets(labels, logits)
    result = gradcheck.check_loss(sparse, logits, dense)
    assert result.ok, str(result)
    p = tc.activations.softmax(logits)
    assert sparse(labels, p) == pytest.approx(-np.log(p[np.arange(8), labels]).mean(), rel=1e-6)


@pytest.mark.parametrize("from_logits", [True, False])
def test_binary_crossentropy(from_logits):
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, (6, 3)).astype(np.float64)
    output = rng.standard_normal((6, 3)) * 2
    if not from_logits:
        output = 1 / (1 + np.exp(-output))
    result = gradcheck.check_loss(tc.losses.BinaryCrossentropy(), output, targets, from_logits=from_logits)
    assert result.ok, str(result)


def test_mean_squared_error():
    rng = np.random.default_rng(3)
    result = gradcheck.check_loss(tc.losses.MeanSquaredError(), rng.standard_normal((5, 4)),
                                  rng.standard_normal((5, 4)), from_logits=False)
    assert result.ok, str(result)


def test_categorical_crossentropy_on_rows_that_do_not_sum_to_one():
    """Keras normalizes probability rows before the log; the gradient follows the normalization."""
    rng = np.random.default_rng(4)
    output = rng.uniform(0.05, 1.0, (4, 5))
    targets = np.eye(5)[[0, 2, 4, 1]]
    result = gradcheck.check_loss(tc.losses.CategoricalCrossentropy(), output, targets, from_logits=False)
    assert result.ok, str(result)


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
    x = rng.standard_normal((6,) + model.input_shape[1:])
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

    def wrong(saved, dy, need_input_grad=True):
        dx, grads = right(saved, dy, need_input_grad)
        return dx * 1.01, grads

    layer.backward = wrong
    result = gradcheck.check_layer(layer, x)
    assert not result.ok
    assert result.entries[0]["name"] == "input" and result.entries[0]["error"] > 1e-3
    assert "FAIL" in str(result)


# -- whole graphs: a residual network with a fan-out and a layer used twice --------------------------------
def _residual_model(device, seed=3):
    inputs = tc.Input(shape=(8, 8, 2))
    x = L.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)  # this tensor fans out: into the branch and into the Add
    shared = L.Conv2D(4, 3, padding="same", activation="tanh")  # used twice: one kernel, two uses
    y = shared(x)
    y = shared(y)
    x = L.Add()([x, y])
    x = L.MaxPooling2D(2, padding="same")(x)
    branch_a = L.DepthwiseConv2D(3, padding="same", activation="gelu")(x)
    branch_b = L.AveragePooling2D(3, strides=1, padding="same")(x)
    x = L.Concatenate()([branch_a, branch_b])
    x = L.BatchNormalization()(x)
    x = L.Dropout(0.2)(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(3, activation="softmax")(x)
    model = tc.Model(inputs, outputs, device=device, dtype="float64", seed=seed)
    model.compile(tc.optimizers.Adam(), "categorical_crossentropy", ["accuracy"])
    return model, shared


def test_residual_model_loss_gradient_against_every_parameter(device):
    model, shared = _residual_model(device)
    assert len(shared.inbound_nodes) == 2
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 8, 8, 2))
    y = np.eye(3)[rng.integers(0, 3, 5)]
    result = gradcheck.check_model(model, x, y)
    assert result.ok, str(result)
    assert sum(e["checked"] for e in result.entries) == sum(l.count_trainable_params() for l in model.compute_layers)
    assert any(e["name"] == f"{shared.name}/kernel" for e in result.entries)


def test_a_fan_out_sums_its_gradients():
    """d/dx of sum(x + x) is 2: both uses of the tensor reach it."""
    inputs = tc.Input(shape=(3,))
    dense = L.Dense(2, use_bias=False)
    h = dense(inputs)
    out = L.Activation("softmax")(L.Add()([h, h]))
    model = tc.Model(inputs, out, dtype="float64", seed=0)
    model.compile("sgd", "categorical_crossentropy")
    x = np.random.default_rng(0).standard_normal((4, 3))
    y = np.eye(2)[[0, 1, 1, 0]]
    _, (grad,) = model.loss_and_gradients(x, y)
    logits = 2 * x @ dense.get_weights()[0]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(grad, 2 * x.T @ (p - y) / 4, rtol=1e-12)
