"""Fashion-MNIST (Zalando's 28x28 clothing images), loaded like
``keras.datasets.fashion_mnist.load_data()``.

:func:`load_data` returns ``((x_train, y_train), (x_test, y_test))`` as uint8 arrays of shapes
(60000, 28, 28), (60000,), (10000, 28, 28), (10000,); the labels are `CLASS_NAMES`.

Sources, tried in order until one gives data that passes verification:

1. the cache, ``$TINYCNN_HOME/datasets/fashion_mnist.npz`` (default ``~/.cache/tinycnn/datasets/``);
2. ``path=``: a directory holding the four standard IDX files;
3. the IDX files of Debian's package ``dataset-fashion-mnist``, if it is installed
   (``/usr/share/datasets/fashion-mnist``);
4. Debian's package archive: the ``.deb`` of ``dataset-fashion-mnist``, downloaded (never
   installed) from deb.debian.org and checked by its SHA-256, or, failing that, with
   ``apt-get download`` through the machine's configured Debian mirror. The IDX files are taken
   from its ``data.tar.xz`` with the standard library alone. This works on a machine that
   reaches only the package registries;
5. the public mirrors of the IDX files.

Every source's arrays are checked against the known SHA-256 of each array before they are used,
then written to the cache atomically. (The mirrors' files are checked that way only: Debian's
copies are recompressed, so the per-file MD5s published upstream do not apply to them.)
"""
import http.client
import io
import os
import subprocess
import tarfile

from ..errors import DatasetError
from . import sources
from .sources import IDX_NAMES, IdxDataset, default_cache_dir, progress

__all__ = ["load_data", "CLASS_NAMES", "DATASET", "default_cache_dir", "DatasetError"]

#: The names of the ten classes, by label.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")

#: SHA-256 of ``arr.tobytes()`` for each array (uint8, C order).
EXPECTED_SHA256 = {
    "x_train": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    "y_train": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "x_test": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
    "y_test": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}
EXPECTED_SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}

MIRRORS = (
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)

#: Where Fashion-MNIST comes from and how each array is checked.
DATASET = IdxDataset("fashion_mnist", "Fashion-MNIST", EXPECTED_SHA256, EXPECTED_SHAPES, {}, MIRRORS)

#: Where Debian's package installs the IDX files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEB_URL = ("http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
           "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb")
DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
DEB_TIMEOUT = 120  # seconds for the 31 MB download
APT_TIMEOUT = 300


def read_ar_member(path, wanted_prefix):
    """(name, bytes) of the first member of ar archive `path` (a .deb) whose name starts with
    `wanted_prefix`. The ar format: an 8-byte magic, then per member a 60-byte header (name,
    dates, mode, decimal size) and the data, padded to an even length."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DatasetError(f"{path}: not a .deb (ar) archive")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise DatasetError(f"{path}: no member named {wanted_prefix}* in the archive")
            if header[58:60] != b"`\n":
                raise DatasetError(f"{path}: corrupt ar member header")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise DatasetError(f"{path}: corrupt ar member size") from None
            if name.startswith(wanted_prefix):
                data = f.read(size)
                if len(data) != size:
                    raise DatasetError(f"{path}: truncated member {name}")
                return name, data
            f.seek(size + (size & 1), os.SEEK_CUR)


def load_deb(deb_path, workdir, verbose=False):
    """The four arrays from the IDX files inside a dataset-fashion-mnist .deb."""
    name, data = read_ar_member(deb_path, "data.tar")
    progress(verbose, f"extracting Fashion-MNIST from {os.path.basename(deb_path)}:{name}")
    target = os.path.join(workdir, "idx")
    os.makedirs(target, exist_ok=True)
    wanted = {IDX_NAMES[key] + ".gz" for key in IDX_NAMES}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # xz and gzip by the standard library
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted and "fashion-mnist" in member.name:
                    with open(os.path.join(target, base), "wb") as out:
                        out.write(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{deb_path}: cannot read {name}: {exc}") from exc
    return sources.load_idx_dir(target)


def fetch_deb(workdir, verbose):
    """The .deb from Debian's archive over HTTP (checked by SHA-256), else by apt-get download."""
    deb = os.path.join(workdir, "dataset-fashion-mnist.deb")
    problems = []
    progress(verbose, f"downloading {DEB_URL}")
    try:
        sources.download(DEB_URL, deb, DEB_TIMEOUT)
        digest = sources.file_sha256(deb)
        if digest == DEB_SHA256:
            return load_deb(deb, workdir, verbose)
        problems.append(f"{DEB_URL}: SHA-256 {digest} does not match {DEB_SHA256}")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # urllib's errors are OSErrors
        problems.append(f"{DEB_URL}: {getattr(exc, 'reason', exc)}")
    progress(verbose, f"trying apt-get download {DEBIAN_PACKAGE}")
    apt_dir = os.path.join(workdir, "apt")
    os.makedirs(apt_dir, exist_ok=True)
    try:
        proc = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=apt_dir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=APT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        problems.append(f"apt-get download: {exc}")
    else:
        debs = [f for f in os.listdir(apt_dir) if f.endswith(".deb")]
        if proc.returncode == 0 and len(debs) == 1:
            return load_deb(os.path.join(apt_dir, debs[0]), workdir, verbose)  # checked by the arrays' hashes
        tail = proc.stdout.decode("utf-8", "replace").strip().splitlines()[-2:]
        problems.append(f"apt-get download exited {proc.returncode}: {' | '.join(tail)}")
    raise DatasetError("; ".join(problems))


def load_data(path=None, cache_dir=None, verbose=True):
    """Load Fashion-MNIST as ``((x_train, y_train), (x_test, y_test))`` (uint8).

    ``path``: a directory holding the four standard IDX files. ``cache_dir``: where
    ``fashion_mnist.npz`` is kept (default :func:`default_cache_dir`). ``verbose``: progress lines
    on stderr while downloading or converting. Raises :class:`DatasetError` listing every source
    tried and why it failed if none yields verified data."""
    tried = []
    if path is not None:
        tried.append((f"path={os.fspath(path)!r}", "(IDX files)", lambda workdir, v: sources.load_idx_dir(path)))
    if os.path.isdir(DEBIAN_DIR):
        tried.append(("installed Debian package", f"({DEBIAN_DIR})",
                      lambda workdir, v: sources.load_idx_dir(DEBIAN_DIR)))
    tried.append(("Debian archive", f"({DEBIAN_PACKAGE} .deb)", lambda workdir, v: fetch_deb(workdir, v)))
    tried.append(("public mirrors", "(" + ", ".join(MIRRORS) + ")",
                  lambda workdir, v: sources.fetch_mirrors(DATASET, workdir, v)))
    return sources.load(DATASET, tried, cache_dir, verbose,
                        hint=f" Or install Debian's package: apt-get install {DEBIAN_PACKAGE}.")
