"""Keras's `keras.models` namespace: the model classes and the model-file functions."""
from .model import Model, Sequential

__all__ = ["Model", "Sequential"]
