"""Rescaling: inputs mapped to x * scale + offset inside the model (e.g. pixels to [0, 1])."""
from .. import arguments
from .base import Layer


class Rescaling(Layer):
    thread_safe = True  # see Layer.thread_safe
    base_name = "rescaling"

    def __init__(self, scale, offset=0.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = arguments.real(scale, "Rescaling scale")
        self.offset = arguments.real(offset, "Rescaling offset")

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}

    def forward(self, x, training):
        y = x * x.dtype.type(self.scale)
        if self.offset:
            y += x.dtype.type(self.offset)
        return y, None

    def backward(self, saved, dy, need_input_grad=True):
        return (dy * dy.dtype.type(self.scale) if need_input_grad else None), {}
