"""Layers that merge several inputs: Add (residual connections) and Concatenate (branches)."""
from .. import arguments
from ..errors import ShapeError
from .base import Layer


class Add(Layer):
    """The sum of its inputs, which must all have the same shape."""

    thread_safe = True  # see Layer.thread_safe
    base_name = "add"
    multi_input = True

    def compute_output_shape(self, input_shape):
        first = tuple(input_shape[0])
        for shape in input_shape[1:]:
            if tuple(shape) != first:
                raise ShapeError(f"Add {self.name} needs inputs of one shape, got {', '.join(map(str, input_shape))}")
        return first

    def forward(self, xs, training):
        y = xs[0] + xs[1]
        for x in xs[2:]:
            y += x
        return y, None

    def backward(self, saved, dy, need_input_grad=True):
        return [dy] * len(self.input_shape), {}


class Concatenate(Layer):
    """Its inputs joined along `axis` (default: the last, the channels); other axes must agree."""

    thread_safe = True  # see Layer.thread_safe
    base_name = "concatenate"
    multi_input = True

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = arguments.integer(axis, "Concatenate axis")
        if self.axis == 0:
            raise ValueError("Concatenate cannot join along axis 0, the batch axis")

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}

    def compute_output_shape(self, input_shape):
        rank = len(input_shape[0])
        axis = self.axis - 1 if self.axis > 0 else self.axis + rank  # per-sample axis
        if not 0 <= axis < rank or any(len(s) != rank for s in input_shape):
            raise ShapeError(f"Concatenate {self.name} (axis={self.axis}) got inputs {', '.join(map(str, input_shape))}")
        for shape in input_shape:
            if [d for i, d in enumerate(shape) if i != axis] != [d for i, d in enumerate(input_shape[0]) if i != axis]:
                raise ShapeError(f"Concatenate {self.name} needs inputs that agree on every axis but {self.axis}, "
                                 f"got {', '.join(map(str, input_shape))}")
        self._sample_axis = axis
        out = list(input_shape[0])
        out[axis] = sum(s[axis] for s in input_shape)
        return tuple(out)

    def forward(self, xs, training):
        return self.xp.concatenate(xs, axis=self._sample_axis + 1), None

    def backward(self, saved, dy, need_input_grad=True):
        axis = self._sample_axis + 1
        bounds, start = [], 0
        for shape in self.input_shape:
            bounds.append((start, start + shape[self._sample_axis]))
            start += shape[self._sample_axis]
        index = [slice(None)] * dy.ndim
        grads = []
        for lo, hi in bounds:
            index[axis] = slice(lo, hi)
            grads.append(self.xp.ascontiguousarray(dy[tuple(index)]))
        return grads, {}


def add(inputs, **kwargs):
    """Keras's functional shortcut: `add([x, y])` is `Add()([x, y])`."""
    return Add(**kwargs)(inputs)


def concatenate(inputs, axis=-1, **kwargs):
    """Keras's functional shortcut: `concatenate([x, y])` is `Concatenate()([x, y])`."""
    return Concatenate(axis=axis, **kwargs)(inputs)
