"""Hostile and damaged files against every loader, and faults during saving.

Each crafted file must be refused with a WeightsFileError (DatasetError for datasets) that names
the problem, within bounded memory and time, leaving the model it was loaded into untouched; a
file tinycnn wrote must survive random bit flips and truncations that way too (refused, or loaded
unchanged); saves racing each other or killed midway must never leave a half-written file.
"""
import io
import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

import tinycnn as tc
from tinycnn import layers as L
from conftest import ROOT

h5py = pytest.importorskip("h5py", reason='weights files in Keras format need h5py: pip install "tinycnn[keras]"')

FORMATS = ("npz", "weights.h5", "keras")


def make(seed=1):
    inputs = tc.Input(shape=(6, 6, 1))
    x = L.Conv2D(3, 3, activation="relu", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    outputs = L.Dense(4, activation="softmax", name="dense")(L.Flatten(name="flat")(x))
    return tc.Model(inputs, outputs, seed=seed, name="victim")


def save(model, path):
    (model.save if str(path).endswith(".keras") else model.save_weights)(path)


def load(path, into=None):
    """Load `path` (into a fresh model for weights files); returns the loaded weights."""
    if str(path).endswith(".keras"):
        return tc.models.load_model(path).get_weights()  # the compile arguments are read too
    model = into or make(seed=99)
    model.load_weights(path)
    return model.get_weights()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One model saved in every format: {format: (path, bytes)} and its weights."""
    root = tmp_path_factory.mktemp("saved")
    model = make()
    files = {}
    for fmt in FORMATS:
        path = root / f"model.{fmt}"
        save(model, path)
        files[fmt] = (path, path.read_bytes())
    return files, model.get_weights()


def written(path, data):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def bounded(call, megabytes=64, seconds=10):
    """Run `call` and check Python-visible allocations (NumPy's included) and wall time."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        return call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        elapsed = time.perf_counter() - started
        assert peak < megabytes << 20, f"peak allocation {peak / 2**20:.0f} MiB"
        assert elapsed < seconds, f"took {elapsed:.1f} s"


def refused(path, message, into=None, megabytes=64):
    """`path` is refused with a WeightsFileError matching `message`, and `into` stays as it was."""
    model = into or make(seed=99)
    before = model.get_weights()
    with pytest.raises(tc.WeightsFileError, match=message):
        bounded(lambda: load(path, model if not str(path).endswith(".keras") else None), megabytes)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# -- .npz -----------------------------------------------------------------------------------------------------
def npy_bytes(array=None, header=None):
    """An .npy member: `array`'s, or a crafted `header` dict with no data after it."""
    buffer = io.BytesIO()
    if header is None:
        np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=True)
        return buffer.getvalue()
    np.lib.format.write_array_header_1_0(buffer, header)  # the magic string, the length, the header
    return buffer.getvalue()


def rewrite_npz(source, path, replace=None, drop=(), add=None, compression=zipfile.ZIP_STORED):
    """A copy of the .npz `source` with members replaced ({name: bytes}), dropped or added."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w", compression=compression) as zout:
        for name in zin.namelist():
            key = name[:-4]
            if key in drop:
                continue
            zout.writestr(name, replace.get(key, zin.read(name)))
        for key, data in add.items():
            zout.writestr(key + ".npy", data)
    return path


def meta_of(source):
    with np.load(source) as data:
        return json.loads(str(data["__meta__"][()]))


def meta_bytes(meta):
    return npy_bytes(np.array(meta if isinstance(meta, str) else json.dumps(meta)))


KERNEL_NPZ = "layer000/kernel"


def npz_kernel(data):
    return lambda s, t, name: rewrite_npz(s, t / name, {KERNEL_NPZ: data}, compression=zipfile.ZIP_DEFLATED)


def npz_meta(edit):
    return lambda s, t, name: rewrite_npz(s, t / name, {"__meta__": meta_bytes(edit(meta_of(s)))})


# (name, craft(source file, tmp dir, file name) -> path, what the refusal must say)
NPZ_CASES = [
    ("empty file", lambda s, t, n: written(t / n, b""), "neither an HDF5"),
    ("text file", lambda s, t, n: written(t / n, "hello"), "neither an HDF5"),
    ("an .npy file", lambda s, t, n: written(t / n, npy_bytes(np.ones(3))), "neither an HDF5"),
    ("a directory", lambda s, t, n: (t / n).mkdir() or t / n, "not a file"),
    ("no metadata", lambda s, t, n: rewrite_npz(s, t / n, drop={"__meta__"}), "not a tinycnn weights file"),
    ("metadata not JSON", npz_meta(lambda m: "{oops"), "not valid JSON"),
    ("metadata a list", npz_meta(lambda m: [1, 2]), "has format 'list'"),
    ("metadata of another format", npz_meta(lambda m: dict(m, format="x")), "has format 'x'"),
    ("layers not a list", npz_meta(lambda m: dict(m, layers=7)), "metadata block is malformed"),
    ("a layer record malformed", npz_meta(lambda m: dict(m, layers=[{"name": 1}])), "metadata block is malformed"),
    ("metadata as numbers", lambda s, t, n: rewrite_npz(s, t / n, {"__meta__": npy_bytes(np.ones(3))}),
     "not the kind tinycnn stores"),
    ("metadata declaring a terabyte", lambda s, t, n: rewrite_npz(s, t / n, {"__meta__": npy_bytes(
        header={"descr": "<U1", "fortran_order": False, "shape": (2**38,)})}),
     r"__meta__ has shape \(274877906944,\), expected \(\)"),
    ("a pickled object", npz_kernel(npy_bytes(np.array([os.getcwd], dtype=object))), "holds object values"),
    ("a kernel declaring 4 TB", npz_kernel(npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                                            "shape": (10**12,)})), "larger than the"),
    ("an int32 kernel", npz_kernel(npy_bytes(np.ones((3, 3, 1, 3), np.int32))), "not the kind"),
    ("a kernel beyond float32", npz_kernel(npy_bytes(np.full((3, 3, 1, 3), 1e300))), "beyond float32's range"),
    ("a NaN kernel", npz_kernel(npy_bytes(np.full((3, 3, 1, 3), np.nan, np.float32))), "NaN or infinite"),
    ("a kernel of another shape", npz_kernel(npy_bytes(np.ones((3, 3, 1, 4), np.float32))),
     r"has shape \(3, 3, 1, 4\) in the file"),
    ("a missing kernel", lambda s, t, n: rewrite_npz(s, t / n, drop={KERNEL_NPZ}), "is missing layer000/kernel"),
    ("a kernel cut short", npz_kernel(npy_bytes(np.ones((3, 3, 1, 3), np.float32))[:-8]),
     "does not hold the 108 bytes its header declares"),
    ("an .npy format 3 member", npz_kernel(np.lib.format.magic(3, 0) + b"\x00" * 16), r"format \(3, 0\)"),
    ("a negative dimension before 64 MiB", npz_kernel(npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                                                       "shape": (-1,)}) + b"\0" * (64 << 20)),
     r"impossible shape \(-1,\)"),
    ("a shape overflowing int64", npz_kernel(npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                                              "shape": (2**64, 0)})), "Maximum allowed dimension"),
    ("a dimension past NumPy's limit", npz_kernel(npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                                                   "shape": (2**63, 0)})), "Maximum allowed dimension"),
]


@pytest.mark.parametrize("craft, message", [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES])
def test_npz_crafted(saved, tmp_path, craft, message):
    refused(craft(saved[0]["npz"][0], tmp_path, "crafted.npz"), message)


def test_npz_members_the_model_does_not_need_are_never_read(saved, tmp_path):
    """A 1 MB file can declare terabytes in members tinycnn does not ask for: loading stays small."""
    source, _ = saved[0]["npz"]
    crafted = rewrite_npz(source, tmp_path / "extra.npz", add={
        f"junk{i}": npy_bytes(header={"descr": "<f8", "fortran_order": False, "shape": (2**40,)}) for i in range(64)})
    bomb = zlib.compress(b"\0" * (64 << 20), 9)  # 64 MiB of zeros in a member the model never reads
    with zipfile.ZipFile(crafted, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.npy", zlib.decompress(bomb))
    assert os.path.getsize(crafted) < 1 << 20
    weights = bounded(lambda: load(crafted), megabytes=8)
    assert all(np.array_equal(a, b) for a, b in zip(saved[1], weights))


def test_the_pickle_payload_never_runs(saved, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = rewrite_npz(saved[0]["npz"][0], tmp_path / "payload.npz",
                          {"layer000/kernel": npy_bytes(np.array([Payload()], dtype=object))})
    refused(crafted, "holds object values")
    assert not marker.exists()


# -- checkpoints --------------------------------------------------------------------------------------------------
def compiled(seed=1):
    model = make(seed)
    model.compile(tc.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(np.random.default_rng(0).random((8, 6, 6, 1), dtype=np.float32), np.arange(8) % 4, verbose=0)
    return model


CHECKPOINT_CASES = [
    ("epochs_done negative", {"training": dict(epochs_done=-1)}, "not a count of epochs"),
    ("epochs_done a string", {"training": dict(epochs_done="3")}, "not a count of epochs"),
    ("learning rate a string", {"training": dict(learning_rate="x")}, "not a positive number"),
    ("learning rate NaN", {"training": dict(learning_rate=float("nan"))}, "not a positive number"),
    ("other settings", {"training": dict(settings={"seed": 5})}, r"seed=5 in the checkpoint, 0 now"),
    ("a NaN optimizer slot", {"optimizer/slot/m": np.full(1, np.nan)}, r"optimizer/slot/m"),
    ("an optimizer slot of another shape", {"optimizer/slot/v": np.ones(3, np.float32)}, r"optimizer/slot/v has shape"),
    ("negative iterations", {"optimizer/iterations": np.int64(-4)}, "optimizer/iterations holds invalid values"),
    ("no optimizer state", {"optimizer/slot/m": None}, "is missing optimizer/slot/m"),
    ("no training record", {"training": None}, "holds weights only"),
    ("an optimizer slot beyond float32", {"optimizer/slot/v": "1e300"}, "optimizer/slot/v holds invalid values"),
]


def test_a_checkpoint_from_before_settings_were_recorded_still_resumes(tmp_path):
    model = compiled()
    tc.saving.save_checkpoint(model, tmp_path / "old.npz", epoch=3, history=[{"epoch": 3}])  # no settings
    target = compiled(seed=7)
    assert tc.saving.load_checkpoint(target, tmp_path / "old.npz", settings={"seed": 0}) == (3, [{"epoch": 3}])
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), target.get_weights()))


@pytest.mark.parametrize("change, message", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_crafted(tmp_path, change, message):
    source = tmp_path / "ckpt.npz"
    model = compiled()
    tc.saving.save_checkpoint(model, source, epoch=1, history=[], settings={"seed": 0})
    with np.load(source) as data:
        arrays = {key: data[key] for key in data.files}
    training = json.loads(str(arrays["training"][()]))
    for key, value in change.items():
        if key == "training" and value is not None:
            arrays["training"] = np.array(json.dumps({**training, **value}))
        elif value is None:
            del arrays[key]
        elif isinstance(value, str):  # "1e300": float64 values beyond the slot's float32
            arrays[key] = np.full(arrays[key].shape, float(value))
        else:
            arrays[key] = value if key != "optimizer/slot/m" else np.full(arrays[key].shape, np.nan, np.float32)
    np.savez(tmp_path / "crafted.npz", **arrays)
    target = compiled(seed=7)
    before = target.get_weights()
    with pytest.raises(tc.WeightsFileError, match=message):
        tc.saving.load_checkpoint(target, tmp_path / "crafted.npz", settings={"seed": 0})
    assert all(np.array_equal(a, b) for a, b in zip(before, target.get_weights()))


# -- .weights.h5 ---------------------------------------------------------------------------------------------------
def h5_copy(source, path, edit):
    """A copy of a .weights.h5 file after `edit(h5py File)`."""
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def replace_dataset(key, make_dataset):
    def edit(f):
        del f[key]
        make_dataset(f, key)
    return edit


KERNEL = "layers/conv2d/vars/0"


def other_file(t):
    """An HDF5 file outside the weights file, and a raw file, that links must not reach."""
    with h5py.File(t / "other.h5", "w") as f:
        f["d"] = np.ones((3, 3, 1, 3), np.float32)
    (t / "secret.bin").write_bytes(np.arange(27, dtype=np.float32).tobytes())
    return t / "other.h5"


def h5_case(edit):
    """craft(): a copy of the weights file after edit(h5py File, tmp dir)."""
    return lambda s, t, n: h5_copy(s, t / n, lambda f: edit(f, t))


def kernel_as(make_dataset):
    return h5_case(lambda f, t: replace_dataset(KERNEL, lambda g, k: make_dataset(g, k, t))(f))


def virtual(g, k, t):
    layout = h5py.VirtualLayout(shape=(3, 3, 1, 3), dtype="f4")
    layout[...] = h5py.VirtualSource(str(other_file(t)), "d", shape=(3, 3, 1, 3))
    g.create_virtual_dataset(k, layout)


H5_CASES = [
    ("external raw storage", kernel_as(lambda g, k, t: other_file(t) and g.create_dataset(
        k, shape=(3, 3, 1, 3), dtype="f4", external=[(str(t / "secret.bin"), 0, 108)])), "keeps its data in other files"),
    ("a virtual dataset", kernel_as(virtual), "keeps its data in other files"),
    ("an external link", kernel_as(lambda g, k, t: g.__setitem__(k, h5py.ExternalLink(str(other_file(t)), "/d"))),
     "is a ExternalLink"),
    ("a soft link", kernel_as(lambda g, k, t: g.__setitem__(k, h5py.SoftLink("/layers/dense/vars/0"))), "is a SoftLink"),
    ("a dangling link", kernel_as(lambda g, k, t: g.__setitem__(k, h5py.SoftLink("/nowhere"))), "is a SoftLink"),
    ("the layers group linked elsewhere", h5_case(lambda f, t: (f.move("layers", "elsewhere"), f.__setitem__(
        "layers", h5py.SoftLink("/elsewhere")))), "layers is a SoftLink"),
    ("an int32 kernel", kernel_as(lambda g, k, t: g.create_dataset(k, data=np.ones((3, 3, 1, 3), np.int32))),
     "not floating point"),
    ("a string kernel", kernel_as(lambda g, k, t: g.create_dataset(k, data="abc")), "not floating point"),
    ("a compound kernel", kernel_as(lambda g, k, t: g.create_dataset(k, shape=(3,), dtype=[("a", "f4"), ("b", "f4")])),
     "not floating point"),
    ("a kernel beyond float32", kernel_as(lambda g, k, t: g.create_dataset(k, data=np.full((3, 3, 1, 3), 1e300))),
     "beyond float32's range"),
    ("a NaN kernel", kernel_as(lambda g, k, t: g.create_dataset(k, data=np.full((3, 3, 1, 3), np.nan, np.float32))),
     "NaN or infinite"),
    ("a kernel declaring 4 TB", kernel_as(lambda g, k, t: g.create_dataset(
        k, shape=(10**6, 10**6), dtype="f4", chunks=(1, 1024), compression="gzip")),
     r"has shape \(1000000, 1000000\) in the file"),
    ("no layers group", h5_case(lambda f, t: f.move("layers", "other")), "no 'layers' group"),
    ("vars a dataset", h5_case(lambda f, t: (f.__delitem__("layers/dense/vars"), f.create_dataset(
        "layers/dense/vars", data=np.ones(3)))), "0 arrays in the file"),
    ("a missing bias", h5_case(lambda f, t: f.__delitem__("layers/dense/vars/1")), "1 arrays in the file, 2"),
    ("weights for another layer", h5_case(lambda f, t: f.create_dataset("layers/lstm/vars/0", data=np.ones(2))),
     "layers the model does not have: lstm"),
    ("a bare signature", lambda s, t, n: written(t / n, b"\x89HDF\r\n\x1a\n"), "not a readable HDF5 weights file"),
]


@pytest.mark.parametrize("craft, message", [c[1:] for c in H5_CASES], ids=[c[0] for c in H5_CASES])
def test_weights_h5_crafted(saved, tmp_path, craft, message):
    refused(craft(saved[0]["weights.h5"][0], tmp_path, "crafted.weights.h5"), message)


def test_no_loader_reads_another_file_on_the_machine(saved, tmp_path):
    """External storage, external links and virtual datasets all point at a file of known values:
    none of them may reach a model."""
    secret = tmp_path / "secret.bin"
    values = np.arange(27, dtype=np.float32) + 1000
    secret.write_bytes(values.tobytes())
    path = h5_copy(saved[0]["weights.h5"][0], tmp_path / "steal.weights.h5", replace_dataset(
        KERNEL, lambda f, k: f.create_dataset(k, shape=(3, 3, 1, 3), dtype="f4", external=[(str(secret), 0, 108)])))
    model = make(seed=99)
    with pytest.raises(tc.WeightsFileError, match="keeps its data in other files"):
        model.load_weights(path)
    assert not any(np.isin(values, w).any() for w in model.get_weights())


# -- .keras --------------------------------------------------------------------------------------------------------
def rezip(source, path, replace=None, drop=(), add=None, compression=zipfile.ZIP_STORED):
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(path, "w", compression=compression) as zout:
        for name in zin.namelist():
            if name not in drop:
                zout.writestr(name, replace.get(name, zin.read(name)))
        for name, data in add.items():
            zout.writestr(name, data)
    return path


def with_config(source, path, edit):
    with zipfile.ZipFile(source) as zf:
        config = json.loads(zf.read("config.json"))
    edit(config)
    return rezip(source, path, {"config.json": json.dumps(config)})


def find_layer(config, name):
    return next(entry for entry in config["config"]["layers"] if entry["config"].get("name") == name)


def declared_size(source, path, member, size):
    """A copy whose central directory says `member` holds `size` bytes."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as zf:
        info = zf.getinfo(member)
    name = member.encode()
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
    data[central + 24 : central + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert info.file_size != size
    return path


def weights_member(source):
    with zipfile.ZipFile(source) as zf:
        return zf.read("model.weights.h5")


def keras_config(edit):
    return lambda s, t, n: with_config(s, t / n, edit)


def keras_layer(name, edit):
    return keras_config(lambda c: edit(find_layer(c, name)))


def set_compile(key, value):
    def edit(config):
        config.setdefault("compile_config", None)
        config["compile_config"] = {**(config["compile_config"] or {"loss": "mse", "optimizer": "adam"}), key: value}
    return keras_config(edit)


def keras_h5_edited(edit):
    def craft(s, t, n):
        buffer = io.BytesIO(weights_member(s))
        with h5py.File(buffer, "r+") as f:
            edit(f)
        return rezip(s, t / n, {"model.weights.h5": buffer.getvalue()})
    return craft


KERAS_CASES = [
    ("not a zip", lambda s, t, n: written(t / n, "{}"), "not a zip archive"),
    ("no config", lambda s, t, n: rezip(s, t / n, drop={"config.json"}), "it has no config.json"),
    ("no weights", lambda s, t, n: rezip(s, t / n, drop={"model.weights.h5"}), "it has no model.weights.h5"),
    ("config not JSON", lambda s, t, n: rezip(s, t / n, {"config.json": b"{oops"}), "not a readable .keras"),
    ("config not UTF-8", lambda s, t, n: rezip(s, t / n, {"config.json": b'{"a": "\xff"}'}), "not a readable"),
    ("config a list", lambda s, t, n: rezip(s, t / n, {"config.json": b"[1]"}), "does not hold a model"),
    ("config declaring 4 GB", lambda s, t, n: declared_size(s, t / n, "config.json", 2**32 - 1),
     "declares 4294967295 bytes"),
    ("weights deflating to 256 MiB", lambda s, t, n: rezip(
        s, t / n, {"model.weights.h5": weights_member(s) + b"\0" * (256 << 20)}, compression=zipfile.ZIP_DEFLATED),
     "more than the"),
    ("a Dense of 2**31 units", keras_layer("dense", lambda e: e["config"].__setitem__("units", 2**31)),
     "would exceed what the file's weights hold"),
    ("weights claiming 4 GiB for a wide Dense", lambda s, t, n: declared_size(
        with_config(s, t / "wide.keras", lambda c: find_layer(c, "dense")["config"].__setitem__("units", 16000)),
        t / n, "model.weights.h5", 2**32 - 1), "would exceed what the file's weights hold"),
    ("an unknown layer", keras_layer("dense", lambda e: e.__setitem__("class_name", "LSTM")),
     r"a layer tinycnn lacks: dense \(LSTM\)"),
    ("filters 2.7", keras_layer("conv", lambda e: e["config"].__setitem__("filters", 2.7)), "filters must be an integer"),
    ("a negative input shape", keras_config(lambda c: c["config"]["layers"][0]["config"].__setitem__(
        "batch_shape", [None, -6, 6, 1])), "positive ints"),
    ("a subclassed model", keras_config(lambda c: c.__setitem__("class_name", "MyModel")), "subclassed model"),
    ("layers not a list", keras_config(lambda c: c["config"].__setitem__("layers", 5)), "malformed"),
    ("compile optimizer 5", set_compile("optimizer", 5), "compile configuration is malformed"),
    ("compile learning rate 'abc'", set_compile("optimizer", {"class_name": "Adam", "config": {"learning_rate": "abc"}}),
     "learning_rate .*must be a number, got 'abc'"),
    ("compile optimizer tinycnn lacks", set_compile("optimizer", {"class_name": "Lion", "config": {}}), "Lion"),
    ("an external link inside", keras_h5_edited(replace_dataset(
        "layers/conv2d/vars/0", lambda f, k: f.__setitem__(k, h5py.ExternalLink("/etc/hostname", "/x")))),
     "is a ExternalLink"),
]


@pytest.mark.parametrize("craft, message", [c[1:] for c in KERAS_CASES], ids=[c[0] for c in KERAS_CASES])
def test_keras_crafted(saved, tmp_path, craft, message):
    refused(craft(saved[0]["keras"][0], tmp_path, "crafted.keras"), message, megabytes=96)


def test_a_keras_file_with_float64_weights_loads(saved, tmp_path):
    """Keras writes float64 arrays for a float64 model; they load (as float32) like any other."""
    def widen(f):
        for key in [k for k in list_datasets(f)]:
            value = f[key][()]
            del f[key]
            f.create_dataset(key, data=value.astype(np.float64))

    source = saved[0]["keras"][0]
    buffer = io.BytesIO(weights_member(source))
    with h5py.File(buffer, "r+") as f:
        widen(f)
    path = rezip(source, tmp_path / "f64.keras", {"model.weights.h5": buffer.getvalue()})
    assert all(np.array_equal(a, b) for a, b in zip(saved[1], load(path)))


def list_datasets(f):
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def test_member_names_that_climb_out_are_never_extracted(saved, tmp_path):
    crafted = rezip(saved[0]["keras"][0], tmp_path / "climb.keras", add={"../../evil.txt": b"x", "/abs.txt": b"y"})
    weights = load(crafted)
    assert all(np.array_equal(a, b) for a, b in zip(saved[1], weights))
    assert not (tmp_path.parent / "evil.txt").exists() and not os.path.exists("/abs.txt")


# -- fuzz: files tinycnn wrote, damaged at random ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_bit_flips_are_refused_or_change_nothing(saved, tmp_path, fmt):
    """Every flip either fails the load with a WeightsFileError (the checksums: zip CRCs, HDF5's
    Fletcher-32 and metadata checksums) or loads exactly the saved weights (a flip in bytes that do
    not matter, such as a timestamp); the model a failed load targeted is untouched."""
    path, data = saved[0][fmt]
    rng = np.random.default_rng(sum(map(ord, fmt)))
    outcomes = {"refused": 0, "unchanged": 0}
    # 120 random flips, and every byte of the last 128 (a zip's directory, where offsets live)
    flips = [(int(rng.integers(len(data))), int(rng.integers(8))) for _ in range(120)]
    flips += [(offset, int(rng.integers(8))) for offset in range(max(0, len(data) - 128), len(data))]
    for k, (offset, bit) in enumerate(flips):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << bit
        target = tmp_path / f"flip.{fmt}"
        target.write_bytes(bytes(damaged))
        model = make(seed=99)
        before = model.get_weights()
        try:
            weights = load(target, model)
        except tc.WeightsFileError:
            outcomes["refused"] += 1
            assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
            continue
        assert all(np.array_equal(a, b) for a, b in zip(saved[1], weights)), f"flip {k} loaded other weights"
        outcomes["unchanged"] += 1
    assert outcomes["refused"] > 20, outcomes  # the rest fell in bytes no reader looks at


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_truncation_is_refused(saved, tmp_path, fmt):
    path, data = saved[0][fmt]
    rng = np.random.default_rng(7)
    for size in sorted(set(rng.integers(0, len(data), 30).tolist()) | {0, 1, 8, len(data) - 1}):
        target = tmp_path / f"cut.{fmt}"
        target.write_bytes(data[:size])
        refused(target, re.escape(repr(str(target))))  # every message names the file


# -- savers: refused saves leave what was on disk ------------------------------------------------------------------
SAVE_CASES = [
    ("NaN weights", lambda t, fmt: t / f"m.{fmt}", "poison", ValueError, "not saving: weight 'kernel' of layer conv"),
    ("onto a directory", lambda t, fmt: (t / f"d.{fmt}").mkdir() or t / f"d.{fmt}", None, IsADirectoryError,
     "a directory of that name exists"),
    ("under a file", lambda t, fmt: written(t / "f", "x") / f"m.{fmt}", None, NotADirectoryError, "is a file"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("where, poison, error, message", [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_refused_saves(tmp_path, fmt, where, poison, error, message):
    model = make()
    path = where(tmp_path, fmt)
    if poison:
        save(make(seed=5), path)  # a good file is already there
        model.build()
        model.get_layer("conv").weights["kernel"][0, 0, 0, 0] = np.nan
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=message):
        save(model, path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing new, not even a temporary file
    if poison:
        assert all(np.array_equal(a, b) for a, b in zip(load(path), make(seed=5).get_weights()))


# -- faults while saving ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_concurrent_saves_to_one_path_never_leave_a_broken_file(tmp_path, fmt):
    path = tmp_path / f"shared.{fmt}"
    bystander = tmp_path / f"shared.{fmt}.tmp"  # a file with the name a naive writer would use
    bystander.write_text("keep me")
    models = [make(seed=s) for s in range(8)]  # one per thread: a model itself runs one call at a time
    expected = [m.get_weights() for m in models]
    errors, loaded = [], []

    def writer(model):
        try:
            for _ in range(6):
                save(model, path)
        except Exception as exc:  # noqa: BLE001 (any failure is the finding)
            errors.append(exc)

    def reader(stop):
        while not stop.is_set():
            if path.exists():
                try:
                    loaded.append(load(path))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

    stop = threading.Event()
    watcher = threading.Thread(target=reader, args=(stop,))
    watcher.start()
    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    final = load(path)
    assert any(all(np.array_equal(a, b) for a, b in zip(final, e)) for e in expected)
    for weights in loaded:  # a reader saw one writer's complete file every time
        assert any(all(np.array_equal(a, b) for a, b in zip(weights, e)) for e in expected)
    assert bystander.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


KILLED_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_faults_files import make, save
models = [make(seed=1), make(seed=2)]
print("ready", flush=True)
k = 0
while True:
    save(models[k % 2], {path!r})
    k += 1
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_save_killed_midway_leaves_the_previous_file(tmp_path, fmt):
    path = tmp_path / f"killed.{fmt}"
    expected = [make(seed=1).get_weights(), make(seed=2).get_weights()]
    save(make(seed=1), path)
    rng = np.random.default_rng(3)
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(tests=os.path.join(ROOT, "tests"),
                                                                              path=str(path))],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        weights = load(path)
        assert any(all(np.array_equal(a, b) for a, b in zip(weights, e)) for e in expected)


# -- datasets --------------------------------------------------------------------------------------------------------
def test_a_cache_that_cannot_be_opened_is_reported_and_kept(tmp_path):
    from tinycnn.datasets import mnist

    (tmp_path / "mnist.npz").mkdir()  # something is there, but it cannot be read as a file
    (tmp_path / "mnist.npz" / "keep").write_text("x")
    with pytest.raises(tc.DatasetError, match="cannot open .*mnist.npz.*left as it is"):
        mnist.load_data(cache_dir=tmp_path, verbose=False)
    assert (tmp_path / "mnist.npz" / "keep").exists()


def test_a_cache_dir_behind_a_file_is_reported(tmp_path):
    from tinycnn.datasets import mnist

    (tmp_path / "file").write_text("x")
    with pytest.raises(tc.DatasetError, match="cannot reach the cache"):
        mnist.load_data(cache_dir=tmp_path / "file", verbose=False)
