"""What every IDX image dataset loader shares: the checksummed cache, IDX directories, download
mirrors, and the loop that tries each source until one gives verified data.

A dataset is described by an `IdxDataset` (its name, the SHA-256 of every array, the four IDX
files and their mirrors); `load` returns ``((x_train, y_train), (x_test, y_test))`` like Keras.
Sources are tried in order: the cache ``$TINYCNN_HOME/datasets/<name>.npz`` (default
``~/.cache/tinycnn/datasets``), then the caller's list. Whatever a source gives is checked
against the known SHA-256 of each array before it is used and cached; the cache is written
atomically (tinycnn.files), and a cache that fails its check is deleted and rebuilt.
"""
import dataclasses
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request

import numpy as np

from ..errors import DatasetError
from ..files import atomic_write
from ..npzfile import NpzReader
from .idx import read_idx

ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")

#: The standard IDX file of each array (MNIST's names, which Fashion-MNIST shares).
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

#: Seconds to wait on a mirror before giving up on it.
MIRROR_TIMEOUT = 10


@dataclasses.dataclass
class IdxDataset:
    """An image dataset shipped as four IDX files."""

    name: str  # the cache is <name>.npz
    title: str  # how messages name it
    expected_sha256: dict  # array name -> SHA-256 of arr.tobytes() (uint8, C order)
    expected_shapes: dict  # array name -> shape
    file_md5: dict = dataclasses.field(default_factory=dict)  # array name -> published MD5 of its .gz (if any)
    mirrors: tuple = ()  # base URLs serving the four .gz files

    @property
    def cache_name(self):
        return f"{self.name}.npz"


def progress(verbose, msg):
    if verbose:
        print(f"tinycnn: {msg}", file=sys.stderr, flush=True)


def default_cache_dir():
    """``$TINYCNN_HOME/datasets``, or ``~/.cache/tinycnn/datasets``."""
    home = os.environ.get("TINYCNN_HOME")
    if home:
        return os.path.join(os.path.expanduser(home), "datasets")
    return os.path.join(os.path.expanduser("~"), ".cache", "tinycnn", "datasets")


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_arrays(dataset, arrays):
    """Check dtype, shape and SHA-256 of the four arrays; DatasetError naming the first problem."""
    for key in ARRAY_NAMES:
        if key not in arrays:
            raise DatasetError(f"array {key!r} is missing")
        a = arrays[key]
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
            raise DatasetError(f"{key} has dtype {getattr(a, 'dtype', type(a).__name__)}, expected uint8")
        if a.shape != tuple(dataset.expected_shapes[key]):
            raise DatasetError(f"{key} has shape {a.shape}, expected {dataset.expected_shapes[key]}")
        digest = sha256_hex(np.ascontiguousarray(a).tobytes())
        if digest != dataset.expected_sha256[key]:
            raise DatasetError(f"{key} SHA-256 mismatch: got {digest}, expected {dataset.expected_sha256[key]}")


def as_result(arrays):
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


# -- the cache -------------------------------------------------------------------------------------
class CacheInaccessible(DatasetError):
    """The cache file exists but cannot be opened (permissions, a directory in its place): its
    content may be fine, so it is reported and never deleted."""


def load_cache(dataset, cache_file):
    """The cached arrays, verified; DatasetError if the content is unusable, CacheInaccessible if
    the file cannot be opened or read (its content may be fine: it is never deleted then). Each
    array's header is checked against the dataset's shape before its data is read."""
    try:
        with open(cache_file, "rb"):
            pass
    except OSError as exc:
        raise CacheInaccessible(f"cannot open {cache_file} ({type(exc).__name__}: {exc.strerror or exc}); it was "
                                "left as it is: fix its permissions, or remove it to rebuild it") from None
    try:
        with NpzReader(cache_file, error=DatasetError, what="dataset cache") as npz:
            if set(npz.keys()) != set(ARRAY_NAMES):
                raise DatasetError(f"unexpected arrays {sorted(npz.keys())}, expected {sorted(ARRAY_NAMES)}")
            arrays = {k: npz.array(k, shape=dataset.expected_shapes[k], kinds="u") for k in ARRAY_NAMES}
    except OSError as exc:  # the system failed to read it (NpzReader lets only those through): not corruption
        raise CacheInaccessible(f"cannot read {cache_file} ({exc.strerror or exc}); it was left as it is") from None
    verify_arrays(dataset, arrays)
    return arrays


def save_cache(cache_file, arrays):
    """Write the cache atomically: a crash leaves the old cache or none, never half a file."""
    with atomic_write(cache_file, "wb") as f:
        np.savez(f, **{k: arrays[k] for k in ARRAY_NAMES})


# -- a directory of IDX files ----------------------------------------------------------------------------
def find_idx_file(directory, base):
    for cand in (base + ".gz", base, base.replace("-idx", ".idx") + ".gz", base.replace("-idx", ".idx")):
        full = os.path.join(directory, cand)
        if os.path.isfile(full):
            return full
    return None


