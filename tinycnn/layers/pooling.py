"""Pooling: max and average over windows, and over the whole image."""
from ..errors import ShapeError
from ..kernels.reference import output_hw
from .base import Layer, channels_last, pair, padding_mode, window_pads


class _Pooling2D(Layer):
    """Windows of `pool_size` moving by `strides` (default: the pool size), 'valid' or 'same' padding."""

    thread_safe = True  # see Layer.thread_safe

    def __init__(self, pool_size=2, strides=None, padding="valid", data_format=None, **kwargs):
        super().__init__(**kwargs)
        kind = type(self).__name__
        channels_last(data_format, kind)
        self.pool_size = pair(pool_size, f"{kind} pool_size")
        self.strides = self.pool_size if strides is None else pair(strides, f"{kind} strides")
        self.padding = padding_mode(padding, kind)

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides, "padding": self.padding}

    def compute_output_shape(self, input_shape):
        kind = type(self).__name__
        if len(input_shape) != 3:
            raise ShapeError(f"{kind} {self.name} needs (height, width, channels) inputs, got {input_shape}")
        h, w, c = input_shape
        self.pads = window_pads(self.padding, (h, w), self.pool_size, self.strides)
        oh, ow = output_hw(h, w, *self.pool_size, self.strides, self.pads)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{kind} {self.name}: pool {self.pool_size} is larger than input {input_shape}")
        return (oh, ow, c)


class MaxPooling2D(_Pooling2D):
    """Max pooling; the argmax is kept for an exact backward (ties go to the first maximum)."""

    base_name = "max_pooling2d"

    def forward(self, x, training):
        y, argmax = self.kernels.maxpool_forward(x, self.pool_size, self.strides, self.pads)
        return y, (argmax, x.shape)

    def backward(self, saved, dy, need_input_grad=True):
        argmax, x_shape = saved
        return self.kernels.maxpool_backward(dy, argmax, x_shape, self.pool_size, self.strides, self.pads), {}


class AveragePooling2D(_Pooling2D):
    """Average pooling; with 'same' padding each window averages only its real pixels, as in Keras."""

    base_name = "average_pooling2d"

    def forward(self, x, training):
        return self.kernels.avgpool_forward(x, self.pool_size, self.strides, self.pads), x.shape

    def backward(self, saved, dy, need_input_grad=True):
        return self.kernels.avgpool_backward(dy, saved, self.pool_size, self.strides, self.pads), {}


class _GlobalPooling2D(Layer):
    thread_safe = True  # see Layer.thread_safe

    def __init__(self, data_format=None, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        channels_last(data_format, type(self).__name__)
        if keepdims:
            raise ValueError(f"{type(self).__name__} supports keepdims=False only")

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"{type(self).__name__} {self.name} needs (h, w, c) inputs, got {input_shape}")
        return (input_shape[2],)


class GlobalAveragePooling2D(_GlobalPooling2D):
    """Mean over height and width: (N, H, W, C) -> (N, C)."""

    base_name = "global_average_pooling2d"

    def forward(self, x, training):
        return self.kernels.global_avgpool_forward(x), x.shape

    def backward(self, saved, dy, need_input_grad=True):
        return self.kernels.global_avgpool_backward(dy, saved), {}


class GlobalMaxPooling2D(_GlobalPooling2D):
    """Maximum over height and width: (N, H, W, C) -> (N, C); the gradient goes to the first maximum."""

    base_name = "global_max_pooling2d"

    def forward(self, x, training):
        n, h, w, c = x.shape
        flat = x.reshape(n, h * w, c)
        where = flat.argmax(axis=1)  # (N, C): the first maximum of each channel
        return self.xp.take_along_axis(flat, where[:, None, :], axis=1)[:, 0, :], (where, x.shape)

    def backward(self, saved, dy, need_input_grad=True):
        where, x_shape = saved
        n, h, w, c = x_shape
        xp = self.xp
        dx = xp.zeros((n, h * w, c), dtype=dy.dtype)
        dx[xp.arange(n)[:, None], where, xp.arange(c)[None, :]] = dy
        return dx.reshape(x_shape), {}
