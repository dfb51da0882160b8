"""Networks as graphs: tinycnn.Input, layer calls, tinycnn.Model, shared layers, and Sequential as a chain."""
import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L


def _data(n=48, shape=(8, 8, 1), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.random((n,) + shape, dtype=np.float32) * 0.3
    for i, c in enumerate(labels):  # a bright square (or feature) whose place gives the class
        if len(shape) == 3:
            x[i, 1 + 2 * c : 4 + 2 * c, 2:5, 0] += 1.0
        else:
            x[i, c] += 1.0
    return x, np.eye(classes, dtype=np.float32)[labels], labels


def tiny_resnet(seed=0, name="tiny_resnet"):
    """The issue's example, at 8x8."""
    inputs = tc.Input(shape=(8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = L.Conv2D(8, 3, padding="same")(y)
    x = L.ReLU()(L.Add()([x, y]))  # a residual block
    x = L.Dropout(0.1)(x)
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(3, activation="softmax")(x)
    model = tc.Model(inputs, outputs, name=name, seed=seed)
    model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
    return model


def test_the_functional_api_trains_a_residual_network():
    x, y, labels = _data()
    model = tiny_resnet()
    assert model.input_shape == (None, 8, 8, 1) and model.output_shape == (None, 3)
    history = model.fit(x, y, batch_size=16, epochs=30, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0] / 4
    assert (model.predict(x).argmax(axis=1) == labels).mean() > 0.9
    np.testing.assert_array_equal(tc.backend.to_numpy(model(x)), model.predict(x))


def test_the_same_functional_network_built_twice_gives_identical_results():
    x, y, _ = _data()
    runs = []
    for _ in range(2):
        model = tiny_resnet(seed=7)
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
        runs.append((model.get_weights(), model.predict(x), history.history["loss"]))
    (wa, pa, la), (wb, pb, lb) = runs
    assert all(np.array_equal(a, b) for a, b in zip(wa, wb))
    assert np.array_equal(pa, pb) and la == lb


def _stack():
    return [L.Conv2D(6, 3, activation="relu"), L.BatchNormalization(), L.Dropout(0.2), L.MaxPooling2D(2),
            L.Conv2D(5, 1, use_bias=False), L.BatchNormalization(), L.Flatten(), L.Dense(3), L.Activation("softmax")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sequential_and_the_equivalent_functional_model_train_bit_identically(device, dtype):
    x, y, _ = _data()
    seq = tc.Sequential([L.InputLayer(input_shape=(8, 8, 1))] + _stack(), device=device, dtype=dtype, seed=5)
    inputs = tc.Input(shape=(8, 8, 1))
    h = inputs
    for layer in _stack():
        h = layer(h)
    fun = tc.Model(inputs, h, device=device, dtype=dtype, seed=5)
    results = []
    for model in (seq, fun):
        model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x[:10], y[:10]))
        results.append((model.get_weights(), {k: v for k, v in history.history.items() if k != "seconds"},
                        model.predict(x), model.evaluate(x, y, verbose=0)))
    (w1, h1, p1, e1), (w2, h2, p2, e2) = results
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(w1, w2))
    assert h1 == h2 and e1 == e2 and np.array_equal(p1, p2)
    # and their weight files are interchangeable
    assert [l.name for l in fun.compute_layers] != [l.name for l in seq.layers]  # different layer objects...


def test_weights_files_move_between_sequential_and_functional(tmp_path):
    seq = tc.Sequential([L.InputLayer(input_shape=(8, 8, 1))] + _stack(), seed=1)
    inputs = tc.Input(shape=(8, 8, 1))
    h = inputs
    for layer in _stack():
        h = layer(h)
    fun = tc.Model(inputs, h, seed=2)
    seq.save_weights(tmp_path / "w.npz")
    fun.load_weights(tmp_path / "w.npz")
    assert all(np.array_equal(a, b) for a, b in zip(seq.get_weights(), fun.get_weights()))


def test_layer_output_and_input_are_its_graph_tensors():
    inputs = tc.Input(shape=(4,), name="features")
    dense = L.Dense(3)
    out = dense(inputs)
    assert dense.output is out and dense.input is inputs and out.shape == (None, 3)
    assert repr(out).startswith("<SymbolicTensor shape=(None, 3) from dense_")
    dense(inputs)
    with pytest.raises(AttributeError, match="has 2 inbound nodes"):
        dense.output
    with pytest.raises(AttributeError, match="never"):
        L.Dense(2).output


def test_graph_errors_are_named():
    a = tc.Input(shape=(4,))
    b = tc.Input(shape=(4,))
    with pytest.raises(tc.GraphError, match="does not depend on|not among the model's inputs"):
        tc.Model(a, L.Dense(2)(b))
    with pytest.raises(tc.GraphError, match="do not depend on input"):
        tc.Model([a, b], L.Dense(2)(a))
    with pytest.raises(tc.GraphError, match="symbolic tensors"):
        tc.Model(np.zeros((1, 4)), L.Dense(2)(a))
    with pytest.raises(tc.GraphError, match="a mix of symbolic tensors and arrays"):
        L.Add()([a, np.zeros((1, 4))])
    with pytest.raises(tc.GraphError, match="merges a list of two or more inputs"):
        L.Add()(a)
    with pytest.raises(tc.GraphError, match="takes one input"):
        L.Dense(2)([a, b])
    with pytest.raises(tc.ShapeError, match="inputs of one shape"):
        L.Add()([a, L.Dense(3)(b)])
    with pytest.raises(tc.ShapeError, match="needs flat"):
        L.Dense(3)(tc.Input(shape=(4, 4, 1)))
    conv = L.Conv2D(2, 3)
    conv(tc.Input(shape=(8, 8, 1)))
    with pytest.raises(tc.ShapeError, match=r"configured for inputs of shape \(8, 8, 1\)"):
        conv(tc.Input(shape=(9, 9, 1)))
    with pytest.raises(tc.GraphError, match="use the functional API"):
        tc.Sequential([L.Add()])
    with pytest.raises(tc.GraphError, match="model as a layer"):
        tc.Model(a, L.Dense(2)(a))(tc.Input(shape=(4,)))


def test_a_layer_shared_by_two_models_keeps_one_set_of_weights():
    x, y, _ = _data(n=32, shape=(6,))
    shared = L.Dense(5, activation="tanh")
    in_a, in_b = tc.Input(shape=(6,)), tc.Input(shape=(6,))
    model_a = tc.Model(in_a, L.Dense(3, activation="softmax")(shared(in_a)), seed=1)
    model_a.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy")
    first = shared.get_weights()
    model_b = tc.Model(in_b, L.Dense(3, activation="softmax")(shared(in_b)), seed=2)
    model_b.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy")
    assert all(np.array_equal(p, q) for p, q in zip(first, shared.get_weights()))  # B did not re-initialize it
    model_b.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after_b = shared.get_weights()
    assert not np.array_equal(after_b[0], first[0])
    # A computes with the weights B trained...
    hidden = np.tanh(x @ after_b[0] + after_b[1])
    logits = hidden @ model_a.compute_layers[1].get_weights()[0] + model_a.compute_layers[1].get_weights()[1]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(model_a.predict(x), expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)
    # ...and trains on from them (one Adam step moves each weight by at most about lr), not from its stale copy
    model_a.train_on_batch(x[:8], y[:8])
    assert np.abs(shared.get_weights()[0] - after_b[0]).max() <= 0.0101
    with pytest.raises(tc.GraphError, match="built for float32 on cpu; it cannot also compute in float64"):
        tc.Model(in_a, shared(in_a), dtype="float64").build()


def test_sequential_accepts_an_input_and_keras_build_shapes():
    a = tc.Sequential([tc.Input(shape=(5,)), L.Dense(2)], seed=0)
    assert a.input_shape == (None, 5) and a.count_params() == 12
    b = tc.Sequential([L.Dense(2)], seed=0)
    b.build((None, 5))
    assert b.output_shape == (None, 2)
    c = tc.Sequential([L.Dense(2)], seed=0)
    c.compile("adam", "categorical_crossentropy")  # nothing known yet: the first data fixes the shape
    with pytest.raises(ValueError, match="input_shape"):
        c.summary()
    c = tc.Sequential([L.Dense(2)], seed=0)
    assert c.predict(np.ones((3, 7), np.float32)).shape == (3, 2) and c.input_shape == (None, 7)
    with pytest.raises(tc.ShapeError, match=r"declared with input shape \(5,\), build got \(6,\)"):
        tc.Sequential([L.Dense(2, input_shape=(5,))]).build((None, 6))


def test_sequential_add_after_summary_rebuilds_and_keeps_weights(capsys):
    model = tc.Sequential([L.Dense(4, input_shape=(3,), activation="relu")], seed=0)
    model.summary()
    before = model.get_weights()
    model.add(L.Dense(2, activation="softmax"))
    lines = []
    model.summary(print_fn=lines.append)
    assert model.output_shape == (None, 2) and any("(None, 2)" in line for line in lines)
    assert all(np.array_equal(p, q) for p, q in zip(before, model.get_weights()[:2]))
    assert len(model.layers[0].inbound_nodes) == 1  # the first chain was forgotten
    model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy")
    x = np.random.default_rng(0).random((8, 3), dtype=np.float32)
    model.fit(x, np.eye(2, dtype=np.float32)[[0, 1] * 4], epochs=2, verbose=0)
    with pytest.warns(UserWarning, match="activation_.* ends in no activation: pass from_logits=True"):
        model.add(L.Activation("linear"))  # after compile and fit too: the optimizer restarts on the new buffer
    model.fit(x, np.eye(2, dtype=np.float32)[[0, 1] * 4], epochs=1, verbose=0)


def test_a_model_with_two_inputs():
    rng = np.random.default_rng(3)
    image, extra = tc.Input(shape=(6, 6, 1)), tc.Input(shape=(2,))
    h = L.Flatten()(L.Conv2D(2, 3, activation="relu")(image))
    h = L.Concatenate()([h, L.Dense(4, activation="relu")(extra)])
    out = L.Dense(2, activation="softmax")(h)
    model = tc.Model([image, extra], out, seed=0)
    assert model.input_shape == [(None, 6, 6, 1), (None, 2)]
    model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
    xs = [rng.random((16, 6, 6, 1), dtype=np.float32), rng.random((16, 2), dtype=np.float32)]
    y = np.eye(2, dtype=np.float32)[(xs[1][:, 0] > 0.5).astype(int)]
    model.fit(xs, y, batch_size=8, epochs=3, verbose=0)
    assert model.predict(xs).shape == (16, 2)
    with pytest.raises(tc.ShapeError, match="the model has 2 inputs; x gives 1 arrays"):
        model.predict([xs[0]])


KERAS2_GRAPH_SUMMARY = """\
Model: "branches"
__________________________________________________________________________________________________
Layer (type)                    Output Shape         Param #     Connected to                     
==================================================================================================
image (InputLayer)              (None, 8, 8, 1)      0                                            
__________________________________________________________________________________________________
stem (Conv2D)                   (None, 8, 8, 4)      40          image[0][0]                      
__________________________________________________________________________________________________
left (Conv2D)                   (None, 8, 8, 4)      148         stem[0][0]                       
__________________________________________________________________________________________________
sum (Add)                       (None, 8, 8, 4)      0           stem[0][0]                       
                                                                 left[0][0]                       
__________________________________________________________________________________________________
pool (GlobalAveragePooling2D)   (None, 4)            0           sum[0][0]                        
__________________________________________________________________________________________________
head (Dense)                    (None, 2)            10          pool[0][0]                       
==================================================================================================
Total params: 198
Trainable params: 198
Non-trainable params: 0
__________________________________________________________________________________________________"""


def test_graph_summary_is_keras_2s_table_with_connections():
    inputs = tc.Input(shape=(8, 8, 1), name="image")
    stem = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    left = L.Conv2D(4, 3, padding="same", name="left")(stem)
    x = L.GlobalAveragePooling2D(name="pool")(L.Add(name="sum")([stem, left]))
    model = tc.Model(inputs, L.Dense(2, name="head")(x), name="branches")
    lines = []
    model.summary(print_fn=lines.append)
    assert "\n".join(lines) == KERAS2_GRAPH_SUMMARY


def test_a_chain_built_functionally_prints_like_a_sequential_with_its_input_layer():
    inputs = tc.Input(shape=(3,), name="x")
    model = tc.Model(inputs, L.Dense(2, name="out")(inputs), name="chain")
    lines = []
    model.summary(print_fn=lines.append)
    assert lines[2].startswith("Layer (type)") and "Connected to" not in lines[2] and len(lines[1]) == 65
    assert lines[4].startswith("x (InputLayer)") and "(None, 3)" in lines[4]


def test_get_layer_and_weight_lists():
    model = tiny_resnet()
    conv = model.get_layer(model.compute_layers[0].name)
    assert model.get_layer(index=1) is conv
    assert len(model.trainable_weights) == 9 and len(model.non_trainable_weights) == 2
    assert model.trainable_weights[0] is conv.weights["kernel"]  # the view the optimizer updates
    with pytest.raises(ValueError, match="has no layer named 'nope'"):
        model.get_layer("nope")


def test_layers_come_in_keras_order():
    """By depth from the outputs, then in the order a walk from the outputs meets them (Keras 3's
    order, which weight files follow), not in the order the layers were called."""
    inputs = tc.Input(shape=(6, 6, 2))
    conv_a = L.Conv2D(2, 3, padding="same", name="conv_a")
    conv_b = L.Conv2D(2, 3, padding="same", name="conv_b")
    proj = L.Conv2D(2, 1, name="proj")
    x = L.Add(name="add")([proj(inputs), conv_b(conv_a(inputs))])
    model = tc.Model(inputs, x)
    assert [l.name for l in model.compute_layers] == ["conv_a", "proj", "conv_b", "add"]


def test_layer_names_must_be_unique():
    inputs = tc.Input(shape=(3,))
    with pytest.raises(tc.GraphError, match="the layer name 'd' is used 2 times"):
        tc.Model(inputs, L.Dense(2, name="d")(L.Dense(4, name="d")(inputs)))


def test_a_calls_mode_counts_only_when_the_run_gives_none():
    """Keras 3: fit/evaluate/predict set every layer's mode; Dropout(rate)(x, training=True) stays
    on only when the model is called without one, model(x). (Checked against Keras 3.15.)"""
    inputs = tc.Input(shape=(1000,))
    x = np.ones((4, 1000), np.float32)
    fixed_on = tc.Model(inputs, L.Dropout(0.5)(inputs, training=True), seed=0)
    assert (fixed_on.predict(x) == 0).mean() == 0
    assert 0.4 < (tc.backend.to_numpy(fixed_on(x)) == 0).mean() < 0.6
    assert (tc.backend.to_numpy(fixed_on(x, training=False)) == 0).mean() == 0
    fixed_off = tc.Model(inputs, L.Dropout(0.5)(inputs, training=False), seed=0)
    assert 0.4 < (tc.backend.to_numpy(fixed_off(x, training=True)) == 0).mean() < 0.6
    assert (tc.backend.to_numpy(fixed_off(x)) == 0).mean() == 0


def test_sequential_refuses_a_layer_that_does_not_fit_and_stays_usable():
    model = tc.Sequential([L.Dense(5, input_shape=(4,))], seed=0)
    with pytest.raises(tc.ShapeError, match=r"Conv2D .* needs \(height, width, channels\) inputs, got shape \(5,\)"):
        model.add(L.Conv2D(2, 3))
    assert len(model.layers) == 1 and model.predict(np.ones((2, 4), np.float32)).shape == (2, 5)


def test_one_optimizer_serves_one_model():
    opt = tc.optimizers.Adam(0.01)
    a = tc.Sequential([L.Dense(3, input_shape=(4,), activation="softmax")], seed=0)
    a.compile(opt, "categorical_crossentropy")
    b = tc.Sequential([L.Dense(3, input_shape=(4,), activation="softmax")], seed=1)
    with pytest.raises(ValueError, match="already holds the state of model 'sequential_.*'; give model"):
        b.compile(opt, "categorical_crossentropy")


def test_rebuilt_optimizer_state_starts_at_step_zero():
    model = tc.Sequential([L.Dense(4, input_shape=(3,))], seed=0)
    model.compile(tc.optimizers.Adam(0.01), tc.losses.CategoricalCrossentropy(from_logits=True))
    x, y = np.ones((8, 3), np.float32), np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 2]
    model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    model.add(L.Activation("softmax"))
    model.train_on_batch(x, y)
    assert model.optimizer.iterations == 1  # fresh moments need a fresh bias correction


def test_an_output_that_is_not_batch_by_classes_is_named():
    model = tc.Sequential([L.Conv2D(3, 3, input_shape=(6, 6, 1), activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(tc.ShapeError, match=r"output of shape \(batch, classes\); this model's is \(None, 4, 4, 3\)"):
        model.fit(np.zeros((4, 6, 6, 1), np.float32), np.zeros(4, int), verbose=0)


def test_predict_returns_a_list_for_a_list_of_outputs():
    inputs = tc.Input(shape=(3,))
    model = tc.Model(inputs, [L.Dense(2)(inputs)])
    assert isinstance(model.predict(np.ones((2, 3), np.float32)), list)
    assert isinstance(model(np.ones((2, 3), np.float32)), list)
