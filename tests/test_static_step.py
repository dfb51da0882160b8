"""The static training step (tinycnn.static_step; issue 13, part 4) on every backend CI has: fit
with TINYCNN_STEP=static gives the eager step's results bit for bit (weights, BatchNorm statistics,
history, the optimizer's and the Dropout layers' counters), with the reference and CPU kernel
sets and with the GPU kernel set on the stand-in CuPy; and the kernels it launches take the same
scalar arguments at every step after its first, which is what a CUDA graph captured once needs.
What only a GPU can show (capture, replay, a graph's speed) runs in tests marked gpu."""

import numpy as np
import pytest

import cuda_shim
import tinycnn as tc
from tinycnn import config
from tinycnn.backend import Backend, gpu_problem


def week2(device, seed=3):
    from week2_model import build_week2_model

    model = build_week2_model(device=device, seed=seed)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["accuracy"])
    return model


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28, 1), dtype=np.float32), np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]


def train(device, step, epochs=2, n=200, batch_size=64, callbacks=None, validation=True):
    """A model trained by fit with the `step` setting; n = 200 leaves a last batch of 8."""
    model = week2(device)
    x, y = data(n)
    with config.using(step=step):
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
                            validation_data=data(40, 1) if validation else None, callbacks=callbacks or [])
    return model, {k: v for k, v in history.history.items() if k != "seconds"}


def assert_same_training(a, b):
    (model_a, history_a), (model_b, history_b) = a, b
    assert history_a == history_b
    for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):  # BatchNorm's moving statistics too
        np.testing.assert_array_equal(wa, wb)
    assert model_a.optimizer.iterations == model_b.optimizer.iterations
    for la, lb in zip(model_a.compute_layers, model_b.compute_layers):
        assert la.random_state() == lb.random_state()


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_static_steps_train_as_eager_steps_bit_for_bit(kernels):
    with config.using(kernels=kernels):
        assert_same_training(train("cpu", "eager"), train("cpu", "static"))


def test_static_training_continues_as_eager_training():
    """A second fit on the same model (the optimizer's counters and Adam's powers carried on)."""
    runs = []
    for step in ("eager", "static"):
        model, _ = train("cpu", step, epochs=1)
        x, y = data(130, 2)
        with config.using(step=step):
            history = model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        runs.append((model, {k: v for k, v in history.history.items() if k != "seconds"}))
    assert_same_training(*runs)


@pytest.fixture(scope="module")
def shim_gpu():
    """A "gpu" Backend on the stand-in CuPy of tests/cuda_shim.py (see test_gpu_backend_on_cpu.py)."""
    if cuda_shim.CXX is None:
        pytest.skip("needs a C++ compiler (g++) to run CUDA kernels")
    with cuda_shim.gpu_backend() as backend:
        yield backend


def test_static_steps_on_the_gpu_kernel_set_train_as_its_eager_steps(shim_gpu):
    assert_same_training(train(shim_gpu, "eager"), train(shim_gpu, "static"))


