"""Weight regularizers (Keras 3's L1, L2, L1L2): a penalty added to the training loss, and its
gradient added to the weight's gradient.

`penalty(w)` is what Keras adds to the loss (l1 * sum|w| + l2 * sum w^2); `gradient(w)` its
derivative (l1 * sign(w) + 2 l2 w). Both run on the weight's device (NumPy or CuPy).
"""
import math

from .arrays import get_array_module

__all__ = ["Regularizer", "L1", "L2", "L1L2", "l1", "l2", "l1_l2", "get"]


def _coefficient(value, name):
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"regularizer {name} must be a non-negative number, got {value!r}")
    return value


class Regularizer:
    def penalty(self, w):
        raise NotImplementedError

    def gradient(self, w):
        raise NotImplementedError

    def __call__(self, w):
        """The penalty as a Python float (Keras's `regularizer(x)`)."""
        return float(self.penalty(w))

    def get_config(self):
        return {}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.get_config().items())})"


class L1L2(Regularizer):
    def __init__(self, l1=0.0, l2=0.0):
        self.l1, self.l2 = _coefficient(l1, "l1"), _coefficient(l2, "l2")

    def penalty(self, w):
        xp = get_array_module(w)
        total = 0.0
        if self.l1:
            total = total + self.l1 * xp.abs(w).sum()
        if self.l2:
            total = total + self.l2 * (w * w).sum()
        return total

    def gradient(self, w):
        xp = get_array_module(w)
        grad = xp.zeros_like(w)
        if self.l1:
            grad += w.dtype.type(self.l1) * xp.sign(w)
        if self.l2:
            grad += w.dtype.type(2 * self.l2) * w
        return grad

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(L1L2):
    def __init__(self, l1=0.01):
        super().__init__(l1=l1)

    def get_config(self):
        return {"l1": self.l1}


class L2(L1L2):
    def __init__(self, l2=0.01):
        super().__init__(l2=l2)

    def get_config(self):
        return {"l2": self.l2}


# Keras 3's lower-case names are the classes themselves: l1_l2() has both coefficients 0
# (Keras 2's function defaulted to 0.01 each; pass them).
l1, l2, l1_l2 = L1, L2, L1L2

_BY_NAME = {"l1": L1, "l2": L2, "l1_l2": L1L2, "L1": L1, "L2": L2, "L1L2": L1L2}


def get(identifier):
    """A Regularizer from a name ("l2"), a {"class_name", "config"} dict, a Regularizer, or None."""
    if identifier is None:
        return None
    if isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, dict) and "class_name" in identifier:
        cls = {"L1": L1, "L2": L2, "L1L2": L1L2}.get(identifier["class_name"])
        if cls is None:
            raise ValueError(f"unknown regularizer class {identifier['class_name']!r}")
        return cls(**identifier.get("config", {}))
    if isinstance(identifier, str) and identifier in _BY_NAME:
        return _BY_NAME[identifier]()
    raise ValueError(f"unknown regularizer {identifier!r}: choose l1, l2, l1_l2, or pass a tinycnn.regularizers object")
