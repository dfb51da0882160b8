"""Keras 3's weights layout in HDF5: `.weights.h5` files, and the `model.weights.h5` inside a
`.keras` model file (needs h5py).

Layout (Keras 3.15, checked against files Keras wrote): `layers/<snake_case class>[_k]/vars/<i>`,
one group per layer of `model.layers` in order, `_k` counting layers of the same class from the
second one (`conv2d`, `conv2d_1`, ...), datasets in Keras weight order (kernel, bias; gamma,
beta, moving_mean, moving_variance). Layers without weights get an empty `vars` group (Keras
reads a missing group as empty, so input layers are left out); `vars` groups carry the layer's
name as an attribute, which Keras does not read. An `optimizer/` group, if present, is ignored.
"""
import collections
import os
import re

import numpy as np

from .errors import WeightsFileError
from .files import atomic_path
from .saving import check_file_array

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


def write_weights(model, f):
    """Write the model's weights into the open h5py File `f`."""
    f.create_group("vars").attrs["name"] = model.name
    for layer, group_path in zip(model.compute_layers, keras_paths(model)):
        group = f.create_group(f"{group_path}/vars")
        group.attrs["name"] = layer.name
        for i, value in enumerate(layer.get_weights()):
            group.create_dataset(str(i), data=value.astype(np.float32))


def read_weights(model, f, path):
    """Every layer's arrays from the open h5py File `f`, checked (count, shape, finite) before any is
    assigned; returns [(layer, values)]. `path` names the file in errors."""
    h5py = h5py_module()
    if "layers" not in f or not isinstance(f["layers"], h5py.Group):
        raise WeightsFileError(f"{path!r} has no 'layers' group: not Keras 3 weights")
    expected = keras_paths(model)
    plan = []
    for layer, group_path in zip(model.compute_layers, expected):
        where = f"layer {layer.name} ({type(layer).__name__}, file group {group_path!r})"
        group = f.get(f"{group_path}/vars")
        count = 0 if group is None else len(group)
        if count != len(layer.weights):
            raise WeightsFileError(f"{path!r} does not match the model at {where}: "
                                   f"{count} arrays in the file, {len(layer.weights)} in the model")
        values = []
        for i, (name, current) in enumerate(layer.weights.items()):
            dataset = group.get(str(i))
            if not isinstance(dataset, h5py.Dataset):
                raise WeightsFileError(f"{path!r} does not match the model at {where}: no array {i}")
            values.append(check_file_array(path, where, name, f"{group_path}/vars/{i}", np.asarray(dataset),
                                           current.shape))
        plan.append((layer, values))
    known = {p.split("/", 1)[1] for p in expected}
    unused = [name for name in sorted(f["layers"]) if name not in known and len(f[f"layers/{name}"].get("vars", {})) > 0]
    if unused:
        raise WeightsFileError(f"{path!r} has weights for layers the model does not have: {', '.join(unused)}")
    return plan


def save_keras_weights(model, path):
    """Write the model's weights as a Keras 3 `.weights.h5` file (atomically)."""
    h5py = h5py_module()
    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"Keras 3 only loads weights files named *.weights.h5, got {path!r}")
    model.build()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_weights(model, f)


def load_keras_weights(model, path):
    """Load a Keras 3 `.weights.h5` file into a model with the same layers.

    Every array is read and checked (count and shapes per layer) before any is assigned:
    a mismatched file is refused, naming the first mismatch, and the model is unchanged."""
    h5py = h5py_module()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"Keras weights file {path!r} does not exist")
    model.build()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsFileError(f"{path!r} is not a readable HDF5 file (corrupt or truncated?): {exc}") from None
    with f:
        plan = read_weights(model, f, path)
    for layer, values in plan:
        layer.set_weights(values)
