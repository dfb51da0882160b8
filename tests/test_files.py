"""tinycnn.files: the one atomic writer behind every file tinycnn writes."""
import os
import threading

import numpy as np
import pytest

import tinycnn as tc
from tinycnn.files import atomic_path, atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"]


def test_written_files_get_a_normal_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_temporary_names_are_unique_so_concurrent_writers_never_mix(tmp_path):
    """Thirty threads save different contents to one path: every read sees one whole version."""
    target = tmp_path / "shared.npz"
    errors = []

    def save(k):
        try:
            with atomic_write(target) as f:
                np.savez(f, value=np.full(50_000, k))
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with np.load(target) as data:
        values = data["value"]
    assert len(set(values.tolist())) == 1  # one writer's whole content
    assert os.listdir(tmp_path) == ["shared.npz"]


def test_atomic_path_serves_libraries_that_open_files_themselves(tmp_path):
    with atomic_path(tmp_path / "x.npy") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".x.npy.")
        np.save(open(tmp, "wb"), np.arange(3))
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="for writing"):
        with atomic_write(tmp_path / "r", "rb"):
            pass


def test_model_weights_go_through_it(tmp_path, monkeypatch):
    calls = []
    real = tc.files.atomic_path

    def spy(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(tc.files, "atomic_path", spy)
    model = tc.Sequential([tc.layers.Dense(2, input_shape=(3,))], seed=0)
    model.save_weights(tmp_path / "w.npz")
    assert calls == ["w.npz"]
