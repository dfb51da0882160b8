"""A CPU training batch split between threads (tinycnn.batch_split) trains as the whole batch does."""
import numpy as np
import pytest

import tinycnn as tc
from tinycnn import batch_split
from tinycnn import layers as L

numba = pytest.importorskip("numba", reason="the batch split runs the numba kernels")


def small_model(extra=None, optimizer=None):
    layers = [L.Conv2D(8, 3, activation="relu", use_bias=False, input_shape=(10, 10, 2)), L.BatchNormalization(),
              L.Dropout(0.3), *(extra or []), L.Conv2D(12, 3, activation="relu"), L.BatchNormalization(),
              L.Dropout(0.2), L.GlobalAveragePooling2D(), L.Dense(5, activation="softmax")]
    model = tc.Sequential(layers, device="cpu", seed=3)
    model.compile(optimizer or tc.optimizers.Adam(0.01), "categorical_crossentropy", ["accuracy"])
    return model


def batch(n=70):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 10, 10, 2)).astype(np.float32), np.eye(5, dtype=np.float32)[rng.integers(0, 5, n)]


def train(model, steps=3, split=True):
    x, y = batch()
    with tc.config.using(batch_split=split):
        logs = [model.train_on_batch(x, y) for _ in range(steps)]
    return logs, model.get_weights()


@pytest.fixture
def split_calls(monkeypatch):
    """How many batches ran split."""
    calls = []
    run = batch_split.run

    def counting(bounds, work):
        calls.append(bounds)
        return run(bounds, work)

    monkeypatch.setattr(batch_split, "run", counting)
    return calls


def test_shares_depend_on_the_batch_size_and_the_models_work_per_sample():
    assert batch_split.bounds(batch_split.MIN_ROWS - 1) is None
    assert batch_split.bounds(32) == [(0, 16), (16, 32)]
    assert batch_split.bounds(71) == [(0, 36), (36, 71)]
    # under 32 rows only where each share of 8 or more still has 40 M multiply-adds to do
    vgg16, week2 = 9_880_192, 1_821_136  # per sample: the plans' counts below
    assert batch_split.bounds(16, vgg16) == [(0, 8), (8, 16)]
    assert batch_split.bounds(31, vgg16) == [(0, 16), (16, 31)]
    assert batch_split.bounds(15, vgg16) is None and batch_split.bounds(15, 10**12) is None  # shares of 7
    assert batch_split.bounds(31, week2) is None and batch_split.bounds(16, week2) is None


def test_a_plan_counts_its_forward_multiply_adds_per_sample():
    """Each kernel's size times its output's positions: Week2 by hand, conv1 to conv8."""
    from week2_model import build_week2_model

    model = build_week2_model(device="cpu", seed=0)
    by_hand = (26 * 26 * 9 * 16 + 24 * 24 * 9 * 16 * 16 + 24 * 24 * 16 * 10 + 10 * 10 * 9 * 10 * 10
               + 8 * 8 * 9 * 10 * 16 + 6 * 6 * 9 * 16 * 16 + 4 * 4 * 9 * 16 * 16 + 4 * 4 * 16 * 10)
    assert model.plan(strip_activation="softmax").sample_multiply_adds == by_hand == 1_821_136
    dense = tc.Sequential([tc.Input((7,)), tc.layers.Dense(5), tc.layers.BatchNormalization()], device="cpu")
    assert dense.plan().sample_multiply_adds == 35  # BatchNorm's vectors are not kernels


