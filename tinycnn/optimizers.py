"""Optimizers that update one flat parameter buffer with one fused kernel call per step.

The model keeps every trainable weight as a view into one flat array (and every gradient
as a view into another), so Adam is a single pass over 12,316 numbers, not 22 small ones.
"""
import math

import numpy as np

from .backend import to_numpy


class Optimizer:
    def __init__(self, learning_rate):
        if not callable(learning_rate) and not float(learning_rate) > 0:
            raise ValueError(f"learning_rate must be positive or a schedule, got {learning_rate!r}")
        self.learning_rate = learning_rate  # a float, or a schedule called with the step count
        self.iterations = 0
        self._slots = {}
        self.owner = None  # the model whose parameters the state describes

    def current_learning_rate(self):
        lr = self.learning_rate
        return float(lr(self.iterations)) if callable(lr) else float(lr)

    def build(self, params, backend, owner=None):
        """Fresh state (zero slots, step 0) for the flat parameter buffer `params` of model `owner`.
        An optimizer serves one model: its state describes that model's parameters."""
        if owner is not None and self.owner is not None and self.owner is not owner:
            raise ValueError(f"this {type(self).__name__} already holds the state of model {self.owner.name!r}; "
                             f"give model {owner.name!r} an optimizer of its own")
        self.backend = backend
        self._slots = {name: backend.xp.zeros_like(params) for name in self.slot_names}
        self.iterations = 0
        self.owner = owner

    slot_names = ()

    def apply(self, params, grads):
        raise NotImplementedError

    def get_state(self):
        """Everything needed to resume training exactly: NumPy arrays and numbers."""
        state = {"iterations": np.int64(self.iterations)}
        state.update({f"slot/{name}": to_numpy(value) for name, value in self._slots.items()})
        return state

    def set_state(self, state):
        values = {name: np.asarray(state[f"slot/{name}"]) for name in self.slot_names}
        for name, value in values.items():  # check all before assigning any
            if value.shape != self._slots[name].shape:
                raise ValueError(f"optimizer state {name!r} has shape {value.shape}, expected {self._slots[name].shape}")
        for name, value in values.items():
            self._slots[name][...] = self.backend.asarray(value, dtype=self._slots[name].dtype)
        self.iterations = int(state["iterations"])


class Adam(Optimizer):
    """Adam as Keras 3 computes it: bias correction folded into the step size (epsilon-hat)."""

    slot_names = ("m", "v")

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate)
        if not (0 <= beta_1 < 1 and 0 <= beta_2 < 1 and epsilon > 0):
            raise ValueError("Adam needs 0 <= beta_1, beta_2 < 1 and epsilon > 0")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def apply(self, params, grads):
        lr = self.current_learning_rate()
        t = self.iterations + 1
        lr_t = lr * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)  # a Python float: no float64 upcast
        self.backend.kernels.adam_update(
            params, grads, self._slots["m"], self._slots["v"], lr_t, self.beta_1, self.beta_2, self.epsilon
        )
        self.iterations = t


class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum, Keras 3 form: v = mu*v - lr*g."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        super().__init__(learning_rate)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.slot_names = ("velocity",) if self.momentum else ()

    def apply(self, params, grads):
        lr = self.current_learning_rate()
        if not self.momentum:
            params -= lr * grads
        else:
            velocity = self._slots["velocity"]
            velocity *= self.momentum
            velocity -= lr * grads
            if self.nesterov:
                params += self.momentum * velocity - lr * grads
            else:
                params += velocity
        self.iterations += 1


_OPTIMIZERS = {"adam": Adam, "sgd": SGD}


def get(optimizer):
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in _OPTIMIZERS:
        return _OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(_OPTIMIZERS)} or pass an instance")
