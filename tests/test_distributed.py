"""Data-parallel training (tinycnn.distributed): N ranks under mpiexec train as one process does
with the global batch.

The multi-process tests run tests/distributed_run.py under `mpiexec -n 2` and compare with the
same script on one process. Tolerances: in float64 the two agree to 1e-9 (the method is exact;
only the summation order differs). In float32 a model without BatchNormalization agrees to 1e-6
after 10 steps (observed 1.6e-7, weights up to 0.53). Adam's first steps move each weight by
about the learning rate times the sign of its gradient, so a gradient component within float32
round-off of zero may take the other sign and move 2 x 0.003 away: for the Week2 model in
float32 the test compares one step (observed 7.9e-7); after ten steps the 2-rank and 1-process
runs differ by 9.9e-5, while one process's own fast and reference kernels differ from each other
by 2.5e-2 after those ten steps (6.0e-3 after one).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tinycnn as tc
from tinycnn.backend import gpu_problem
from tinycnn.distributed.data_parallel import DataParallel, share
from tinycnn.kernels.reference import ReferenceKernels

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distributed_run.py")

try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(not (HAVE_MPI4PY and MPIEXEC),
                               reason="needs mpi4py and mpiexec (pip install -e '.[distributed]')")


def launch(tmp_path, out, *args, ranks=None, check=True, timeout=180):
    """Run the script on one process (ranks=None) or under mpiexec; returns (process, saved results)."""
    command = [sys.executable, SCRIPT, "--out", str(tmp_path / out), *args]
    if ranks is not None:
        command = [MPIEXEC, "-n", str(ranks)] + command + ["--distributed"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc, np.load(tmp_path / out)
    return proc, None


def weights(result):
    return [result[k] for k in sorted((k for k in result.files if k.startswith("arr_")), key=lambda k: int(k[4:]))]


def largest_difference(a, b):
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(weights(a), weights(b)))


# -- several processes ------------------------------------------------------------------------------------
@needs_mpi
def test_a_model_without_batchnorm_trains_on_two_ranks_as_on_one_process(tmp_path):
    # 515 samples in global batches of 128: the last batch (3 samples) is shared 2 + 1
    _, one = launch(tmp_path, "one.npz")
    _, two = launch(tmp_path, "two.npz", ranks=2)
    assert len(set(two["fingerprints"])) == 1  # both ranks hold the same weights
    assert largest_difference(one, two) <= 1e-6
    h1, h2 = json.loads(str(one["history"])), json.loads(str(two["history"]))
    for key in ("loss", "acc", "val_loss", "val_acc"):  # epoch logs cover every rank's samples
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(two["evaluated"], one["evaluated"], rtol=1e-5)
    assert two["predicted"].shape == one["predicted"].shape == (200, 10)  # predict gathers every rank's rows
    np.testing.assert_allclose(two["predicted"], one["predicted"], atol=1e-6)


@needs_mpi
def test_week2_with_synchronized_batchnorm_equals_one_process(tmp_path):
    # 513 samples: the last global batch has 1 sample, so rank 1's share is empty
    _, one = launch(tmp_path, "one.npz", "--model", "week2", "--dtype", "float64", "--samples", "513")
    _, two = launch(tmp_path, "two.npz", "--model", "week2", "--dtype", "float64", "--samples", "513", "--sync-bn",
                    ranks=2)
    assert len(set(two["fingerprints"])) == 1
    assert largest_difference(one, two) <= 1e-9  # 10 steps, Dropout included: exact up to summation order
    _, one32 = launch(tmp_path, "one32.npz", "--model", "week2", "--samples", "128", "--epochs", "1")
    _, two32 = launch(tmp_path, "two32.npz", "--model", "week2", "--samples", "128", "--epochs", "1", "--sync-bn",
                      ranks=2)
    assert largest_difference(one32, two32) <= 1e-5


@needs_mpi
def test_week2_with_per_rank_batchnorm_keeps_the_ranks_in_step(tmp_path):
    """Per-rank statistics (Keras's MirroredStrategy, Horovod): each rank normalizes its own 64
    samples, so the run differs from one process; the moving statistics are averaged every epoch,
    so the ranks still hold the same weights."""
    _, one = launch(tmp_path, "one.npz", "--model", "week2", "--dtype", "float64", "--samples", "513")
    _, two = launch(tmp_path, "two.npz", "--model", "week2", "--dtype", "float64", "--samples", "513", ranks=2)
    assert len(set(two["fingerprints"])) == 1  # an empty share (the last batch's 1 sample) leaves the statistics alone
    assert largest_difference(one, two) > 1e-4
    assert np.all(np.isfinite(json.loads(str(two["history"]))["loss"]))


@needs_mpi
def test_train_on_batch_shares_the_batch_and_test_on_batch_sums_over_the_ranks(tmp_path):
    _, one = launch(tmp_path, "one.npz", "--train-on-batch", "--model", "week2", "--dtype", "float64")
    _, two = launch(tmp_path, "two.npz", "--train-on-batch", "--model", "week2", "--dtype", "float64", "--sync-bn",
                    ranks=2)
    assert largest_difference(one, two) <= 1e-9
    h1, h2 = json.loads(str(one["history"])), json.loads(str(two["history"]))
    np.testing.assert_allclose(h2["train_on_batch"], h1["train_on_batch"], rtol=1e-9)
    np.testing.assert_allclose(h2["test_on_batch"], h1["test_on_batch"], rtol=1e-9)


@needs_mpi
def test_ranks_that_drew_different_seeds_train_as_one_process_with_rank_0s_seed(tmp_path):
    for loop in ([], ["--train-on-batch"]):
        _, two = launch(tmp_path, "two.npz", "--seed", "-1", "--dtype", "float64", *loop, ranks=2)
        assert len(set(two["fingerprints"])) == 1, loop
        _, one = launch(tmp_path, "one.npz", "--seed", str(int(two["seed"])), "--dtype", "float64", *loop)
        assert largest_difference(one, two) <= 1e-9, loop  # rank 0's weights and Dropout streams


@needs_mpi
def test_sample_weights_train_on_two_ranks_as_on_one_process(tmp_path):
    for loop in ([], ["--train-on-batch"]):
        _, one = launch(tmp_path, "one.npz", "--sample-weight", "--dtype", "float64", *loop)
        _, two = launch(tmp_path, "two.npz", "--sample-weight", "--dtype", "float64", *loop, ranks=2)
        assert largest_difference(one, two) <= 1e-9, loop


@needs_mpi
def test_train_on_batch_with_per_rank_batchnorm_keeps_the_ranks_in_step(tmp_path):
    _, two = launch(tmp_path, "two.npz", "--train-on-batch", "--model", "week2", ranks=2)
    assert len(set(two["fingerprints"])) == 1  # the moving statistics are averaged after every step


@needs_mpi
def test_an_error_every_rank_caught_leaves_the_job_usable(tmp_path):
    """fit with a batch smaller than the ranks fails alike on every rank; each rank's failure notice
    belongs to that call, so the next calls neither hang nor see a stale failure."""
    _, one = launch(tmp_path, "one.npz")
    _, two = launch(tmp_path, "two.npz", "--caught-error-first", ranks=2, timeout=60)
    assert largest_difference(one, two) <= 1e-6


@needs_mpi
def test_a_stop_at_epoch_end_on_one_rank_stops_every_rank(tmp_path):
    _, two = launch(tmp_path, "two.npz", "--stop-after-epoch-on-rank-0", "1", "--epochs", "3", ranks=2, timeout=60)
    assert len(json.loads(str(two["history"]))["loss"]) == 1


@needs_mpi
def test_a_checkpoint_from_two_ranks_resumes_on_one_or_two(tmp_path):
    _, straight = launch(tmp_path, "straight.npz", "--epochs", "2", "--checkpoint", str(tmp_path / "ck"), ranks=2)
    assert os.path.exists(tmp_path / "ck.1") and os.path.exists(tmp_path / "ck.2")  # written by rank 0
    _, again_two = launch(tmp_path, "two.npz", "--epochs", "2", "--resume", str(tmp_path / "ck.1"), ranks=2)
    _, again_one = launch(tmp_path, "one.npz", "--epochs", "2", "--resume", str(tmp_path / "ck.1"))
    assert again_two["fingerprints"][0] == straight["fingerprints"][0]  # bit for bit
    assert largest_difference(straight, again_one) <= 1e-6


@needs_mpi
def test_a_failing_rank_stops_every_rank_with_a_clear_error(tmp_path):
    proc, _ = launch(tmp_path, "x.npz", "--fail-rank", "1", ranks=2, check=False, timeout=60)
    assert proc.returncode != 0
    assert "ValueError: an injected failure on this rank" in proc.stderr
    assert "rank 1 of 2 failed with the error above" in proc.stderr
    assert "RankFailure: rank 1 of 2 failed (ValueError: an injected failure on this rank); rank 0 stops too" \
        in proc.stderr


@needs_mpi
def test_ranks_given_different_data_are_refused(tmp_path):
    proc, _ = launch(tmp_path, "x.npz", "--other-data-rank", "1", ranks=2, check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("DistributedError: the ranks were given different data or settings to fit (inputs:") == 2


@needs_mpi
def test_the_example_runs_under_mpiexec(tmp_path):
    example = os.path.join(os.path.dirname(HERE), "examples", "week2_mnist.py")
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, example, "--distributed", "--sync-bn", "--epochs", "1",
                           "--train-limit", "512", "--device", "cpu", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Epoch 1/1") == 1  # rank 0 alone prints
    assert "global batch 128 = 2 ranks x 64 samples" in proc.stdout
    assert "BatchNormalization statistics synchronized" in proc.stdout
    assert os.path.exists(tmp_path / "run" / "checkpoint.npz")
    # rank 0's checkpoint resumes on one process (and the other way round)
    again = subprocess.run([sys.executable, example, "--resume", "--epochs", "2", "--train-limit", "512", "--device",
                            "cpu", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch 1" in again.stdout and "Epoch 2/2" in again.stdout


@needs_mpi
@pytest.mark.gpu
@pytest.mark.skipif(gpu_problem() is not None, reason=f"no GPU backend: {gpu_problem()}")
@pytest.mark.parametrize("communicator", ["mpi", "nccl"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_on_the_gpu_two_ranks_train_as_one_process(tmp_path, communicator, dtype):
    """Two ranks may share one GPU over MPI (device arrays go through the host); NCCL refuses two
    ranks on one GPU, so its 2-rank case needs two GPUs."""
    import cupy

    if communicator == "nccl" and cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("NCCL needs one GPU per rank: this machine has one")
    common = ["--model", "week2", "--dtype", dtype, "--device", "gpu"]
    if dtype == "float32":  # one step: see the module's note on float32 and Adam
        common += ["--samples", "128", "--epochs", "1"]
    _, one = launch(tmp_path, "one.npz", *common)
    _, two = launch(tmp_path, "two.npz", *common, "--sync-bn", "--communicator", communicator, ranks=2)
    assert len(set(two["fingerprints"])) == 1
    assert largest_difference(one, two) <= (1e-9 if dtype == "float64" else 1e-5)


# -- one process ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count,size", [(128, 2), (3, 2), (7, 3), (1, 1), (10, 4)])
def test_shares_cover_the_batch_once_in_order(count, size):
    shares = [share(count, rank, size) for rank in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(s[1] - s[0] for s in shares) - min(s[1] - s[0] for s in shares) <= 1


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_a_share_of_a_batch_draws_that_share_of_the_batchs_dropout_mask(kernels):
    with tc.config.using(kernels=kernels):
        k = tc.get_backend("cpu").kernels
    x = np.random.default_rng(0).random((96, 20, 20, 3)).astype(np.float32) + 1.0  # >= 4,096 elements per share
    full, _ = k.dropout_forward(x, 0.3, 1234)
    per_sample = x[0].size
    part, _ = k.dropout_forward(x[40:70], 0.3, 1234, 40 * per_sample)
    np.testing.assert_array_equal(part, full[40:70])
    # the fused kernel: a share of >= 32,768 elements runs the numba kernel too; the statistics are
    # the share's own, so the values differ, and the kept elements must not
    x2d = np.random.default_rng(1).random((40000, 3)).astype(np.float32) + 1.0
    gamma, beta = np.ones(3, np.float32), np.ones(3, np.float32)
    fused, *_ = k.batchnorm_dropout_forward_train(x2d, gamma, beta, 1e-3, 0.3, 99)
    fused_part, *_ = k.batchnorm_dropout_forward_train(x2d[12000:24000], gamma, beta, 1e-3, 0.3, 99, 12000 * 3)
    np.testing.assert_array_equal(fused_part != 0, fused[12000:24000] != 0)
    reference = ReferenceKernels()
    ref_part, *_ = reference.batchnorm_dropout_forward_train(x2d[12000:24000], gamma, beta, 1e-3, 0.3, 99, 12000 * 3)
    np.testing.assert_allclose(fused_part, ref_part, rtol=1e-4, atol=1e-4)  # float32 statistics


@pytest.mark.skipif(not HAVE_MPI4PY, reason="needs mpi4py (pip install -e '.[distributed]')")
def test_one_rank_trains_bit_for_bit_like_a_plain_fit():
    """Like a plain fit that runs each batch whole: ranks do not split their share between threads
    (tinycnn.batch_split), whose sums would run in another order."""
    sys.path.insert(0, HERE)
    from distributed_run import data, plain_model

    x, y = data(300)
    runs = []
    for distribution in (None, DataParallel("mpi")):
        model = plain_model(0, "float32")
        model.compile(tc.optimizers.Adam(0.003), "categorical_crossentropy", ["acc"], distribution=distribution)
        # predict too runs each batch whole: OpenBLAS's GEMM (the Dense layer) may round a row
        # differently in a batch of another size (seen on a Zen 5 guest, rows 12-14 of 70 by 1 ulp)
        with tc.config.using(batch_split=False):
            history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_data=(x[:50], y[:50]))
            runs.append((model.get_weights(), {k: v for k, v in history.history.items() if k != "seconds"},
                         model.evaluate(x, y, verbose=0), model.predict(x[:70], verbose=0)))
    (w1, h1, e1, p1), (w2, h2, e2, p2) = runs
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    assert h1 == h2 and e1 == e2
    np.testing.assert_array_equal(p1, p2)


def test_compile_refuses_a_distribution_that_is_not_one():
    model = tc.Sequential([tc.layers.Dense(2, input_shape=(3,))], device="cpu", seed=0)
    with pytest.raises(tc.DistributedError, match="distribution must be a tinycnn.distributed.DataParallel"):
        model.compile("adam", "mse", distribution="mpi")


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_batchnorm_over_two_shares_equals_batchnorm_over_the_whole_batch(kernels):
    """The kernels' `reduce` (synchronized BatchNormalization): two shares of a batch, each summed
    with the other's partial sums, normalize and differentiate as the whole batch does."""
    with tc.config.using(kernels=kernels):
        k = tc.get_backend("cpu").kernels
    rng = np.random.default_rng(0)
    # the fast kernels take inputs of >= 32,768 elements: the whole batch and the first share go
    # there, the second share (32,000) to the reference code, as ranks with unequal shares may
    x = rng.standard_normal((10000, 8)) * 3 + 5
    dy = rng.standard_normal((10000, 8))
    gamma, beta = rng.random(8) + 0.5, rng.standard_normal(8)
    shares = (slice(0, 6000), slice(6000, 10000))
    y, saved, mean, var, inv_std = k.batchnorm_forward_train(x, gamma, beta, 1e-3)
    dx, dgamma, dbeta = k.batchnorm_backward_train(dy, saved, gamma, inv_std)

    def partial_sums(call):  # what a share contributes to the sum over the ranks
        seen = []
        call(lambda v: seen.append(v.copy()) or v)
        return seen[0]

    forward = [partial_sums(lambda r, s=s: k.batchnorm_forward_train(x[s], gamma, beta, 1e-3, r)) for s in shares]
    grads = []
    for i, s in enumerate(shares):
        other = forward[1 - i]
        ys, saved_s, mean_s, var_s, inv_s = k.batchnorm_forward_train(x[s], gamma, beta, 1e-3, lambda v: v + other)
        np.testing.assert_allclose(ys, y[s], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(mean_s, mean, rtol=1e-12)
        np.testing.assert_allclose(var_s, var, rtol=1e-10)
        grads.append((saved_s, inv_s))
    backward = [partial_sums(lambda r, i=i, s=s: k.batchnorm_backward_train(dy[s], grads[i][0], gamma, grads[i][1], r))
                for i, s in enumerate(shares)]
    local = []
    for i, s in enumerate(shares):
        other = backward[1 - i]
        dxs, dgs, dbs = k.batchnorm_backward_train(dy[s], grads[i][0], gamma, grads[i][1], lambda v: v + other)
        np.testing.assert_allclose(dxs, dx[s], rtol=1e-9, atol=1e-12)
        local.append((dgs, dbs))
    np.testing.assert_allclose(local[0][0] + local[1][0], dgamma, rtol=1e-10)  # the gradient sum adds them up
    np.testing.assert_allclose(local[0][1] + local[1][1], dbeta, rtol=1e-10)
