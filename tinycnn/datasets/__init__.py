"""Dataset loaders for tinycnn.

Importing this package never touches the network or the disk; data is only
fetched when a loader such as :func:`tinycnn.datasets.mnist.load_data` is
called.
"""


class DatasetError(RuntimeError):
    """A dataset could not be read, verified or obtained from any source."""


# DatasetError must exist before the submodules are imported: they import it
# from this package.
from . import idx  # noqa: E402
from . import mnist  # noqa: E402

__all__ = ["DatasetError", "idx", "mnist"]
