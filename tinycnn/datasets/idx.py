"""Reader and writer for the IDX file format (the format MNIST ships in).

An IDX file is::

    magic   : 4 bytes = 0x00 0x00 <type code> <number of dims>
    dims    : <number of dims> big-endian uint32 sizes
    payload : prod(dims) values of the given type, big-endian, C order

Type codes: 0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64.  Files may be gzip-compressed; compression is
detected from the gzip magic bytes (1f 8b), not from the file name.
"""

import gzip
import os
import zlib

import numpy as np

from ..errors import DatasetError

__all__ = ["read_idx", "write_idx", "IDX_DTYPES"]

#: IDX type code -> big-endian numpy dtype of the payload.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_CODE_BY_KIND = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"


def _describe(src, name):
    if name is not None:
        return str(name)
    if isinstance(src, (str, bytes, os.PathLike)):
        return os.fsdecode(src)
    return str(getattr(src, "name", "<file object>"))


def read_idx(path_or_fileobj, name=None):
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    ``path_or_fileobj`` is a path or a binary file object.  ``name`` is used
    in error messages (defaults to the path or the file object's ``name``).
    The returned array is writable, C-contiguous and in native byte order;
    its shape is the dims stored in the file.  Raises
    :class:`~tinycnn.datasets.DatasetError` naming the file when it is not a
    well-formed IDX file.
    """
    label = _describe(path_or_fileobj, name)
    try:
        if isinstance(path_or_fileobj, (str, bytes, os.PathLike)):
            with open(path_or_fileobj, "rb") as f:
                raw = f.read()
        else:
            raw = path_or_fileobj.read()
    except OSError as exc:
        raise DatasetError(f"{label}: cannot read IDX file: {exc}") from exc
    if not isinstance(raw, (bytes, bytearray)):
        raise DatasetError(f"{label}: file object must be opened in binary mode")

    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(
                f"{label}: corrupt or truncated gzip data: {exc}") from exc

    return _parse_idx(bytes(raw), label)


def _parse_idx(raw, label):
    if len(raw) < 4:
        raise DatasetError(
            f"{label}: not an IDX file: only {len(raw)} bytes, "
            "expected at least a 4-byte magic number")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise DatasetError(
            f"{label}: not an IDX file: bad magic number 0x{raw[:4].hex()} "
            "(expected 0x0000TTNN with type TT in 08,09,0b,0c,0d,0e)")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(
            f"{label}: truncated IDX header: {ndim} dims need {header_len} "
            f"header bytes, file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = header_len + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DatasetError(
            f"{label}: IDX payload {what}: dims {dims} of type 0x{code:02x} "
            f"need {expected - header_len} payload bytes, file has "
            f"{len(raw) - header_len}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def write_idx(path_or_fileobj, array, compress=None):
    """Write ``array`` as an IDX file.

    The array's dtype must be one of uint8, int8, int16, int32, float32 or
    float64 and it must have 1 to 255 dims.  ``compress`` selects gzip; by
    default a path ending in ``.gz`` is compressed and anything else is not
    (file objects are written uncompressed unless ``compress=True``).
    """
    a = np.asarray(array)
    key = (a.dtype.kind, a.dtype.itemsize)
    if key not in _CODE_BY_KIND:
        raise ValueError(
            f"dtype {a.dtype} cannot be stored in IDX "
            "(use uint8, int8, int16, int32, float32 or float64)")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dims, array has {a.ndim}")
    if any(d >= 2 ** 32 for d in a.shape):
        raise ValueError(f"IDX dims must fit in uint32, got shape {a.shape}")
    code = _CODE_BY_KIND[key]
    header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()
    blob = header + payload

    is_path = isinstance(path_or_fileobj, (str, bytes, os.PathLike))
    if compress is None:
        compress = is_path and os.fsdecode(path_or_fileobj).endswith(".gz")
    if compress:
        blob = gzip.compress(blob, mtime=0)
    if is_path:
        with open(path_or_fileobj, "wb") as f:
            f.write(blob)
    else:
        path_or_fileobj.write(blob)
