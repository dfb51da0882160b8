"""Writing files atomically: every file tinycnn writes goes through `atomic_path` or `atomic_write`.

The data goes to a uniquely named temporary file beside the target, is flushed to disk (fsync),
and is renamed over the target in one step. A crash, an error or a concurrent writer therefore
never leaves a half-written file under the target's name: readers see the old file or the new one.
"""
import contextlib
import os
import tempfile


def _normal_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write `path`'s new content to (with any library: h5py, np.savez...).
    When the block ends without an error, the file is fsync'd, given a normal file's mode (mkstemp
    makes it private) and renamed over `path`; on an error it is removed and `path` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: a directory of that name exists")
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"cannot write {path!r}: a part of {directory!r} is a file, not a directory") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, _normal_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        _fsync_path(directory)


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """`open(path, mode)` for writing, atomically (see `atomic_path`)."""
    if not any(m in mode for m in "wx"):
        raise ValueError(f"atomic_write opens files for writing ('w' modes), got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("x", "w"), **open_kwargs) as f:
            yield f
