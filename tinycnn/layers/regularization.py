"""Dropout."""
from .. import arguments, batch_split, randomness
from .base import Layer


class Dropout(Layer):
    """Inverted dropout in training, the identity in inference. The mask is a counter-based hash of
    (the call's seed, element index), and the call's seed a hash of (the layer's seed for the epoch,
    the call's number): the same on every backend (tinycnn.randomness)."""

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
        return {"base": self._base, "calls": self._calls}

    def set_random_state(self, state):
        self._base, self._calls = int(state["base"]), int(state["calls"])

    def place_in_batch(self, first_sample):
        self.first_sample = int(first_sample)

    def mask_offset(self, x):
        """The element index, in the whole batch, of `x`'s first element (masks hash it): the
        rank's place in the global batch plus the share's place in a split batch."""
        return (self.first_sample + batch_split.first_sample()) * (x.size // x.shape[0]) if x.shape[0] else 0

    def reseed(self, seed):
        # Call k's mask seed is call_seed(seed, k): a hash of two counters, so a static step can
        # compute it on the device (tinycnn.static_step) exactly as here.
        self._base, self._calls = int(seed), 0

    def next_seed(self):
        """The seed of the next training call's mask (one per call of the whole batch: the shares
        of a split batch read the same one); inside a static step, a key on the device."""
        table = randomness.static_key_table()
        if table is None or not table.serves(self):  # eager, or another model's static step runs
            return batch_split.shared_seed(self, self._draw)
        return batch_split.shared_seed(self, lambda: table.key_for(self))

    def count_calls(self, calls):
        """Count `calls` calls whose seeds a static step computed on the device (tinycnn.static_step)."""
        self._calls += int(calls)

    def _draw(self):
        self._calls += 1
        return randomness.call_seed(self._base, self._calls - 1)

    def forward(self, x, training):
        if not training or self.rate == 0.0:
            return x, None
        return self.kernels.dropout_forward(x, self.rate, self.next_seed(), self.mask_offset(x))

    def backward(self, saved, dy, need_input_grad=True):
        if saved is None:
            return dy, {}
        return self.kernels.dropout_backward(dy, saved), {}
