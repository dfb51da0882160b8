"""Optimizers that update one flat parameter buffer per step, with Keras 3's update rules.

The model keeps every trainable weight as a view into one flat array (and every gradient as a
view into another), so Adam is a single pass over 12,316 numbers for the Week2 model, not 22 small
ones. Every optimizer takes Keras's common options, applied in Keras's order before its update:
gradient clipping (`clipnorm` per weight, `global_clipnorm` over all, or `clipvalue`), then
decoupled weight decay (`weight_decay`: w -= w * weight_decay * learning_rate). The learning rate
is a float or a schedule called with the step count (`tinycnn.optimizers.schedules`).
"""
import math

import numpy as np

from . import arguments, schedules
from .arrays import to_numpy

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adadelta", "schedules", "get"]


def _positive_or_none(value, name):
    return None if value is None else arguments.real(value, name, low=0.0, low_open=True)


def _fraction(value, name):
    """A decay rate or momentum: in [0, 1)."""
    return arguments.real(value, name, 0.0, 1.0, high_open=True)


class Optimizer:
    slot_names = ()

    def __init__(self, learning_rate, weight_decay=None, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 name=None):
        if not callable(learning_rate):
            learning_rate = arguments.real(learning_rate, "learning_rate (a number, or a schedule)", low=0.0,
                                           low_open=True)
        if sum(v is not None for v in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError("use at most one of clipnorm, clipvalue and global_clipnorm")
        self.learning_rate = learning_rate  # a float, or a schedule called with the step count
        self.weight_decay = None if weight_decay is None else arguments.real(weight_decay, "weight_decay", low=0.0)
        self.clipnorm = _positive_or_none(clipnorm, "clipnorm")
        self.clipvalue = _positive_or_none(clipvalue, "clipvalue")
        self.global_clipnorm = _positive_or_none(global_clipnorm, "global_clipnorm")
        self.name = name or type(self).__name__.lower()
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

    def apply(self, params, grads, grad_views=None):
        """One step: clip `grads` (in place), decay the weights, update `params` (in place).
        `grad_views`: the per-weight views of `grads`, which `clipnorm` clips one by one."""
        lr = self.current_learning_rate()
        self._clip(grads, grad_views)
        if self.weight_decay:
            params -= params * params.dtype.type(self.weight_decay) * params.dtype.type(lr)  # Keras's order
        self.update(params, grads, lr)
        self.iterations += 1

    def _clip(self, grads, grad_views):
        xp = self.backend.xp
        if self.clipnorm:
            for g in grad_views if grad_views is not None else [grads]:
                norm = float(xp.sqrt((g * g).sum()))
                if norm > self.clipnorm:
                    g *= g.dtype.type(self.clipnorm / norm)
        elif self.global_clipnorm:
            norm = float(xp.sqrt((grads * grads).sum()))
            if norm > self.global_clipnorm:
                grads *= grads.dtype.type(self.global_clipnorm / norm)
        elif self.clipvalue:
            xp.clip(grads, -self.clipvalue, self.clipvalue, out=grads)

    def update(self, params, grads, lr):
        """The optimizer's own rule, at step `self.iterations + 1` with learning rate `lr`."""
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

    def get_config(self):
        lr = self.learning_rate
        return {"name": self.name, "learning_rate": lr if not callable(lr) else repr(lr),
                "weight_decay": self.weight_decay, "clipnorm": self.clipnorm, "clipvalue": self.clipvalue,
                "global_clipnorm": self.global_clipnorm}


class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum, Keras 3 form: v = mu*v - lr*g."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.momentum, self.nesterov = _fraction(momentum, "SGD momentum"), bool(nesterov)
        self.slot_names = ("velocity",) if self.momentum else ()

    def update(self, params, grads, lr):
        if not self.momentum:
            params -= lr * grads
            return
        velocity = self._slots["velocity"]
        velocity *= self.momentum
        velocity -= lr * grads
        if self.nesterov:
            params += self.momentum * velocity - lr * grads
        else:
            params += velocity

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam as Keras 3 computes it: bias correction folded into the step size (epsilon-hat)."""

    slot_names = ("m", "v")

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.beta_1, self.beta_2 = _fraction(beta_1, "Adam beta_1"), _fraction(beta_2, "Adam beta_2")
        self.epsilon = arguments.real(epsilon, "Adam epsilon", low=0.0, low_open=True)
        self._powers = (0, 1.0, 1.0)  # (t, beta_1**t, beta_2**t) last computed

    def update(self, params, grads, lr):
        power_1, power_2 = self.bias_powers(self.iterations + 1)
        lr_t = lr * math.sqrt(1 - power_2) / (1 - power_1)  # a Python float: no float64 upcast
        self.backend.kernels.adam_update(
            params, grads, self._slots["m"], self._slots["v"], lr_t, self.beta_1, self.beta_2, self.epsilon
        )

    def bias_powers(self, t):
        """(beta_1**t, beta_2**t) as t float64 products, the way a static step computes them on the
        device, one product per step (tinycnn.static_step): the same bits on every backend, where
        pow() may differ in the last place between libraries."""
        start, p1, p2 = self._powers if self._powers[0] <= t else (0, 1.0, 1.0)
        for _ in range(t - start):
            p1, p2 = p1 * self.beta_1, p2 * self.beta_2
        self._powers = (t, p1, p2)
        return p1, p2

    def static_update(self, params, grads, state):
        """The update of a static step: the learning rate and the bias powers come from device
        buffers (`state`, a tinycnn.static_step.AdamState), advanced on the device."""
        state.advance()
        self.backend.kernels.adam_update(
            params, grads, self._slots["m"], self._slots["v"], state.lr_t, self.beta_1, self.beta_2, self.epsilon
        )

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon}


class AdamW(Adam):
    """Adam with decoupled weight decay (Keras 3's default 0.004)."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
        if weight_decay is None:
            raise ValueError("AdamW needs a weight_decay (a float)")
        super().__init__(learning_rate, beta_1, beta_2, epsilon, weight_decay=weight_decay, **kwargs)


class RMSprop(Optimizer):
    """v = rho v + (1 - rho) g^2; step lr g / sqrt(v + eps) (minus the squared mean gradient when
    centered), through a momentum accumulator when momentum > 0; as Keras 3 computes it."""

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.rho, self.momentum = _fraction(rho, "RMSprop rho"), _fraction(momentum, "RMSprop momentum")
        self.epsilon = arguments.real(epsilon, "RMSprop epsilon", low=0.0, low_open=True)
        self.centered = bool(centered)
        self.slot_names = ("velocity",) + (("momentum",) if self.momentum else ()) + (
            ("average_gradient",) if self.centered else ())

    def update(self, params, grads, lr):
        xp = self.backend.xp
        rho = self.rho
        velocity = self._slots["velocity"]
        velocity *= rho
        velocity += (1 - rho) * (grads * grads)
        if self.centered:
            average = self._slots["average_gradient"]
            average *= rho
            average += (1 - rho) * grads
            denominator = velocity - average * average + self.epsilon
        else:
            denominator = velocity + self.epsilon
        increment = lr * grads / xp.sqrt(denominator)
        if self.momentum:
            momentum = self._slots["momentum"]
            momentum *= self.momentum
            momentum += increment
            params -= momentum
        else:
            params -= increment

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "momentum": self.momentum, "epsilon": self.epsilon,
                "centered": self.centered}


class Adadelta(Optimizer):
    """Keras 3's Adadelta: accumulated squared gradients and updates set each weight's step size."""

    slot_names = ("accumulated_grad", "accumulated_delta_var")

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.rho = _fraction(rho, "Adadelta rho")
        self.epsilon = arguments.real(epsilon, "Adadelta epsilon", low=0.0, low_open=True)

    def update(self, params, grads, lr):
        xp = self.backend.xp
        rho, eps = self.rho, self.epsilon
        acc_grad, acc_delta = self._slots["accumulated_grad"], self._slots["accumulated_delta_var"]
        acc_grad *= rho
        acc_grad += (1 - rho) * (grads * grads)
        delta = -xp.sqrt(acc_delta + eps) * grads / xp.sqrt(acc_grad + eps)
        acc_delta *= rho
        acc_delta += (1 - rho) * (delta * delta)
        params += lr * delta

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


_OPTIMIZERS = {"adam": Adam, "sgd": SGD, "adamw": AdamW, "rmsprop": RMSprop, "adadelta": Adadelta}
_BY_CLASS_NAME = {cls.__name__: cls for cls in _OPTIMIZERS.values()}  # how Keras files name them


def class_named(name):
    """The optimizer class called `name` ("Adam", as a Keras file names it), or None."""
    return _BY_CLASS_NAME.get(name)


def get(optimizer):
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        return optimizer()
    if isinstance(optimizer, str) and optimizer.lower() in _OPTIMIZERS:
        return _OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(_OPTIMIZERS)} or pass an instance")
