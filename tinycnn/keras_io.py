"""Keras 3's weights layout in HDF5: `.weights.h5` files, and the `model.weights.h5` inside a
`.keras` model file (needs h5py).

Layout (Keras 3.15, checked against files Keras wrote): `layers/<snake_case class>[_k]/vars/<i>`,
one group per layer of `model.layers` in order, `_k` counting layers of the same class from the
second one (`conv2d`, `conv2d_1`, ...), datasets in Keras weight order (kernel, bias; gamma,
beta, moving_mean, moving_variance). Layers without weights get an empty `vars` group (Keras
reads a missing group as empty, so input layers are left out); `vars` groups carry the layer's
name as an attribute, which Keras does not read. An `optimizer/` group, if present, is ignored.

Files tinycnn writes store every array with HDF5's Fletcher-32 checksum (a standard filter any
HDF5 reader, Keras included, reads transparently) in HDF5 1.10's file format, whose metadata
carries checksums too: a flipped bit anywhere in the file fails the load or changes nothing. Reading
follows only what is stored in the file itself: a soft or external link, an array kept in an
external raw file, or a virtual dataset is refused, since each could make the loader read another
object or another file on the machine. Each array's dtype and shape are checked before it is read.
"""
import collections
import os
import re

import numpy as np

from .errors import WeightsFileError
from .files import atomic_path
from .saving import check_file_array, savable_weights

KERAS_INSTALL_HINT = 'pip install "tinycnn[keras]"  (h5py)'


def h5py_module():
    try:
        import h5py
    except ImportError:
        raise ImportError(f"reading and writing Keras .weights.h5 and .keras files needs h5py: {KERAS_INSTALL_HINT}"
                          ) from None
    return h5py


def to_snake_case(name):
    """Keras's snake_case of a class name: Conv2D -> conv2d, ReLU -> re_lu, GlobalAveragePooling2D ->
    global_average_pooling2d."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_paths(model):
    """The group path of every computing layer in a Keras 3 weights file, in model order."""
    seen = collections.Counter()
    paths = []
    for layer in model.compute_layers:
        base = to_snake_case(type(layer).__name__)
        paths.append(f"layers/{base}" + (f"_{seen[base]}" if seen[base] else ""))
        seen[base] += 1
    return paths


def write_weights(model, f, weights):
    """Write `weights` (saving.savable_weights of the model) into the open h5py File `f`."""
    f.create_group("vars").attrs["name"] = model.name
    for layer, group_path, values in zip(model.compute_layers, keras_paths(model), weights):
        group = f.create_group(f"{group_path}/vars")
        group.attrs["name"] = layer.name
        for i, value in enumerate(values):
            group.create_dataset(str(i), data=value.astype(np.float32), fletcher32=True)


def _stored(group, name, path):
    """group[name] when it is stored in this file (a hard link), None when absent. Soft and external
    links are refused: they could point the loader at another object or another file."""
    h5py = h5py_module()
    link = group.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise WeightsFileError(f"{path!r}: {group.name.rstrip('/')}/{name} is a {type(link).__name__}; tinycnn reads "
                               "only data stored in the file itself")
    return group[name]


def _stored_path(f, parts, path):
    node = f
    for part in parts:
        node = _stored(node, part, path)
        if node is None or not isinstance(node, h5py_module().Group):
            return None
    return node


def _read_dataset(dataset, path, key, where, name, current):
    """The array of one weight, after checking where its data lives and its dtype and shape."""
    h5py = h5py_module()
    if not isinstance(dataset, h5py.Dataset):
        raise WeightsFileError(f"{path!r} does not match the model at {where}: no array {key}")
    if dataset.external or dataset.is_virtual:
        raise WeightsFileError(f"{path!r}: {key} keeps its data in other files ({'external storage' if dataset.external else 'a virtual dataset'}); "
                               "tinycnn reads only data stored in the file itself")
    if dataset.dtype.kind != "f":
        raise WeightsFileError(f"{path!r}: {key} holds {dataset.dtype} values, not floating point")
    if dataset.shape != tuple(current.shape):
        raise WeightsFileError(f"{path!r} does not match the model at {where}: weight {name!r} has shape "
                               f"{dataset.shape} in the file but {tuple(current.shape)} in the model")
    try:
        value = dataset[()]
    except (OSError, ValueError, RuntimeError) as exc:  # a failed checksum or a damaged chunk
        raise WeightsFileError(f"{path!r}: {key} is corrupt (its data fails to read or its checksum): {exc}") from None
    return check_file_array(path, where, name, key, np.asarray(value), current)


def read_weights(model, f, path):
    """Every layer's arrays from the open h5py File `f`, checked (count, shape, finite) before any is
    assigned; returns [(layer, values)]. `path` names the file in errors."""
    h5py = h5py_module()
    layers_group = _stored(f, "layers", path)
    if not isinstance(layers_group, h5py.Group):
        raise WeightsFileError(f"{path!r} has no 'layers' group: not Keras 3 weights")
    expected = keras_paths(model)
    plan = []
    for layer, group_path in zip(model.compute_layers, expected):
        where = f"layer {layer.name} ({type(layer).__name__}, file group {group_path!r})"
        group = _stored_path(f, group_path.split("/") + ["vars"], path)
        count = 0 if group is None else len(group)
        if count != len(layer.weights):
            raise WeightsFileError(f"{path!r} does not match the model at {where}: "
                                   f"{count} arrays in the file, {len(layer.weights)} in the model")
        values = [_read_dataset(_stored(group, str(i), path), path, f"{group_path}/vars/{i}", where, name, current)
                  for i, (name, current) in enumerate(layer.weights.items())]
        plan.append((layer, values))
    known = {p.split("/", 1)[1] for p in expected}
    unused = [name for name in sorted(layers_group) if name not in known
              and len(_stored_path(layers_group, [name, "vars"], path) or {}) > 0]
    if unused:
        raise WeightsFileError(f"{path!r} has weights for layers the model does not have: {', '.join(unused)}")
    return plan


def read_weights_file(model, source, path):
    """read_weights on `source` (a path or a file object holding HDF5), every failure of the HDF5
    library turned into a WeightsFileError that names `path`."""
    h5py = h5py_module()
    try:
        with h5py.File(source, "r") as f:
            return read_weights(model, f, path)
    except WeightsFileError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise WeightsFileError(f"{path!r} is not a readable HDF5 weights file (corrupt or truncated?): {exc}") from None


def save_keras_weights(model, path):
    """Write the model's weights as a Keras 3 `.weights.h5` file (atomically)."""
    h5py = h5py_module()
    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"Keras 3 only loads weights files named *.weights.h5, got {path!r}")
    model.build()
    weights = savable_weights(model)  # checked before the temporary file exists
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=("v110", "v110")) as f:
            write_weights(model, f, weights)


def load_keras_weights(model, path):
    """Load a Keras 3 `.weights.h5` file into a model with the same layers.

    Every array is read and checked (count and shapes per layer) before any is assigned:
    a mismatched file is refused, naming the first mismatch, and the model is unchanged."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"Keras weights file {path!r} does not exist")
    model.build()
    plan = read_weights_file(model, path, path)
    for layer, values in plan:
        layer.set_weights(values)
