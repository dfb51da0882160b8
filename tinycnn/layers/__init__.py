"""Layers with Keras names, defaults and NHWC layout, each with its own forward and backward pass.

The layer protocol is in `base` (read it first); one module per kind of layer, as in Keras.
"""
from .base import ActivatedLayer, Input, InputLayer, Layer
from .convolutional import Conv2D, DepthwiseConv2D, SeparableConv2D
from .core import ELU, Activation, Dense, LeakyReLU, ReLU, Softmax
from .merging import Add, Concatenate, add, concatenate
from .normalization import BatchNormalization
from .pooling import AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D, MaxPooling2D
from .preprocessing import Rescaling
from .regularization import Dropout
from .reshaping import Flatten, ZeroPadding2D

__all__ = [
    "Layer", "ActivatedLayer", "Input", "InputLayer",
    "Conv2D", "DepthwiseConv2D", "SeparableConv2D",
    "Dense", "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax",
    "Add", "Concatenate", "add", "concatenate",
    "BatchNormalization", "Dropout",
    "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "Flatten", "ZeroPadding2D", "Rescaling",
]