def load_idx_dir(path):
    """Read the four standard IDX files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, each also un-gzipped) from
    directory ``path``. Checks the structure only (uint8 images (N, H, W) and labels (N,) with
    matching N), not which dataset it is. Returns a dict keyed x_train, y_train, x_test, y_test."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise DatasetError(f"{directory}: not a directory")
    files = {key: find_idx_file(directory, IDX_NAMES[key]) for key in ARRAY_NAMES}
    missing = [IDX_NAMES[key] + ".gz" for key in ARRAY_NAMES if files[key] is None]
    if missing:
        raise DatasetError(f"{directory}: missing IDX file(s) {', '.join(missing)} (gzipped or not)")
    arrays = {key: read_idx(files[key]) for key in ARRAY_NAMES}
    for split in ("train", "test"):
        xk, yk = "x_" + split, "y_" + split
        x, y = arrays[xk], arrays[yk]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DatasetError(f"{files[xk]}: expected uint8 images with 3 dims, got {x.dtype} with shape {x.shape}")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise DatasetError(f"{files[yk]}: expected uint8 labels with 1 dim, got {y.dtype} with shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise DatasetError(f"{files[xk]} has {x.shape[0]} images but {files[yk]} has {y.shape[0]} labels")
    return arrays


# -- download mirrors ------------------------------------------------------------------------------------
def download(url, dest, timeout):
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


def fetch_mirrors(dataset, workdir, verbose):
    """Download the four IDX files from the first mirror that has each (checked by the published
    MD5 where the dataset has one); returns the arrays. An unreachable mirror is tried once."""
    errors, dead = [], set()
    for key in ARRAY_NAMES:
        fname = IDX_NAMES[key] + ".gz"
        md5 = dataset.file_md5.get(key)
        dest = os.path.join(workdir, fname)
        for mirror in dataset.mirrors:
            if mirror in dead:
                continue
            url = mirror + fname
            progress(verbose, f"downloading {url}")
            try:
                got = download(url, dest, MIRROR_TIMEOUT)
            except urllib.error.HTTPError as exc:
                errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
                continue
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")  # unreachable, timed out, cut short
                dead.add(mirror)
                continue
            if md5 is not None and got != md5:
                errors.append(f"{url}: MD5 {got} does not match published {md5}")
                continue
            break
        else:
            raise DatasetError(f"no mirror served {fname}: " + "; ".join(errors))
    progress(verbose, f"converting {dataset.title} IDX files")
    return load_idx_dir(workdir)


# -- the loop over sources ----------------------------------------------------------------------------
def load(dataset, sources, cache_dir=None, verbose=True, hint=""):
    """``((x_train, y_train), (x_test, y_test))`` from the cache or the first of `sources` that gives
    verified data. `sources`: (short name, detail, fetch(workdir, verbose) -> arrays) triples, tried
    in order, each with a fresh temporary working directory. Raises DatasetError listing every
    source tried and why it failed; `hint` is appended (how to supply the data by hand)."""
    if cache_dir is not None and not isinstance(cache_dir, (str, bytes, os.PathLike)):
        raise TypeError(f"cache_dir must be a path, got {type(cache_dir).__name__}")
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = os.path.join(cache_dir, dataset.cache_name)
    failures = []
    try:
        os.stat(cache_file)
        cached = True
    except FileNotFoundError:
        cached = False
    except OSError as exc:  # e.g. a cache directory that cannot be searched: say so, do not call it absent
        raise CacheInaccessible(f"cannot reach the cache {cache_file} ({exc.strerror or exc}); fix the permissions "
                                "of its directory or pass another cache_dir") from None
    if cached:
        try:
            return as_result(load_cache(dataset, cache_file))
        except CacheInaccessible:
            raise
        except DatasetError as exc:
            progress(verbose, f"cached {dataset.title} at {cache_file} is corrupt ({exc}); deleting it and rebuilding")
            failures.append(f"cache {cache_file}: {exc} (deleted)")
            try:
                os.remove(cache_file)
            except OSError:
                pass
    else:
        failures.append(f"cache {cache_file}: not present")

    for short, detail, fetch in sources:
        workdir = tempfile.mkdtemp(prefix=f"tinycnn-{dataset.name}-")
        try:
            arrays = fetch(workdir, verbose)
            verify_arrays(dataset, arrays)
        except DatasetError as exc:
            failures.append(f"{short} {detail}: {exc}")
            progress(verbose, f"{dataset.title} from {short} failed: {exc}")
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        try:
            save_cache(cache_file, arrays)
            progress(verbose, f"cached {dataset.title} at {cache_file}")
        except OSError as exc:
            progress(verbose, f"could not write cache {cache_file}: {exc}")
        return as_result(arrays)

    lines = "\n".join(f"  - {f}" for f in failures)
    raise DatasetError(
        f"could not load {dataset.title} from any source. Tried:\n{lines}\n"
        "To supply the data by hand, either pass path= a directory holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzipped or not), "
        f"or put a verified {dataset.cache_name} in {cache_dir} (or set TINYCNN_HOME / cache_dir=).{hint}")
