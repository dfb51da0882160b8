"""Elementwise activations as (forward, backward) pairs; backward takes the forward's output."""
from .backend import get_array_module
from .kernels_reference import relu_backward, relu_forward


def _linear(x):
    return x


def _linear_backward(dy, y):
    return dy


def _sigmoid(x):
    xp = get_array_module(x)
    return 0.5 * (xp.tanh(0.5 * x) + 1)  # overflow-free form of 1 / (1 + exp(-x))


def _sigmoid_backward(dy, y):
    return dy * y * (1 - y)


def _tanh(x):
    return get_array_module(x).tanh(x)


def _tanh_backward(dy, y):
    return dy * (1 - y * y)


def softmax(x, axis=-1):
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(dy, y, axis=-1):
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


ACTIVATIONS = {
    "linear": (_linear, _linear_backward),
    "relu": (relu_forward, relu_backward),
    "sigmoid": (_sigmoid, _sigmoid_backward),
    "tanh": (_tanh, _tanh_backward),
    "softmax": (softmax, softmax_backward),
}


def get(name, kernels=None):
    """(forward, backward) for an activation name (None means linear). ReLU comes from the
    backend's kernels when given, so the CPU and GPU paths use their fast versions."""
    key = "linear" if name is None else name
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(sorted(ACTIVATIONS))}")
    if key == "relu" and kernels is not None:
        return kernels.relu_forward, kernels.relu_backward
    return ACTIVATIONS[key]
