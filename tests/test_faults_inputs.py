"""Careless and hostile input to every public entry point that takes numbers, arrays or settings:
each case names the error it must raise and part of the message, and where a model was involved,
that the model is left exactly as it was. (Files are in test_faults_files.py.)

A case is (id, what to call, the exception type, a regex its message must match). The type is the
narrowest one tinycnn promises (ShapeError, WeightsFileError, ...); a raw exception from deep
inside NumPy or numba would fail the type or the message.
"""
import threading
import warnings

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L

RNG = np.random.default_rng(0)
X = RNG.random((32, 6, 6, 1), dtype=np.float32)
LABELS = RNG.integers(0, 3, 32)


def tiny(compile=True, seed=0, **compile_args):
    model = tc.Sequential([L.Conv2D(2, 3, activation="relu", input_shape=(6, 6, 1)), L.Flatten(),
                           L.Dense(3, activation="softmax")], seed=seed)
    if compile:
        model.compile(**{"optimizer": "adam", "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
                         **compile_args})
    return model


def run_case(call, error, message):
    with pytest.raises(error, match=message):
        call()


# -- building layers and models -----------------------------------------------------------------------------
BUILD = [
    ("conv filters 2.7", lambda: L.Conv2D(2.7, 3), ValueError, r"Conv2D filters must be an integer, got 2\.7"),
    ("conv filters 0", lambda: L.Conv2D(0, 3), ValueError, r"Conv2D filters must be a positive integer, got 0"),
    ("conv filters -1", lambda: L.Conv2D(-1, 3), ValueError, "positive integer"),
    ("conv filters None", lambda: L.Conv2D(None, 3), TypeError, "Conv2D filters must be an integer, got None"),
    ("conv filters '4'", lambda: L.Conv2D("4", 3), TypeError, "Conv2D filters must be an integer"),
    ("conv filters True", lambda: L.Conv2D(True, 3), TypeError, "must be an integer"),
    ("conv kernel 2.5", lambda: L.Conv2D(2, 2.5), ValueError, "Conv2D kernel_size"),
    ("conv kernel (2.5, 2.5)", lambda: L.Conv2D(2, (2.5, 2.5)), ValueError, "Conv2D kernel_size"),
    ("conv kernel 0", lambda: L.Conv2D(2, 0), ValueError, "Conv2D kernel_size"),
    ("conv kernel (3,)", lambda: L.Conv2D(2, (3,)), ValueError, "tuple of 2 integers"),
    ("conv kernel 'x'", lambda: L.Conv2D(2, "x"), TypeError, "Conv2D kernel_size"),
    ("conv strides 0", lambda: L.Conv2D(2, 3, strides=0), ValueError, "Conv2D strides"),
    ("conv strides (1.5, 1)", lambda: L.Conv2D(2, 3, strides=(1.5, 1)), ValueError, "Conv2D strides"),
    ("conv padding 'full'", lambda: L.Conv2D(2, 3, padding="full"), ValueError, "padding must be one of 'valid', 'same'"),
    ("conv dilation", lambda: L.Conv2D(2, 3, dilation_rate=2), ValueError, "dilation_rate=1 only"),
    ("conv channels_first", lambda: L.Conv2D(2, 3, data_format="channels_first"), ValueError, "channels_last"),
    ("conv unknown argument", lambda: L.Conv2D(2, 3, kernel_initalizer="he_normal"), TypeError, "kernel_initalizer"),
    ("unknown activation", lambda: L.Dense(2, activation="relu6"), ValueError, "unknown activation 'relu6'"),
    ("dense units 2.5", lambda: L.Dense(2.5), ValueError, "Dense units must be an integer, got 2.5"),
    ("dense units 0", lambda: L.Dense(0), ValueError, "Dense units must be a positive integer"),
    ("dense units None", lambda: L.Dense(None), TypeError, "Dense units"),
    ("depthwise multiplier 0", lambda: L.DepthwiseConv2D(3, depth_multiplier=0), ValueError, "depth_multiplier"),
    ("separable filters 1.5", lambda: L.SeparableConv2D(1.5, 3), ValueError, "SeparableConv2D filters"),
    ("dropout 1.0", lambda: L.Dropout(1.0), ValueError, r"Dropout rate must be in \[0, 1\), got 1\.0"),
    ("dropout nan", lambda: L.Dropout(float("nan")), ValueError, "Dropout rate"),
    ("dropout -0.1", lambda: L.Dropout(-0.1), ValueError, "Dropout rate"),
    ("dropout 'x'", lambda: L.Dropout("x"), TypeError, "Dropout rate must be a number"),
    ("dropout seed 1.5", lambda: L.Dropout(0.5, seed=1.5), ValueError, "Dropout seed"),
    ("batchnorm epsilon nan", lambda: L.BatchNormalization(epsilon=float("nan")), ValueError, "epsilon"),
    ("batchnorm epsilon 0", lambda: L.BatchNormalization(epsilon=0), ValueError, r"epsilon must be in \(0"),
    ("batchnorm epsilon -1", lambda: L.BatchNormalization(epsilon=-1), ValueError, "epsilon"),
    ("batchnorm momentum 2", lambda: L.BatchNormalization(momentum=2), ValueError, r"momentum must be in \[0, 1\]"),
    ("batchnorm momentum inf", lambda: L.BatchNormalization(momentum=float("inf")), ValueError, "momentum"),
    ("pool size 0", lambda: L.MaxPooling2D(0), ValueError, "MaxPooling2D pool_size"),
    ("pool size 2.5", lambda: L.AveragePooling2D(2.5), ValueError, "AveragePooling2D pool_size"),
    ("pool strides 0", lambda: L.MaxPooling2D(2, strides=0), ValueError, "MaxPooling2D strides"),
    ("pool padding", lambda: L.MaxPooling2D(2, padding="causal"), ValueError, "padding must be one of"),
    ("global pool keepdims", lambda: L.GlobalAveragePooling2D(keepdims=True), ValueError, "keepdims=False"),
    ("leaky slope nan", lambda: L.LeakyReLU(float("nan")), ValueError, "negative_slope"),
    ("leaky slope -1", lambda: L.LeakyReLU(-1.0), ValueError, "negative_slope"),
    ("leaky both names", lambda: L.LeakyReLU(0.1, alpha=0.2), TypeError, "not both"),
    ("elu alpha inf", lambda: L.ELU(float("inf")), ValueError, "ELU alpha"),
    ("rescaling nan", lambda: L.Rescaling(float("nan")), ValueError, "Rescaling scale"),
    ("rescaling offset 'x'", lambda: L.Rescaling(1.0, "x"), TypeError, "Rescaling offset"),
    ("zero padding -1", lambda: L.ZeroPadding2D(-1), ValueError, "ZeroPadding2D padding"),
    ("zero padding 1.5", lambda: L.ZeroPadding2D(1.5), ValueError, "ZeroPadding2D padding"),
    ("zero padding three", lambda: L.ZeroPadding2D((1, 2, 3)), ValueError, "ZeroPadding2D padding"),
    ("concatenate axis 0", lambda: L.Concatenate(axis=0), ValueError, "batch axis"),
    ("concatenate axis 1.5", lambda: L.Concatenate(axis=1.5), ValueError, "Concatenate axis"),
    ("softmax axis 1", lambda: L.Softmax(axis=1), ValueError, "axis=-1 only"),
    ("input shape negative", lambda: tc.Input(shape=(-1,)), tc.ShapeError, "positive ints"),
    ("input shape zero", lambda: tc.Input(shape=(28, 0, 1)), tc.ShapeError, "positive ints"),
    ("input shape float", lambda: tc.Input(shape=(2.5,)), tc.ShapeError, "positive ints"),
    ("input shape 'a'", lambda: tc.Input(shape="a"), tc.ShapeError, "positive ints"),
    ("input_shape on a layer", lambda: tc.Sequential([L.Dense(2, input_shape=(-3,))]), tc.ShapeError, "positive ints"),
    ("conv on vectors", lambda: tc.Sequential([L.Conv2D(2, 3, input_shape=(8,))]), tc.ShapeError,
     r"needs \(height, width, channels\) inputs"),
    ("kernel larger than image", lambda: tc.Sequential([L.Conv2D(2, 9, input_shape=(4, 4, 1))]), tc.ShapeError,
     "does not fit input"),
    ("pool larger than image", lambda: tc.Sequential([L.MaxPooling2D(8, input_shape=(4, 4, 1))]), tc.ShapeError,
     "larger than input"),
    ("dense on images", lambda: tc.Sequential([L.Dense(2, input_shape=(4, 4, 1))]), tc.ShapeError, "add Flatten"),
    ("add of mismatched shapes", lambda: L.Add()([tc.Input(shape=(3,)), tc.Input(shape=(4,))]), tc.ShapeError,
     "inputs of one shape"),
    ("add of one tensor", lambda: L.Add()(tc.Input(shape=(3,))), tc.GraphError, "list of two or more"),
    ("concatenate mismatch", lambda: L.Concatenate()([tc.Input(shape=(4, 4, 1)), tc.Input(shape=(5, 4, 1))]),
     tc.ShapeError, "agree on every axis"),
    ("mix of tensors and arrays", lambda: L.Add()([tc.Input(shape=(3,)), np.ones((1, 3))]), tc.GraphError, "mix"),
    ("model seed 'x'", lambda: tc.Sequential([L.Dense(2, input_shape=(3,))], seed="x"), TypeError,
     "seed must be an integer"),
    ("model seed -1", lambda: tc.Sequential([L.Dense(2, input_shape=(3,))], seed=-1), ValueError, "seed must be"),
    ("model dtype float16", lambda: tc.Sequential([L.Dense(2, input_shape=(3,))], dtype="float16"), TypeError,
     "float32 or float64"),
    ("unknown device", lambda: tc.Sequential([L.Dense(2, input_shape=(3,))], device="tpu"), tc.DeviceError, "tpu"),
    ("empty sequential predict", lambda: tc.Sequential().predict(np.ones((1, 3))), ValueError, "no layers"),
    ("empty sequential summary", lambda: tc.Sequential().summary(), ValueError, "no layers"),
    ("no input shape", lambda: tc.Sequential([L.Dense(2)]).summary(), ValueError, "input_shape"),
    ("output unreachable from input", lambda: tc.Model(tc.Input(shape=(3,)), L.Dense(2)(tc.Input(shape=(3,)))),
     tc.GraphError, "not among the model's inputs"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BUILD], ids=[c[0] for c in BUILD])
