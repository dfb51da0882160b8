"""Weights and training checkpoints as `.npz` files: no pickle, written atomically, read within bounds.

A file records, per layer, its name, class, weight names and shapes. Loading matches the
model layer by layer (position, class, weight names, shapes) and checks every array before
assigning any, so a mismatched or corrupt file is refused with the first mismatch named and
the model is left exactly as it was.

Reading never trusts the file (tinycnn.npzfile): each array's header is checked against what the
model expects before its data is read, and members the model does not ask for are never read, so
a crafted file cannot make tinycnn allocate more than the model's own size.
"""
import json

import numpy as np

from .errors import WeightsFileError
from .files import atomic_write
from .npzfile import NpzReader

FORMAT = "tinycnn-weights"
VERSION = 1
MAX_JSON_BYTES = 16 << 20  # the metadata and training records: far more than any model needs


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


def savable_weights(model):
    """Every compute layer's weights as host arrays (one list per layer, in model order), each
    fetched from the device once for the writer to use. Refuses weights that could not be loaded
    back: every value must be finite."""
    fetched = []
    for layer in model.compute_layers:
        values = layer.get_weights()
        for name, value in zip(layer.weights, values):
            if not np.all(np.isfinite(value)):
                raise ValueError(f"not saving: weight {name!r} of layer {layer.name} holds NaN or infinite values "
                                 "(training diverged?); the file on disk is left as it was")
        fetched.append(values)
    return fetched


def _weights_arrays(model):
    weights = savable_weights(model)
    arrays = {"__meta__": np.array(json.dumps({"format": FORMAT, "version": VERSION, "layers": _layer_records(model)}))}
    for i, (layer, values) in enumerate(zip(model.compute_layers, weights)):
        for name, value in zip(layer.weights, values):
            arrays[f"layer{i:03d}/{name}"] = value
    return arrays


def _open(path):
    """An NpzReader on a tinycnn weights file and its checked metadata."""
    reader = NpzReader(path)
    try:
        if "__meta__" not in reader:
            raise WeightsFileError(f"{reader.path!r} is an .npz file but not a tinycnn weights file (no __meta__ entry)")
        meta = reader.json("__meta__", MAX_JSON_BYTES)
        _check_meta(reader.path, meta)
    except BaseException:
        reader.zip.close()
        raise
    return reader, meta


def _check_meta(path, meta):
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise WeightsFileError(f"{path!r} has format {found!r}, expected {FORMAT!r}")
    layers = meta.get("layers")
    valid = isinstance(layers, list) and all(
        isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("class"), str)
        and isinstance(rec.get("weights"), list)
        and all(isinstance(w, list) and len(w) == 2 and isinstance(w[0], str) for w in rec["weights"])
        for rec in layers)
    if not valid:
        raise WeightsFileError(f"{path!r}: its metadata block is malformed (expected a list of layer records)")


def check_file_array(path, where, name, key, value, current):
    """One weight array read from a file: the model's shape, floating point, and finite in the
    model's dtype (float64 values beyond float32's range would become infinite)."""
    if value.shape != tuple(current.shape):
        raise WeightsFileError(f"{path!r} does not match the model at {where}: weight {name!r} has shape "
                               f"{value.shape} in the file but {tuple(current.shape)} in the model")
    if not np.issubdtype(value.dtype, np.floating):
        raise WeightsFileError(f"{path!r}: {key} holds {value.dtype} values, not floating point")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = value.astype(current.dtype, copy=False)
    if not np.all(np.isfinite(converted)):
        reason = "NaN or infinite values" if not np.all(np.isfinite(value)) else f"values beyond {current.dtype}'s range"
        raise WeightsFileError(f"{path!r}: {key} holds {reason}")
    return converted


def _match(model, reader, meta, by_name):
    """Per model layer, the list of arrays to assign; raises on the first mismatch."""
    path = reader.path
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
            # at most as many values as the model's weight (in any float type): the shape is named below
            value = reader.array(key, kinds="f", max_bytes=current.size * 16)
            values.append(check_file_array(path, where, name, key, value, current))
        plan.append((layer, values))
    return plan


def save_weights(model, path):
    atomic_savez(path, _weights_arrays(model))


def load_weights(model, path, by_name=False):
    reader, meta = _open(path)
    with reader:
        plan = _match(model, reader, meta, by_name)
    for layer, values in plan:  # every array checked above: nothing is half-loaded
        layer.set_weights(values)


def save_checkpoint(model, path, epoch, history, settings=None):
    """Weights, optimizer state, the number of finished epochs, the history so far, and the run's
    `settings` (a JSON-able dict: what a resumed run must share with this one, e.g. its seed)."""
    arrays = _weights_arrays(model)
    for key, value in model.optimizer.get_state().items():
        arrays[f"optimizer/{key}"] = value
    lr = model.optimizer.learning_rate
    arrays["training"] = np.array(json.dumps({
        "epochs_done": int(epoch),
        "history": history,
        "learning_rate": None if callable(lr) else float(lr),
        "settings": settings,
    }))
    atomic_savez(path, arrays)


def _check_training(path, training, settings):
    if not isinstance(training, dict):
        raise WeightsFileError(f"{path!r}: its training record is malformed")
    done, lr = training.get("epochs_done"), training.get("learning_rate")
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise WeightsFileError(f"{path!r}: epochs_done is {done!r}, not a count of epochs")
    if lr is not None and not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise WeightsFileError(f"{path!r}: its learning rate {lr!r} is not a positive number")
    saved = training.get("settings")
    if settings is not None and saved is not None:  # checkpoints written before settings were recorded: as before
        if not isinstance(saved, dict):
            raise WeightsFileError(f"{path!r}: its recorded settings are malformed")
        differ = [f"{key}={saved.get(key)!r} in the checkpoint, {value!r} now" for key, value in settings.items()
                  if saved.get(key) != value]
        if differ:
            raise WeightsFileError(f"{path!r} was written by a run with other settings ({'; '.join(differ)}): resume "
                                   "with the same settings, or start afresh in another directory")


def load_checkpoint(model, path, settings=None):
    """Restore a `save_checkpoint` file into a compiled model; returns (epochs_done, history).
    With `settings`, refuses a checkpoint written under different ones. Everything is read and
    checked (weights, optimizer slots, the training record) before anything is assigned."""
    reader, meta = _open(path)
    with reader:
        path = reader.path
        if "training" not in reader:
            raise WeightsFileError(f"{path!r} holds weights only, not a training checkpoint")
        training = reader.json("training", MAX_JSON_BYTES)
        _check_training(path, training, settings)
        plan = _match(model, reader, meta, by_name=False)
        model.build_optimizer()
        state = {}
        for key, current in model.optimizer.get_state().items():
            current = np.asarray(current)
            value = reader.array(f"optimizer/{key}", shape=current.shape, kinds="fiu")
            with np.errstate(over="ignore", invalid="ignore"):
                value = value.astype(current.dtype)  # as the optimizer will hold it: beyond its range is inf
            if not np.all(np.isfinite(value)) or (key == "iterations" and int(value) < 0):
                raise WeightsFileError(f"{path!r}: optimizer/{key} holds invalid values (NaN, infinite, beyond "
                                       f"{current.dtype}'s range, or a negative count)")
            state[key] = value
    model.optimizer.set_state(state)
    for layer, values in plan:
        layer.set_weights(values)
    if training["learning_rate"] is not None:
        model.optimizer.learning_rate = training["learning_rate"]
    return training["epochs_done"], training.get("history")
