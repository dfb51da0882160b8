"""Counter-based random numbers that every backend computes bit for bit alike.

A dropout mask or a shuffle is a hash of (key, element index): no generator state to carry
between devices or threads, so NumPy, numba and CUDA draw the same mask for the same seed, in
parallel, and a resumed run replays its epochs exactly.
"""
import numpy as np

HASH_MASK = 0xFFFFFFFF


def lowbias32(h):
    """A 32-bit integer hash (bijective, good avalanche) on uint64 arrays holding 32-bit values.
    Written with explicit masking so NumPy, numba and CUDA compute the same bits."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & HASH_MASK
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & HASH_MASK
    return h ^ (h >> 16)


def dropout_keep_threshold(rate):
    """Entries whose 24-bit hash is below this are dropped: P(drop) = rate to within 2**-24."""
    return min(int(round(rate * (1 << 24))), (1 << 24) - 1)


def dropout_key(seed):
    """The per-call key mixed into every element's hash (seed: a Python int drawn by the layer)."""
    low = int(lowbias32(np.array([seed & HASH_MASK], dtype=np.uint64))[0])
    return low ^ ((seed >> 32) & HASH_MASK)


def index_hashes(xp, n, seed, offset=0):
    """The 32-bit hash of each index offset..offset+n-1 mixed with `seed`'s key, as a uint64 array of
    array module `xp`: what a dropout mask and a shuffle are drawn from."""
    return lowbias32(xp.arange(offset, offset + n, dtype=xp.uint64) ^ xp.uint64(dropout_key(seed)))


def permutation(xp, n, seed):
    """A random permutation of range(n) computed with array module `xp`: the order of the
    counter-based hashes of the indices (a bijection, so no ties). The same seed gives the same
    permutation on every backend."""
    return xp.argsort(index_hashes(xp, n, seed))


def derive_seed(*parts):
    """A 31-bit seed from a tuple of ints: independent streams per (model seed, epoch, layer)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


_seed_source = []  # set by set_global_seed: where models built without a seed draw theirs


def set_global_seed(seed):
    """Make every later `fresh_seed()` come from a stream started at `seed` (None: the OS again)."""
    _seed_source[:] = [] if seed is None else [np.random.default_rng(int(seed))]


def fresh_seed():
    """A 31-bit seed for a model built without one: from the global seed's stream if one was set
    (tinycnn.utils.set_random_seed), else from the operating system's entropy."""
    if _seed_source:
        return int(_seed_source[0].integers(2**31))
    return int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF)