def test_building(call, error, message):
    run_case(call, error, message)


def test_an_oversized_layer_names_itself_instead_of_a_raw_memory_error():
    with pytest.raises(MemoryError, match=r"layer huge: weight 'kernel' of shape \(100000, 1000000000\) needs"):
        tc.Sequential([L.Dense(10**9, input_shape=(10**5,), name="huge")])


# -- compile ---------------------------------------------------------------------------------------------------
COMPILE = [
    ("unknown loss", dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    ("unknown optimizer", dict(optimizer="adamax"), ValueError, "unknown optimizer 'adamax'"),
    ("unknown metric", dict(metrics=["f1"]), ValueError, "unknown metric 'f1'"),
    ("metrics as a dict", dict(metrics={"out": ["accuracy"]}), ValueError, "several outputs"),
    ("loss_weights", dict(loss_weights=[0.5]), ValueError, "loss_weights"),
    ("learning rate 'x'", dict(optimizer=lambda: tc.optimizers.Adam("x")), TypeError, "learning_rate"),
    ("learning rate inf", dict(optimizer=lambda: tc.optimizers.Adam(float("inf"))), ValueError, "learning_rate"),
    ("learning rate nan", dict(optimizer=lambda: tc.optimizers.SGD(float("nan"))), ValueError, "learning_rate"),
    ("learning rate -1", dict(optimizer=lambda: tc.optimizers.SGD(-1)), ValueError, "learning_rate"),
    ("sgd momentum 1", dict(optimizer=lambda: tc.optimizers.SGD(0.1, momentum=1.0)), ValueError, "SGD momentum"),
    ("adam beta_1 1.5", dict(optimizer=lambda: tc.optimizers.Adam(beta_1=1.5)), ValueError, "Adam beta_1"),
    ("adam epsilon 0", dict(optimizer=lambda: tc.optimizers.Adam(epsilon=0)), ValueError, "Adam epsilon"),
    ("rmsprop rho -0.1", dict(optimizer=lambda: tc.optimizers.RMSprop(rho=-0.1)), ValueError, "RMSprop rho"),
    ("clipnorm -1", dict(optimizer=lambda: tc.optimizers.SGD(clipnorm=-1)), ValueError, "clipnorm"),
    ("two clippings", dict(optimizer=lambda: tc.optimizers.SGD(clipnorm=1, clipvalue=1)), ValueError, "at most one"),
    ("weight decay nan", dict(optimizer=lambda: tc.optimizers.AdamW(weight_decay=float("nan"))), ValueError,
     "weight_decay"),
    ("a loss without backward", dict(loss=lambda y, p: p), ValueError, "no backward pass"),
]


@pytest.mark.parametrize("args, error, message", [c[1:] for c in COMPILE], ids=[c[0] for c in COMPILE])
def test_compiling(args, error, message):
    model = tiny(compile=False)

    def call():  # an optimizer given as a function is made inside the call: its constructor checks
        resolved = {k: (v() if k == "optimizer" and callable(v) else v) for k, v in args.items()}
        model.compile(**{"optimizer": "adam", "loss": "sparse_categorical_crossentropy", **resolved})

    run_case(call, error, message)


# -- fit, evaluate, predict: a refused call leaves the model as it was -----------------------------------------
FIT = [
    ("y None", dict(y=None), ValueError, "y is None"),
    ("x None", dict(x=None), ValueError, "x is None"),
    ("string labels", dict(y=np.array(["a"] * 32)), tc.ShapeError, "integer class labels"),
    ("labels out of range", dict(y=np.full(32, 7)), ValueError, r"labels outside 0\.\.2"),
    ("negative labels", dict(y=np.full(32, -1)), ValueError, "labels outside"),
    ("fractional labels", dict(y=np.full(32, 1.5)), ValueError, "labels outside"),
    ("NaN labels", dict(y=np.full(32, np.nan)), ValueError, "NaN"),
    ("one-hot labels for the sparse loss", dict(y=np.eye(3)[LABELS]), tc.ShapeError, "integer class labels"),
    ("row count mismatch", dict(y=LABELS[:10]), tc.ShapeError, "10 rows but x has 32"),
    ("NaN in x", dict(x=np.where(X > 0.5, np.nan, X)), ValueError, "NaN or infinite"),
    ("inf in x", dict(x=np.full_like(X, np.inf)), ValueError, "NaN or infinite"),
    ("float64 beyond float32", dict(x=np.full(X.shape, 1e39)), ValueError, "beyond float32's range"),
    ("x without channel axis", dict(x=X[..., 0]), tc.ShapeError, r"add the channel axis with x\[\.\.\., None\]"),
    ("x wrong image size", dict(x=np.ones((32, 5, 6, 1), np.float32)), tc.ShapeError, "expects"),
    ("x of strings", dict(x=np.full((32, 6, 6, 1), "a")), TypeError, "must hold numbers"),
    ("x of objects", dict(x=np.empty((32, 6, 6, 1), dtype=object)), TypeError, "must hold numbers"),
    ("complex x", dict(x=X.astype(np.complex64)), TypeError, "must hold numbers"),
    ("0-d x", dict(x=np.float32(1.0)), tc.ShapeError, r"x has shape \(\) but the model expects"),
    ("empty x", dict(x=X[:0], y=LABELS[:0]), ValueError, "empty"),
    ("ragged list x", dict(x=[[1.0, 2.0], [3.0]], y=[0, 1]), tc.ShapeError, "not a rectangular array"),
    ("two arrays for one input", dict(x=[X, X]), tc.ShapeError, "1 inputs"),
    ("epochs 1.5", dict(epochs=1.5), ValueError, "epochs must be an integer"),
    ("epochs -1", dict(epochs=-1), ValueError, "epochs must be an integer >= 0"),
    ("epochs '2'", dict(epochs="2"), TypeError, "epochs must be an integer"),
    ("epochs None", dict(epochs=None), TypeError, "epochs"),
    ("initial_epoch 0.5", dict(initial_epoch=0.5), ValueError, "initial_epoch"),
    ("batch_size 0", dict(batch_size=0), ValueError, "batch_size must be a positive integer, got 0"),
    ("batch_size 2.7", dict(batch_size=2.7), ValueError, "batch_size must be an integer, got 2.7"),
    ("batch_size 'x'", dict(batch_size="x"), TypeError, "batch_size"),
    ("verbose 'x'", dict(verbose="x"), TypeError, "verbose"),
    ("verbose 5", dict(verbose=5), ValueError, "verbose"),
    ("callbacks object()", dict(callbacks=object()), TypeError, "callbacks must be a list"),
    ("callbacks [object()]", dict(callbacks=[object()]), TypeError, "Callback objects"),
    ("callbacks 'abc'", dict(callbacks="abc"), TypeError, "callbacks must be a list"),
    ("validation_data of 1", dict(validation_data=(X,)), ValueError, "validation_data must be a pair"),
    ("validation_data not a tuple", dict(validation_data=X), ValueError, "validation_data must be a pair"),
    ("validation_split 1.5", dict(validation_split=1.5), ValueError, "validation_split"),
    ("validation_split -0.1", dict(validation_split=-0.1), ValueError, "validation_split"),
    ("validation_split 'x'", dict(validation_split="x"), TypeError, "validation_split"),
    ("validation_split leaves none", dict(validation_split=0.99), ValueError, "leaves no samples"),
    ("sample_weight length", dict(sample_weight=np.ones(5)), tc.ShapeError, r"shape \(32,\)"),
    ("sample_weight negative", dict(sample_weight=-np.ones(32)), ValueError, "finite weights >= 0"),
    ("sample_weight NaN", dict(sample_weight=np.full(32, np.nan)), ValueError, "finite weights"),
    ("sample_weight strings", dict(sample_weight=np.array(["a"] * 32)), TypeError, "array of numbers"),
    ("class_weight a list", dict(class_weight=[1, 2, 3]), TypeError, "class_weight must be a dict"),
    ("class_weight key 'a'", dict(class_weight={"a": 1.0}), TypeError, "class_weight key"),
    ("class_weight key '5'", dict(class_weight={"5": 1.0}), ValueError, "class_weight key"),
    ("class_weight key -1", dict(class_weight={-1: 5.0}), ValueError, "class_weight key"),
    ("class_weight key 3", dict(class_weight={3: 5.0}), ValueError, r"from 0 to 2"),
    ("class_weight value 'x'", dict(class_weight={0: "x"}), TypeError, r"class_weight\[0\]"),
    ("class_weight value -1", dict(class_weight={0: -1.0}), ValueError, r"class_weight\[0\]"),
    ("class_weight value NaN", dict(class_weight={0: float("nan")}), ValueError, r"class_weight\[0\]"),
]


@pytest.mark.parametrize("args, error, message", [c[1:] for c in FIT], ids=[c[0] for c in FIT])
def test_fit_refuses_and_leaves_the_model_untouched(args, error, message):
    model = tiny()
    before = model.get_weights()
    call = {"x": X, "y": LABELS, "epochs": 1, "verbose": 0, **args}
    run_case(lambda: model.fit(**call), error, message)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


OTHER_CALLS = [
    ("fit before compile", lambda: tiny(compile=False).fit(X, LABELS, verbose=0), RuntimeError, "compile"),
    ("evaluate before compile", lambda: tiny(compile=False).evaluate(X, LABELS, verbose=0), RuntimeError, "compile"),
    ("compiled without a loss", lambda: tiny(loss=None).fit(X, LABELS, verbose=0), RuntimeError, "needs a loss"),
    ("evaluate y None", lambda: tiny().evaluate(X, None, verbose=0), ValueError, "y is None"),
    ("evaluate batch_size 0", lambda: tiny().evaluate(X, LABELS, batch_size=0, verbose=0), ValueError, "batch_size"),
    ("evaluate sample_weight", lambda: tiny().evaluate(X, LABELS, sample_weight=np.ones(3), verbose=0),
     tc.ShapeError, "sample_weight"),
    ("evaluate callbacks", lambda: tiny().evaluate(X, LABELS, callbacks=[1], verbose=0), TypeError, "Callback"),
    ("predict batch_size 0", lambda: tiny().predict(X, batch_size=0, verbose=0), ValueError, "batch_size"),
    ("predict batch_size 2.7", lambda: tiny().predict(X, batch_size=2.7, verbose=0), ValueError, "batch_size"),
    ("predict x None", lambda: tiny().predict(None, verbose=0), ValueError, "x is None"),
    ("predict wrong shape", lambda: tiny().predict(np.ones((2, 7, 6, 1)), verbose=0), tc.ShapeError, "expects"),
    ("predict NaN", lambda: tiny().predict(np.full((2, 6, 6, 1), np.nan), verbose=0), ValueError, "NaN"),
    ("predict_on_batch strings", lambda: tiny().predict_on_batch(np.full((2, 6, 6, 1), "x")), TypeError, "numbers"),
    ("train_on_batch rows", lambda: tiny().train_on_batch(X, LABELS[:3]), tc.ShapeError, "3 rows"),
    ("test_on_batch labels", lambda: tiny().test_on_batch(X, np.full(32, 9)), ValueError, "labels outside"),
    ("model(x) wrong shape", lambda: tiny()(np.ones((1, 6, 6, 2), np.float32)), tc.ShapeError, "expects"),
    ("set_weights count", lambda: tiny().set_weights([np.ones(3)]), ValueError, "weight arrays"),
    ("set_weights shape", lambda: tiny().set_weights([np.ones((3, 3, 1, 3))] + tiny().get_weights()[1:]),
     tc.ShapeError, "expected shape"),
    ("set_weights NaN", lambda: tiny().set_weights([np.full_like(w, np.nan) for w in tiny().get_weights()]),
     ValueError, "NaN"),
    ("set_weights beyond float32", lambda: tiny().set_weights([np.full(w.shape, 1e300) for w in tiny().get_weights()]),
     ValueError, "beyond float32's range"),
    ("set_weights strings", lambda: tiny().set_weights([np.full(w.shape, "a") for w in tiny().get_weights()]),
     TypeError, "expected numbers"),
    ("reduce lr on a schedule", lambda: tiny(optimizer=tc.optimizers.SGD(tc.optimizers.schedules.CosineDecay(0.1, 9)))
     .fit(X, LABELS, verbose=0, callbacks=[tc.callbacks.ReduceLROnPlateau()]), TypeError, "follows a schedule"),
    ("save_weights suffix", lambda: tiny().save_weights("w.txt"), ValueError, "writes .weights.h5"),
    ("export unknown opset", lambda: tiny().export_onnx("m.onnx", opset=7), (ValueError, ImportError), "opset|onnx"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in OTHER_CALLS], ids=[c[0] for c in OTHER_CALLS])
def test_other_calls(call, error, message):
    run_case(call, error, message)


def test_set_weights_refused_leaves_every_weight():
    model = tiny()
    before = model.get_weights()
    bad = [w.copy() for w in before]
    bad[-1] = np.full_like(bad[-1], np.inf)  # the last array is bad: nothing before it may change
    with pytest.raises(ValueError):
        model.set_weights([w + 1 for w in bad[:-1]] + bad[-1:])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# -- divergence -----------------------------------------------------------------------------------------------------
def test_exploding_weights_are_reported():
    model = tiny(optimizer=tc.optimizers.Adam(1e6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, LABELS, epochs=2, verbose=0)
    assert any("training is probably diverging" in str(w.message) for w in caught)


def test_a_non_finite_weight_ends_training_with_a_report_even_when_the_loss_is_finite():
    model = tiny()

    class Poison(tc.callbacks.Callback):  # a moving statistic going bad leaves the training loss finite
        def on_train_batch_end(self, batch, logs=None):
            self.model.layers[0].weights["bias"][0] = np.inf

    with pytest.raises(FloatingPointError, match="weight 'bias' of layer conv2d"):
        model.fit(X, LABELS, epochs=2, verbose=0, callbacks=[Poison()])


# -- one call at a time ----------------------------------------------------------------------------------------------
def test_a_second_thread_is_refused_while_a_model_trains_and_nested_calls_work():
    model = tiny()
    refused, nested = [], []

    def from_another_thread():
        try:
            model.predict(X[:2], verbose=0)
        except tc.ModelBusyError as exc:
            refused.append(str(exc))

    class Probe(tc.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            nested.append(self.model.predict(X[:2], verbose=0).shape)  # same thread: allowed
            thread = threading.Thread(target=from_another_thread)
            thread.start()
            thread.join()

    model.fit(X, LABELS, epochs=2, verbose=0, callbacks=[Probe()])
    assert nested == [(2, 3), (2, 3)]
    assert len(refused) == 2 and "is running fit() in another thread, so predict() was refused" in refused[0]
    assert model.predict(X[:2], verbose=0).shape == (2, 3)  # free again afterwards


# -- settings ---------------------------------------------------------------------------------------------------------
SETTINGS = [
    ("kernels bogus", dict(kernels="bogus"), "kernels"),
    ("conv bogus", dict(conv="bogus"), "conv"),
    ("threads two", dict(numba_threads="two"), "numba_threads"),
    ("threads 0", dict(numba_threads=0), "numba_threads"),
    ("device bogus", dict(device="bogus"), "bogus"),
]


@pytest.mark.parametrize("settings, message", [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_settings(settings, message):
    with pytest.raises(tc.ConfigError, match=message):
        with tc.config.using(**settings):
            tc.Sequential([L.Dense(2, input_shape=(3,))]).predict(np.ones((1, 3)), verbose=0)


def test_datasets_refuse_a_cache_dir_that_is_not_a_path():
    from tinycnn.datasets import mnist

    with pytest.raises(TypeError, match="cache_dir must be a path"):
        mnist.load_data(cache_dir=123, verbose=False)
