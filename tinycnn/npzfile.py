"""Checked, bounded reading of `.npz` archives (weights, checkpoints, dataset caches).

Nothing in the file is trusted: each array's `.npy` header (version, dtype, shape) is checked
against what the caller expects before a byte of its data is read, members nobody asks for are
never read, object (pickle) arrays are never loaded, and reading a member to its end verifies
the zip's CRC-32. A crafted file therefore cannot make tinycnn allocate more than the caller
allows, and every problem is raised as the caller's error class, naming the file and member.
"""
import errno
import json
import math
import os
import tokenize
import zipfile
import zlib

import numpy as np

from .errors import WeightsFileError

__all__ = ["NpzReader", "ZIP_ERRORS"]

# What zipfile raises on a damaged archive: a flipped "encrypted" flag is a RuntimeError, an
# unknown version or compression method a NotImplementedError, a corrupt deflated member zlib.error.
ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError, OverflowError,
              zlib.error)


def _system_failure(exc):
    """Whether `exc` is an OSError that says the system could not read the file (permissions, a
    failing disk), as opposed to one a damaged file provokes (zipfile seeking to a bad offset gets
    EINVAL) or another error of a damaged file. Those pass through: the file may be fine."""
    return isinstance(exc, OSError) and (isinstance(exc, PermissionError) or exc.errno == errno.EIO)


class NpzReader:
    """An `.npz` file opened for checked reading, one member at a time; a context manager."""

    def __init__(self, path, error=WeightsFileError, what="weights file"):
        self.path, self.error = os.fspath(path), error
        if not os.path.exists(self.path):
            raise error(f"{what} {self.path!r} does not exist")
        if os.path.isdir(self.path):
            raise error(f"{self.path!r} is a directory, not a {what}")
        try:
            self.zip = zipfile.ZipFile(self.path)
        except ZIP_ERRORS as exc:
            if _system_failure(exc):
                raise
            raise error(f"{self.path!r} is not a readable .npz file (corrupt or truncated, or another "
                        f"format?): {exc}") from None
        self.members = {info.filename[:-4]: info for info in self.zip.infolist() if info.filename.endswith(".npy")}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.zip.close()

    def __contains__(self, key):
        return key in self.members

    def keys(self):
        return list(self.members)

    def array(self, key, shape=None, kinds="f", max_bytes=None):
        """The array stored under `key`, after checking its header: dtype kind in `kinds`, and the
        given `shape` (or at most `max_bytes` of data)."""
        info = self.members.get(key)
        if info is None:
            raise self.error(f"{self.path!r} is missing {key}")
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    found_shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    found_shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise self.error(f"{self.path!r}: {key} uses .npy format {version}, which tinycnn does not read")
                nbytes = self._check_header(key, found_shape, dtype, shape, kinds, max_bytes)
                data = f.read(nbytes)
                if len(data) != nbytes or f.read(1):  # reading to the end also verifies the member's CRC
                    raise self.error(f"{self.path!r}: {key} does not hold the {nbytes} bytes its header declares")
            return np.frombuffer(data, dtype=dtype).reshape(found_shape, order="F" if fortran else "C").copy()
        except self.error:
            raise
        except ZIP_ERRORS + (TypeError, SyntaxError, tokenize.TokenError) as exc:  # numpy tokenizes the header
            if _system_failure(exc):
                raise
            raise self.error(f"{self.path!r}: {key} is corrupt or truncated: {exc}") from None

    def _check_header(self, key, found_shape, dtype, shape, kinds, max_bytes):
        """The member's data size in bytes, once its header is acceptable."""
        if dtype.hasobject or dtype.kind not in kinds:
            raise self.error(f"{self.path!r}: {key} holds {dtype} values, not the kind tinycnn stores there")
        if not all(isinstance(d, int) and d >= 0 for d in found_shape):
            raise self.error(f"{self.path!r}: {key} declares an impossible shape {tuple(found_shape)}")
        if shape is not None and tuple(found_shape) != tuple(shape):
            raise self.error(f"{self.path!r}: {key} has shape {tuple(found_shape)}, expected {tuple(shape)}")
        nbytes = math.prod(found_shape) * dtype.itemsize  # Python integers: no overflow
        if max_bytes is not None and nbytes > max_bytes:
            raise self.error(f"{self.path!r}: {key} declares shape {tuple(found_shape)}, larger than the "
                             f"{max_bytes} bytes allowed there")
        return nbytes

    def json(self, key, max_bytes):
        """A JSON document stored as a 0-d string array (at most `max_bytes`)."""
        value = self.array(key, shape=(), kinds="U", max_bytes=max_bytes)
        try:
            return json.loads(str(value[()]))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise self.error(f"{self.path!r}: {key} is not valid JSON: {exc}") from None