def test_a_small_batch_of_a_model_with_enough_work_per_sample_splits(split_calls):
    """16 samples of two 32 -> 32 convolutions at 20x20 (7.4 M multiply-adds each) run as shares
    of 8, and train as the whole batch does (to round-off); 14 samples run whole."""
    def model():
        m = tc.Sequential([tc.Input((20, 20, 32)), L.Conv2D(32, 3, padding="same"), L.BatchNormalization(),
                           L.Conv2D(32, 3, padding="same"), L.GlobalAveragePooling2D(),
                           L.Dense(5, activation="softmax")], device="cpu", seed=4)
        m.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy")
        return m

    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((16, 20, 20, 32)).astype(np.float32), np.eye(5, dtype=np.float32)[rng.integers(0, 5, 16)]
    losses = []
    for split in (True, False):
        with tc.config.using(batch_split=split):
            losses.append(model().loss_and_gradients(x, y))
    assert split_calls == [[(0, 8), (8, 16)]]
    np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=1e-5)
    for a, b in zip(losses[0][1], losses[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    model().loss_and_gradients(x[:14], y[:14])
    assert len(split_calls) == 1


def test_a_split_batch_has_the_whole_batchs_gradients_and_statistics(split_calls):
    """The same loss, gradients and moving statistics, to float32 round-off, with Dropout at 0.3:
    had the shares drawn masks of their own, the gradients would differ by far more."""
    x, y = batch()
    results = []
    for split in (True, False):
        model = small_model()
        with tc.config.using(batch_split=split):
            loss, grads = model.loss_and_gradients(x, y)
        results.append((loss, grads, model.get_weights()))
    assert split_calls == [[(0, 35), (35, 70)]]
    (loss1, g1, w1), (loss2, g2, w2) = results
    assert abs(loss1 - loss2) < 1e-6 * abs(loss2)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    for a, b in zip(w1, w2):  # the moving statistics, updated once
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_split_batch_trains_as_the_whole_batch(split_calls):
    """Three SGD steps (Adam would magnify the round-off of gradients near zero): the same logs
    and weights to float32 round-off."""
    split_logs, split_weights = train(small_model(optimizer=tc.optimizers.SGD(0.05)), split=True)
    assert len(split_calls) == 3
    whole_logs, whole_weights = train(small_model(optimizer=tc.optimizers.SGD(0.05)), split=False)
    assert len(split_calls) == 3
    np.testing.assert_allclose(split_logs, whole_logs, rtol=1e-5)
    for a, b in zip(split_weights, whole_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def on_one_and_two_threads(model, split):
    """train() of model() on one numba thread, then on two: the two runs' (logs, weights)."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    results = []
    saved = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(train(model(), split=split))
    finally:
        numba.set_num_threads(saved)
    return results


def assert_same_bits(results):
    (logs1, w1), (logs2, w2) = results
    assert logs1 == logs2
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_split_results_do_not_depend_on_the_thread_count():
    assert_same_bits(on_one_and_two_threads(small_model, split=True))


def test_serial_twins_train_to_the_parallel_kernels_bits():
    """Unsplit, on one numba thread the CPU kernels run their serial twins (the same source
    compiled without parallel loops: tinycnn.kernels.serial_twin), on two their parallel versions;
    training gives the same bits either way."""
    from tinycnn.kernels import cpu_conv

    assert_same_bits(on_one_and_two_threads(lambda: small_model([L.MaxPooling2D(2)]), split=False))
    assert all(d.signatures for d in cpu_conv.filter_grad_dispatchers())  # both versions ran


class FailingShare(L.Layer):
    """Identity, but raises in the share that starts at `bad_first`."""

    thread_safe = True

    def __init__(self, bad_first, **kwargs):
        super().__init__(**kwargs)
        self.bad_first = bad_first

    def forward(self, x, training):
        if training and batch_split.first_sample() == self.bad_first:
            raise ValueError(f"share at {self.bad_first} failed")
        return x, None

    def backward(self, saved, dy, need_input_grad=True):
        return dy, {}


@pytest.mark.parametrize("bad_first", [0, 35])
def test_a_failing_share_raises_its_own_error_and_releases_the_other(bad_first):
    """The other share waits for the failed one's BatchNormalization sums; it is released, and the
    caller gets the failure itself, not the other share's broken barrier."""
    model = small_model([FailingShare(bad_first)])
    x, y = batch()
    with pytest.raises(ValueError, match=f"share at {bad_first} failed"):
        model.train_on_batch(x, y)
    logs, _ = train(small_model())  # the worker thread is free for the next model
    assert np.isfinite(logs[-1]).all()


def test_a_custom_layer_that_is_not_thread_safe_trains_whole(split_calls):
    class Custom(L.Layer):
        def forward(self, x, training):
            return x, None

        def backward(self, saved, dy, need_input_grad=True):
            return dy, {}

    train(small_model([Custom()]), steps=1)
    assert split_calls == []
    train(small_model(), steps=1)
    assert len(split_calls) == 1


def test_inference_splits_and_gives_every_sample_the_same_bits(split_calls):
    """predict and evaluate run each CPU sub-batch as shares in threads: a sample's output does not
    depend on the rest of its batch, so the split outputs equal the whole batch's exactly. The
    sub-batch holds CPU_INFERENCE_BATCH rows for each share (here: 300 rows -> 256 + 44)."""
    model = small_model()
    train(model, steps=2)
    split_calls.clear()
    x, y = batch(300)
    with tc.config.using(batch_split=False):
        whole = model.predict(x, batch_size=1000, verbose=0), model.evaluate(x, y, verbose=0)
    assert split_calls == []
    split = model.predict(x, batch_size=1000, verbose=0), model.evaluate(x, y, batch_size=1000, verbose=0)
    rows = model.CPU_INFERENCE_BATCH * batch_split.SHARES
    assert [b[-1][1] for b in split_calls] == [rows, 300 - rows] * 2
    np.testing.assert_array_equal(split[0], whole[0])
    assert split[1] == whole[1]


class ThreadCounter(L.Layer):
    """Identity that records how many numba threads its forward pass may use."""

    thread_safe = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def forward(self, x, training):
        self.seen.append((x.shape[0], numba.get_num_threads()))
        return x, None

    def backward(self, saved, dy, need_input_grad=True):
        return dy, {}


def test_a_small_batch_runs_on_one_thread_and_the_threads_come_back():
    if numba.get_num_threads() < 2:
        pytest.skip("numba has one thread here")
    counter = ThreadCounter()
    model = small_model([counter])
    threads = numba.get_num_threads()
    x, y = batch(batch_split.SERIAL_ROWS)
    small = batch_split.SERIAL_ROWS - 1
    model.train_on_batch(x[:small], y[:small])
    model.predict(x[:1], verbose=0)
    model.predict_on_batch(x[:small])
    model(x[:2])
    model.train_on_batch(x, y)
    assert counter.seen == [(small, 1), (1, 1), (small, 1), (2, 1), (batch_split.SERIAL_ROWS, threads)]
    assert numba.get_num_threads() == threads
