"""OpenBLAS's thread count while a split batch's shares run (tinycnn.blas_threads): one core per
share, so a GEMM inside a share must not start threads on the other shares' cores."""
import numba
import numpy as np
import pytest

from tinycnn import batch_split, blas_threads

pytestmark = pytest.mark.skipif(blas_threads.count() is None,
                                reason="NumPy's BLAS here is not an OpenBLAS whose thread count can be set")


def test_limited_caps_the_count_inside_the_block_and_restores_it():
    before = blas_threads.count()
    with blas_threads.limited(1):
        assert blas_threads.count() == 1
        np.ones((64, 64)) @ np.ones((64, 64))  # a GEMM still runs
    assert blas_threads.count() == before
    with blas_threads.limited(before + 5):  # never raised
        assert blas_threads.count() == before
    with pytest.raises(KeyError):
        with blas_threads.limited(1):
            raise KeyError("x")
    assert blas_threads.count() == before


def test_a_split_batchs_shares_run_openblas_on_their_own_threads_only():
    before = blas_threads.count()
    per_share = max(1, numba.get_num_threads() // batch_split.SHARES)
    seen = batch_split.run(batch_split.bounds(64), lambda index, start, stop: blas_threads.count())
    assert seen == [min(before, per_share)] * batch_split.SHARES
    assert blas_threads.count() == before
