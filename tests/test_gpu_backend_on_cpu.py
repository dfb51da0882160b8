"""The GPU backend as the layers use it, without a GPU: a Backend named "gpu" whose array module
is the stand-in CuPy of tests/cuda_shim.py (NumPy's functions, the CUDA kernels of
tinycnn/kernels/cuda_source.py compiled as C++) and whose kernel set is GPUKernels. The Week2
model trains and predicts on it as on the CPU: this checks the GPU set's entries in context (their
arguments, what forward saves for backward, BatchNorm's running statistics, dropout's offsets),
which the per-kernel tests cannot. What it cannot check: CuPy's own functions, and the GPU."""

import numpy as np
import pytest
import cuda_shim
import tinycnn as tc

pytestmark = pytest.mark.skipif(cuda_shim.CXX is None, reason="needs a C++ compiler (g++) to run CUDA kernels")

@pytest.fixture(scope="module")
def shim_gpu():
    """A "gpu" Backend on the stand-in CuPy; the real modules come back after."""
    with cuda_shim.gpu_backend() as backend:
        yield backend

def week2(device):
    from week2_model import build_week2_model
    model = build_week2_model(device=device, seed=4)
    model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["accuracy"])
    return model

def data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 28, 28, 1), dtype=np.float32), np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]

def test_week2_trains_on_the_gpu_set_as_on_the_cpu(shim_gpu):
    x, y = data()
    runs = {}
    for name, device in (("gpu", shim_gpu), ("cpu", "cpu")):
        model = week2(device)
        assert model.backend.kernels.name == name
        history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_data=data(64, 1))
        runs[name] = (history.history, model.get_weights(), model.predict(x[:50], verbose=0))
    (h_gpu, w_gpu, p_gpu), (h_cpu, w_cpu, p_cpu) = runs["gpu"], runs["cpu"]
    assert h_gpu.keys() == h_cpu.keys()
    for key in set(h_cpu) - {"seconds"}:  # loss, accuracy, val_loss, val_accuracy
        np.testing.assert_allclose(h_gpu[key], h_cpu[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # The weights, BatchNorm's moving statistics among them. Adam moves a weight by about lr = 0.003
    # per step whatever its gradient's size, so round-off in a near-zero gradient can move one by
    # a fraction of that: 3.7e-4 at most seen (over 6 steps), where a wrong kernel moves them by far more.
    for a, b in zip(w_gpu, w_cpu):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(p_gpu, p_cpu, rtol=1e-4, atol=1e-5)

def test_the_gpu_set_runs_its_own_kernels_in_that_training(shim_gpu, monkeypatch):
    """The comparison above is not the reference code twice: the fused BatchNorm + Dropout, max-pool,
    im2col and Adam kernels of cuda_source are what ran."""
    launched = set()
    real = cuda_shim.RawKernel.__call__
    def counting(self, grid, block, args, **kw):
        launched.add(self.name)
        return real(self, grid, block, args, **kw)
    monkeypatch.setattr(cuda_shim.RawKernel, "__call__", counting)
    x, y = data(64)
    week2(shim_gpu).fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert {"tinycnn_conv_forward", "tinycnn_conv_filter_grad", "tinycnn_conv_input_grad", "tinycnn_maxpool_forward", "tinycnn_maxpool_backward",
            "tinycnn_bn_forward_partials", "tinycnn_bn_normalize", "tinycnn_bn_backward_dx", "tinycnn_adam"} <= launched

def test_a_week2_training_step_launches_at_most_61_kernels_on_a_gpu(monkeypatch):
    """What a GPU launches per eager Week2 step, counted on a stand-in CuPy that counts (each CUDA
    kernel of the GPU set, each CuPy operation and cuBLAS call, each copy): 61 at this writing (the
    issue's review estimated about 390 before BatchNorm, Dropout, ReLU and softmax-CE had GPU
    kernels; 149 before weight gradients were computed in place, BatchNorm's column totals joined
    its partial sums, and an eager step's dropout keys and learning rate went by value; 99 before
    the BatchNorm kernels read the ReLU before them; 87 before they updated the moving statistics; 80
    before GlobalAveragePooling had a kernel each way; 78 before the loss kernel scaled the gradient and
    summed the losses itself and the accuracy was counted in one kernel; 74 before a convolution's
    input gradient was one kernel instead of a GEMM and col2im; 68 before its output and kernel
    gradient were one kernel each instead of im2col and GEMMs; 63 (61 counted: the counter missed
    the loss sum's add and the accuracy count's zeroing) before the accuracy kernel added into the
    epoch's running count). The one add left: the loss's, into the epoch's loss sum.
    A change that adds launches to the step fails here; a GPU tells what each costs."""
    fake, counter = cuda_shim.fake_cupy(), cuda_shim.LaunchCounter()
    counter.install(fake)
    # code that asks tinycnn.arrays which module holds a counted array gets the counting one, so
    # the arrays it makes (the loss sum's) count too
    monkeypatch.setattr(tc.arrays, "cupy", counter.array_module(fake))
    per_step = []
    class Count(tc.callbacks.Callback):  # from one batch's start to the next's: a whole step, and no
        def on_train_batch_begin(self, batch, logs=None):  # batch logs asked for (they would divide)
            per_step.append(dict(counter.counts))
            counter.counts.clear()

    with cuda_shim.gpu_backend(fake) as backend:
        x, y = data(384)  # the step counted: the second (the first makes the epoch's running sums)
        week2(backend).fit(x, y, batch_size=128, epochs=1, verbose=0, callbacks=[Count()])
    step = per_step[-1]
    own = sum(v for k, v in step.items() if k.startswith("tinycnn_"))
    assert own >= 40 and step.get("matmul", 0) == 3, step  # the counter sees the kernels and the 1x1's GEMMs
    assert step.get("tinycnn_conv_forward", 0) == 7 and step.get("tinycnn_conv_filter_grad", 0) == 7, step
    assert step.get("tinycnn_conv_input_grad", 0) == 6 and "tinycnn_col2im" not in step, step
    assert "tinycnn_im2col" not in step, step
    assert step.get("fill", 0) == 0 and step.get("copy into", 0) == 0, step
    assert step.get("maximum", 0) == 1 and step.get("tinycnn_relu_backward", 0) == 1, step  # the 1x1 conv's ReLU
    assert "tinycnn_bn_moving_update" not in step, step
    assert step.get("add", 0) == 1, step  # the epoch's loss sum (the accuracy kernel adds into its own)
    assert sum(step.values()) <= 61, sorted(step.items(), key=lambda kv: -kv[1])


def test_float64_gradients_through_the_gpu_sets_fused_relu_batchnorm_step(shim_gpu):
    """A float64 gradient check of a model whose Conv(relu) -> BatchNorm -> Dropout runs as the GPU
    set's fused step (the BatchNorm kernels reading the ReLU, the dropout mask, the column
    finishers): every weight's gradient against finite differences, on the CUDA kernels played here."""
    from tinycnn import gradcheck
    from tinycnn import layers as L

    model = tc.Sequential([L.Conv2D(4, 3, activation="relu", use_bias=False, input_shape=(7, 7, 2)),
                           L.BatchNormalization(), L.Dropout(0.25), L.Conv2D(3, 3), L.BatchNormalization(),
                           L.GlobalAveragePooling2D(), L.Activation("softmax")], device=shim_gpu, seed=3, dtype="float64")
    model.compile(tc.optimizers.Adam(0.01), "categorical_crossentropy")
    assert model.plan(strip_activation="softmax").describe()[0].endswith("(ReLU and BatchNorm fused in training)")
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((5, 7, 7, 2)), np.eye(3)[rng.integers(0, 3, 5)]
    gradcheck.check_model(model, x, y).assert_ok()