def test_every_step_after_the_first_launches_the_same_kernels_with_the_same_scalars(shim_gpu, monkeypatch):
    """What a captured graph replays: the CUDA kernels of a static step, every scalar argument they
    take, and every host value written into device memory (a dropout key, a learning rate or a
    batch offset from the host would differ from step to step here). The eager step fails the same
    check (its keys and step sizes come from the host), so the check sees them."""
    def launches(step):
        steps, current = [], []
        real = cuda_shim.RawKernel.__call__

        def record(self, grid, block, args, **kw):
            current.append((self.name, tuple(a.item() for a in args if isinstance(a, np.generic))))
            return real(self, grid, block, args, **kw)

        class Mark(tc.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                steps.append(list(current))
                current.clear()

        def full(shape, value, dtype=None):  # how the GPU set writes a host value into device memory
            current.append(("full", value))
            return np.full(shape, value, dtype=dtype)

        monkeypatch.setattr(cuda_shim.RawKernel, "__call__", record)
        monkeypatch.setattr(shim_gpu.xp, "full", full, raising=False)
        train(shim_gpu, step, epochs=2, n=256, batch_size=64, callbacks=[Mark()], validation=False)  # 4 batches an epoch
        monkeypatch.undo()
        return steps

    static = launches("static")
    assert len(static) == 8 and [i for i, s in enumerate(static) if s != static[1]] == [0]  # the first: warm-up
    assert {"tinycnn_dropout_keys", "tinycnn_adam", "tinycnn_bn_normalize"} <= {name for name, _ in static[1]}
    eager = launches("eager")
    assert any(s != eager[1] for s in eager[2:])


def test_graphs_warm_up_capture_once_and_replay_as_eager_steps(shim_gpu, monkeypatch):
    """TINYCNN_STEP=graphs on the stand-in CuPy, whose streams capture what NumPy can: each batch
    size's step runs once as a warm-up, is captured on a stream of its own at its second run
    (whose launch then does nothing more: NumPy ran it while capturing) and replayed from then on;
    the training is the eager one to the bit. What a real capture records, only a GPU shows."""
    from tinycnn import static_step

    graphs, real_run = [], static_step.CudaGraph.run

    def run(self, body):
        cuda_shim.Stream.capture_body = body  # what a capture opened in this run would capture
        if self not in graphs:
            graphs.append(self)
        return real_run(self, body)

    monkeypatch.setattr(static_step.CudaGraph, "run", run)
    assert_same_training(train(shim_gpu, "eager"), train(shim_gpu, "graphs"))
    full, last = graphs  # 200 samples in batches of 64: 3 full batches and one of 8, two epochs
    assert (full.runs, full.graph.launches, last.runs, last.graph.launches) == (6, 5, 2, 1)
    assert not full.stream.null and full.stream is not last.stream and full.pool is not last.pool


def test_fit_says_why_it_runs_eager_steps(capsys):
    model = week2("cpu")
    model.compile(tc.optimizers.SGD(0.01), "categorical_crossentropy")
    x, y = data(64)
    with config.using(step="static"):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert capsys.readouterr().err.strip() == (
        "tinycnn: fit runs eager steps: the static step supports Adam without clipping or weight decay")


def test_the_step_setting_names_its_choices(monkeypatch):
    monkeypatch.setenv("TINYCNN_STEP", "captured")
    with pytest.raises(tc.ConfigError, match="TINYCNN_STEP must be one of 'eager', 'static', 'graphs'"):
        config.settings()


@pytest.mark.gpu
@pytest.mark.skipif(gpu_problem() is not None, reason=f"no GPU backend: {gpu_problem()}")
def test_captured_graphs_replay_the_eager_step_bit_for_bit_on_the_gpu():
    """On a GPU: the steps captured as CUDA graphs (the full batch's and the last one's) and
    replayed give the eager steps' results to the bit."""
    assert_same_training(train("gpu", "eager", epochs=3), train("gpu", "graphs", epochs=3))


def test_a_custom_layer_keeps_fit_eager_unless_it_declares_itself_static_safe(capsys):
    class Noise(tc.layers.Layer):  # a custom layer that could draw host randomness every step
        def forward(self, x, training):
            return x, None

        def backward(self, saved, dy, need_input_grad=True):
            return dy, {}

    x, y = data(64)
    for safe, expected in ((False, "custom noise may take values from the host"), (True, "")):
        Noise.static_safe = safe
        model = tc.Sequential([tc.layers.Conv2D(4, 3, input_shape=(28, 28, 1)), Noise(name="noise"),
                               tc.layers.GlobalAveragePooling2D(), tc.layers.Dense(10, activation="softmax")],
                              device="cpu", seed=0)
        model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy")
        with config.using(step="static"):
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        err = capsys.readouterr().err
        assert (expected in err) if expected else err == ""


class FreezeFirstWeightedLayer(tc.callbacks.Callback):
    """Freezes a layer mid-fit: the eager step then builds a new parameter buffer and a fresh
    optimizer state for it, and the static steps must follow (warm up, and capture, anew)."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1 and not getattr(self, "done", False):
            self.done = True
            next(layer for layer in self.model.compute_layers if layer.trainable_names).trainable = False


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_a_layer_frozen_during_fit_trains_static_steps_as_eager_ones(kernels):
    with config.using(kernels=kernels):
        eager = train("cpu", "eager", callbacks=[FreezeFirstWeightedLayer()])
        static = train("cpu", "static", callbacks=[FreezeFirstWeightedLayer()])
    assert_same_training(eager, static)


def test_a_layer_frozen_during_fit_makes_the_graphs_capture_anew(shim_gpu, monkeypatch):
    from tinycnn import static_step

    real_run = static_step.CudaGraph.run

    def run(self, body):
        cuda_shim.Stream.capture_body = body
        return real_run(self, body)

    monkeypatch.setattr(static_step.CudaGraph, "run", run)
    assert_same_training(train(shim_gpu, "eager", callbacks=[FreezeFirstWeightedLayer()]),
                         train(shim_gpu, "graphs", callbacks=[FreezeFirstWeightedLayer()]))


def test_the_reference_set_on_a_gpu_reads_no_key_back_from_the_device(monkeypatch):
    """The reference kernels on a GPU draw a static step's masks from the key on the device: no
    device-to-host read, which a capture refuses (and which would freeze the key into a graph)."""
    from tinycnn.kernels.reference import ReferenceKernels
    from tinycnn.randomness import DeviceKey

    fake = cuda_shim.fake_cupy()
    backend = Backend("gpu", fake, ReferenceKernels(), config.settings())
    eager = train(backend, "eager")
    monkeypatch.setattr(DeviceKey, "host", lambda self: pytest.fail("a DeviceKey was read on the host"))
    assert_same_training(eager, train(backend, "static"))


def test_a_static_step_leaves_another_models_dropout_to_its_own_seeds():
    from tinycnn import randomness, static_step

    mine, other = tc.layers.Dropout(0.5), tc.layers.Dropout(0.5)
    other.reseed(7)
    with randomness.static_keys(static_step.DropoutKeyTable([mine])):
        assert other.next_seed() == randomness.call_seed(7, 0)
