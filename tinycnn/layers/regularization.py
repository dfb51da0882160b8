"""Dropout."""
import numpy as np

from .. import arguments, batch_split
from .base import Layer


class Dropout(Layer):
    """Inverted dropout in training, the identity in inference. The mask is a counter-based hash of
    (a seed drawn per call, element index): the same on every backend (tinycnn.randomness)."""

    thread_safe = True  # see Layer.thread_safe
    base_name = "dropout"

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = arguments.real(rate, "Dropout rate", 0.0, 1.0, high_open=True)
        self.seed = None if seed is None else arguments.integer(seed, "Dropout seed")
        self.first_sample = 0  # where this call's samples start in the batch (data parallelism)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}

    def create_weights(self, input_shape, rng):
        self.reseed(self.seed if self.seed is not None else int(rng.integers(2**31)))

    def random_state(self):
        return self._seeds.bit_generator.state

    def set_random_state(self, state):
        self._seeds.bit_generator.state = state

    def place_in_batch(self, first_sample):
        self.first_sample = int(first_sample)

    def mask_offset(self, x):
        """The element index, in the whole batch, of `x`'s first element (masks hash it): the
        rank's place in the global batch plus the share's place in a split batch."""
        return (self.first_sample + batch_split.first_sample()) * (x.size // x.shape[0]) if x.shape[0] else 0

    def reseed(self, seed):
        # Host-side: each training call draws one 63-bit seed from here; the mask itself is
        # computed on the device in parallel.
        self._seeds = np.random.default_rng(int(seed))

    def next_seed(self):
        """The seed of the next training call's mask (one per call of the whole batch: the shares
        of a split batch read the same one)."""
        return batch_split.shared_seed(self, lambda: int(self._seeds.integers(2**63)))

    def forward(self, x, training):
        if not training or self.rate == 0.0:
            return x, None
        return self.kernels.dropout_forward(x, self.rate, self.next_seed(), self.mask_offset(x))

    def backward(self, saved, dy, need_input_grad=True):
        if saved is None:
            return dy, {}
        return self.kernels.dropout_backward(dy, saved), {}
