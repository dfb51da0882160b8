"""Counter-based random numbers that every backend computes bit for bit alike.

A dropout mask or a shuffle is a hash of (key, element index): no generator state to carry
between devices or threads, so NumPy, numba and CUDA draw the same mask for the same seed, in
parallel, and a resumed run replays its epochs exactly.
"""
import contextlib

import numpy as np

HASH_MASK = 0xFFFFFFFF


def lowbias32(h):
    """A 32-bit integer hash (bijective, good avalanche) on uint64 arrays holding 32-bit values, or on
    a Python int below 2**32. Written with explicit masking so NumPy, numba, CUDA and Python's
    integers compute the same bits."""
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
    low = lowbias32(seed & HASH_MASK)  # on a Python int: the array version's bits, 1 us instead of 9
    return low ^ ((seed >> 32) & HASH_MASK)


MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
MIX_1, MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # and its finalizer's multipliers


def call_seed(base, call):
    """The 63-bit seed of a layer's call number `call` (0, 1, ...) since its stream was (re)seeded
    with `base`: splitmix64 of base + (call + 1) * gamma. A function of two counters, not a
    generator's state, so a static step computes it on the device from its step counter (the
    `dropout_keys` kernel), bit for bit as here."""
    z = (base + (call + 1) * GOLDEN_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MIX_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK64
    return (z ^ (z >> 31)) >> 1


class DeviceKey:
    """A dropout mask's 32-bit key held in device memory: element `index` of the uint32 array
    `keys`, which a static step recomputes on the device every step (tinycnn.static_step), where a
    key passed from the host would be frozen into a captured graph."""

    def __init__(self, keys, index):
        self.keys, self.index = keys, index

    def view(self):
        """The key as a 1-element device array (for kernels that read it from memory)."""
        return self.keys[self.index : self.index + 1]

    def host(self):
        """The key as an int (a device-to-host read: for the reference and CPU kernels)."""
        return int(self.keys[self.index])


_static = []  # the static step running now, if any (tinycnn.static_step sets it)


def static_key_table():
    """The dropout key table of the static step running now (tinycnn.static_step), or None."""
    return _static[-1] if _static else None


@contextlib.contextmanager
def static_keys(table):
    """Inside the block, Dropout layers take their mask keys from `table` (a static step's)."""
    _static.append(table)
    try:
        yield
    finally:
        _static.pop()


def mask_key(seed):
    """The 32-bit key of a mask: of an int seed (dropout_key), or the value of a DeviceKey."""
    return seed.host() if isinstance(seed, DeviceKey) else dropout_key(seed)


def index_hashes(xp, n, seed, offset=0):
    """The 32-bit hash of each index offset..offset+n-1 mixed with `seed`'s key (`seed`: an int or a
    DeviceKey), as a uint64 array of array module `xp`: what a dropout mask and a shuffle are drawn
    from."""
    # a DeviceKey's key stays on the device (a static step may be being captured: no host reads)
    key = seed.view().astype(xp.uint64) if isinstance(seed, DeviceKey) else xp.uint64(dropout_key(seed))
    return lowbias32(xp.arange(offset, offset + n, dtype=xp.uint64) ^ key)


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
