"""Dataset loaders for tinycnn.

Importing this package never touches the network or the disk; data is only fetched when a loader
such as :func:`tinycnn.datasets.mnist.load_data` is called.
"""
from ..errors import DatasetError
from . import idx, mnist

__all__ = ["DatasetError", "idx", "mnist"]
