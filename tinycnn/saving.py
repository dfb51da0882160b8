"""Weights and training checkpoints as `.npz` files: no pickle, written atomically.

A file records, per layer, its name, class, weight names and shapes. Loading matches the
model layer by layer (position, class, weight names, shapes) and checks every array before
assigning any, so a mismatched or corrupt file is refused with the first mismatch named and
the model is left exactly as it was.
"""
import json
import os
import zipfile

import numpy as np

from .errors import WeightsFileError
from .files import atomic_write

FORMAT = "tinycnn-weights"
VERSION = 1


def _layer_records(model):
    return [
        {
            "name": layer.name,
            "class": type(layer).__name__,
            "weights": [[name, list(w.shape)] for name, w in layer.weights.items()],
        }
        for layer in model.compute_layers
    ]


def atomic_savez(path, arrays):
    """np.savez, atomically (tinycnn.files): a crash or an error leaves the old file."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _weights_arrays(model):
    arrays = {"__meta__": np.array(json.dumps({"format": FORMAT, "version": VERSION, "layers": _layer_records(model)}))}
    for i, layer in enumerate(model.compute_layers):
        for name, value in zip(layer.weights, layer.get_weights()):
            arrays[f"layer{i:03d}/{name}"] = value
    return arrays


def _read(path):
    """All arrays of a tinycnn .npz file, and its metadata; WeightsFileError if unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"weights file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop("__meta__")[()]))
    except KeyError:
        raise WeightsFileError(f"{path!r} is an .npz file but not a tinycnn weights file (no __meta__ entry)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise WeightsFileError(f"{path!r} is not a readable tinycnn weights file (corrupt or truncated?): {exc}") from None
    if meta.get("format") != FORMAT:
        raise WeightsFileError(f"{path!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return arrays, meta


def check_file_array(path, where, name, key, value, expected_shape):
    """One weight array read from a file: the model's shape, floating point, finite."""
    if value.shape != tuple(expected_shape):
        raise WeightsFileError(f"{path!r} does not match the model at {where}: weight {name!r} has shape "
                               f"{value.shape} in the file but {tuple(expected_shape)} in the model")
    if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
        raise WeightsFileError(f"{path!r}: {key} is not a finite floating-point array")
    return value


def _match(model, arrays, meta, path, by_name):
    """Per model layer, the list of arrays to assign; raises on the first mismatch."""
    records = meta["layers"]
    layers = model.compute_layers
    if by_name:
        index = {rec["name"]: (i, rec) for i, rec in enumerate(records)}
        pairs = [(layer, index.get(layer.name)) for layer in layers]
    else:
        if len(records) != len(layers):
            raise WeightsFileError(f"{path!r} holds {len(records)} layers but the model has {len(layers)}")
        pairs = [(layer, (i, rec)) for i, (layer, rec) in enumerate(zip(layers, records))]
    plan = []
    for layer, found in pairs:
        if found is None:
            if layer.weights:
                raise WeightsFileError(f"{path!r} has no layer named {layer.name!r}")
            continue
        i, rec = found
        where = f"layer {i} ({rec['name']}, {rec['class']} in the file; {layer.name}, {type(layer).__name__} in the model)"
        if rec["class"] != type(layer).__name__:
            raise WeightsFileError(f"{path!r} does not match the model at {where}: the layer classes differ")
        file_names = [name for name, _ in rec["weights"]]
        if file_names != list(layer.weights):
            raise WeightsFileError(f"{path!r} does not match the model at {where}: weights {file_names} vs {list(layer.weights)}")
        values = []
        for name, current in layer.weights.items():
            key = f"layer{i:03d}/{name}"
            if key not in arrays:
                raise WeightsFileError(f"{path!r} is missing {key}")
            values.append(check_file_array(path, where, name, key, arrays[key], current.shape))
        plan.append((layer, values))
    return plan


def save_weights(model, path):
    atomic_savez(path, _weights_arrays(model))


def load_weights(model, path, by_name=False):
    arrays, meta = _read(path)
    plan = _match(model, arrays, meta, os.fspath(path), by_name)
    for layer, values in plan:  # every array checked above: nothing is half-loaded
        layer.set_weights(values)


def save_checkpoint(model, path, epoch, history):
    """Weights, optimizer state, the number of finished epochs and the history so far."""
    arrays = _weights_arrays(model)
    for key, value in model.optimizer.get_state().items():
        arrays[f"optimizer/{key}"] = value
    lr = model.optimizer.learning_rate
    arrays["training"] = np.array(json.dumps({
        "epochs_done": int(epoch),
        "history": history,
        "learning_rate": None if callable(lr) else float(lr),
    }))
    atomic_savez(path, arrays)


def load_checkpoint(model, path):
    """Restore a `save_checkpoint` file into a compiled model; returns (epochs_done, history)."""
    arrays, meta = _read(path)
    if "training" not in arrays:
        raise WeightsFileError(f"{path!r} holds weights only, not a training checkpoint")
    plan = _match(model, arrays, meta, os.fspath(path), by_name=False)
    model.build_optimizer()
    state = {key[len("optimizer/"):]: value for key, value in arrays.items() if key.startswith("optimizer/")}
    training = json.loads(str(arrays["training"][()]))
    try:
        model.optimizer.set_state(state)
    except (KeyError, ValueError) as exc:
        raise WeightsFileError(f"{path!r}: optimizer state does not match this model's optimizer ({exc})") from None
    for layer, values in plan:
        layer.set_weights(values)
    if training["learning_rate"] is not None:
        model.optimizer.learning_rate = training["learning_rate"]
    return training["epochs_done"], training["history"]
