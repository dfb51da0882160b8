"""ONNX export, checked number for number by ONNX Runtime on real MNIST images: the Week2 model with
trained weights, a functional residual network, and a model using every exportable layer."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L
from conftest import DATA, ROOT

ort = pytest.importorskip("onnxruntime", reason='ONNX export tests need onnx and onnxruntime: pip install "tinycnn[onnx]"')
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def mnist_images():
    from tinycnn.datasets import mnist

    (x_train, y_train), (x_test, _) = mnist.load_data(verbose=False)
    prepare = lambda x: (x.astype(np.float32) / 255)[..., None]  # noqa: E731
    return prepare(x_train[:1024]), y_train[:1024], prepare(x_test[:1000])


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check(model, path, x, **options):
    """Export, run in ONNX Runtime, compare with predict: < 1e-5 and the same classes."""
    model.export_onnx(path, **options)
    expected = model.predict(x, verbose=0)
    got = run_onnx(path, x if not options.get("channels_first") else np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    assert got.shape == expected.shape
    worst = float(np.abs(got - expected).max())
    assert worst < 1e-5, worst
    assert np.array_equal(got.argmax(axis=-1), expected.argmax(axis=-1))
    return worst


def test_week2_with_trained_weights(tmp_path, mnist_images):
    import week2_model

    model = week2_model.build_week2_model(seed=0)
    model.load_weights(os.path.join(DATA, "keras_parity", "week2.weights.h5"))  # weights Keras trained
    check(model, tmp_path / "week2.onnx", mnist_images[2])
    check(model, tmp_path / "week2_unfolded.onnx", mnist_images[2], fold_batchnorm=False)


def residual_network(seed=0):
    inputs = tc.Input(shape=(28, 28, 1))
    x = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)  # folded into the convolution
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = L.Conv2D(8, 3, padding="same")(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(10, activation="softmax")(x)
    return tc.Model(inputs, outputs, seed=seed)


def trained(model, mnist_images, learning_rate, epochs):
    """The model after `epochs` on the MNIST images (moving statistics away from their start)."""
    x_train, y_train, _ = mnist_images
    model.compile(tc.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    return model


def test_functional_residual_network_trained_on_mnist(tmp_path, mnist_images):
    check(trained(residual_network(), mnist_images, 0.01, 2), tmp_path / "residual.onnx", mnist_images[2])


def every_layer(seed=1):
    inputs = tc.Input(shape=(28, 28, 1))
    x = L.Rescaling(2.0, offset=-1.0)(inputs)
    x = L.ZeroPadding2D(((1, 2), (0, 1)))(x)
    x = L.Conv2D(6, 3, activation="tanh")(x)
    x = L.BatchNormalization()(x)  # after an activation: kept as an ONNX BatchNormalization
    a = L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, activation="elu")(x)
    b = L.SeparableConv2D(12, 3, strides=2, padding="same", activation="selu")(x)
    x = L.Add()([a, b])
    x = L.LeakyReLU(negative_slope=0.1)(x)
    c = L.MaxPooling2D(3, strides=2, padding="same")(x)
    d = L.AveragePooling2D(2, padding="same")(x)
    x = L.Concatenate()([c, d])  # channels
    x = L.Activation("gelu")(x)
    e = L.Conv2D(4, 1, activation="silu")(x)
    f = L.Activation("sigmoid")(L.Conv2D(4, 1)(x))
    x = L.Concatenate(axis=2)([e, f])  # width
    x = L.Softmax()(x)  # over the channels of an image
    g = L.GlobalMaxPooling2D()(x)
    h = L.Dense(6, activation="relu")(L.Flatten()(x))
    x = L.Concatenate()([g, h])
    x = L.BatchNormalization()(x)  # on vectors
    x = L.Dropout(0.3)(x)
    x = L.Dense(8, activation="linear")(x)
    x = L.ELU(alpha=0.5)(x)
    outputs = L.Dense(10, activation="softmax")(x)
    return tc.Model(inputs, outputs, seed=seed)


def test_a_model_with_every_exportable_layer(tmp_path, mnist_images):
    model, x_test = trained(every_layer(), mnist_images, 0.005, 1), mnist_images[2]
    check(model, tmp_path / "every.onnx", x_test)
    check(model, tmp_path / "every_nchw.onnx", x_test, channels_first=True)


def test_the_batch_size_is_dynamic_and_image_outputs_come_back_nhwc(tmp_path, mnist_images):
    inputs = tc.Input(shape=(28, 28, 1))
    model = tc.Model(inputs, L.Conv2D(3, 3, padding="same", activation="relu")(inputs), seed=0)
    model.export_onnx(tmp_path / "conv.onnx")
    for n in (1, 37):
        x = mnist_images[2][:n]
        got = run_onnx(tmp_path / "conv.onnx", x)
        assert got.shape == (n, 28, 28, 3) and np.abs(got - model.predict(x, verbose=0)).max() < 1e-5


def test_what_cannot_be_exported_is_named(tmp_path):
    class Custom(L.Layer):
        def forward(self, x, training):
            return x, None

    inputs = tc.Input(shape=(4,))
    with pytest.raises(ValueError, match=r"layer custom_layer \(Custom\) has no ONNX export"):
        tc.Model(inputs, Custom(name="custom_layer")(inputs)).export_onnx(tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=r"reads a tensor of shape \(None, 4, 5\): ONNX export handles vectors"):
        sequence = tc.Input(shape=(4, 5))
        tc.Model(sequence, L.BatchNormalization()(sequence)).export_onnx(tmp_path / "z.onnx")
    for opset in (12, 99, "17"):
        with pytest.raises(ValueError, match="opset must be an integer from 13"):
            tc.Model(inputs, L.Dense(2)(inputs)).export_onnx(tmp_path / "w.onnx", opset=opset)
    assert not os.listdir(tmp_path)  # nothing half-written


def test_the_oldest_opset_and_a_dropout_a_call_fixed_on(tmp_path, mnist_images):
    """Keras 3 semantics: predict (and so the inference graph) sets every layer's mode."""
    inputs = tc.Input(shape=(28, 28, 1))
    x = L.Conv2D(4, 3, activation="gelu")(inputs)
    x = L.Dropout(0.5)(L.Flatten()(x), training=True)
    model = tc.Model(inputs, L.Dense(10, activation="softmax")(L.BatchNormalization()(x)), seed=0)
    check(model, tmp_path / "opset13.onnx", mnist_images[2][:50], opset=13)


def test_the_command_exports_a_saved_model(tmp_path):
    model_file = os.path.join(DATA, "keras_models", "keras_functional.keras")
    out = tmp_path / "from_keras.onnx"
    result = subprocess.run([sys.executable, "-m", "tinycnn.onnx", model_file, str(out)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and out.exists()
    reference = np.load(os.path.join(DATA, "keras_models", "reference.npz"))
    assert np.abs(run_onnx(out, reference["images"]) - reference["keras_functional"]).max() < 1e-5
    bad = subprocess.run([sys.executable, "-m", "tinycnn.onnx", str(tmp_path / "missing.keras"), str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
