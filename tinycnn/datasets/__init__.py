"""Dataset loaders for tinycnn: `mnist` and `fashion_mnist` (`load_data()` as in Keras), the IDX
reader and writer (`idx`), and what the loaders share (`sources`).

Importing this package never touches the network or the disk; data is only fetched when a
loader such as :func:`tinycnn.datasets.mnist.load_data` is called.
"""
from ..errors import DatasetError
from . import fashion_mnist, idx, mnist, sources

__all__ = ["DatasetError", "fashion_mnist", "idx", "mnist", "sources"]
