"""Flatten and ZeroPadding2D."""
import numpy as np

from .. import arguments
from ..errors import ShapeError
from .base import Layer, channels_last


class Flatten(Layer):
    thread_safe = True  # see Layer.thread_safe
    base_name = "flatten"

    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        channels_last(data_format, "Flatten")

    def compute_output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training):
        return x.reshape(x.shape[0], -1), None

    def backward(self, saved, dy, need_input_grad=True):
        return dy.reshape((dy.shape[0],) + self.input_shape), {}


def _padding_pairs(padding):
    """((top, bottom), (left, right)) from an int, a pair (symmetric height, width) or two pairs."""
    what = "ZeroPadding2D padding"
    try:
        if not hasattr(padding, "__iter__"):
            return (arguments.integer_tuple(padding, what, 2, minimum=0),) * 2
        parts = tuple(padding)
        if len(parts) == 2:  # (h, w) means ((h, h), (w, w))
            return tuple(arguments.integer_tuple(p, what, 2, minimum=0) for p in parts)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{what} must be an int, (h, w) or ((top, bottom), (left, right)) of ints >= 0, got {padding!r}")


class ZeroPadding2D(Layer):
    """Rows and columns of zeros around each image."""

    thread_safe = True  # see Layer.thread_safe
    base_name = "zero_padding2d"

    def __init__(self, padding=(1, 1), data_format=None, **kwargs):
        super().__init__(**kwargs)
        channels_last(data_format, "ZeroPadding2D")
        self.padding = _padding_pairs(padding)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"ZeroPadding2D {self.name} needs (h, w, c) inputs, got {input_shape}")
        (top, bottom), (left, right) = self.padding
        h, w, c = input_shape
        return (h + top + bottom, w + left + right, c)

    def forward(self, x, training):
        (top, bottom), (left, right) = self.padding
        return self.xp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), None

    def backward(self, saved, dy, need_input_grad=True):
        (top, _), (left, _) = self.padding
        h, w, _ = self.input_shape
        return self.xp.ascontiguousarray(dy[:, top : top + h, left : left + w, :]), {}
