"""Keras 3 `.weights.h5` files: read and write the weights of a matching model (needs h5py).

Layout (Keras 3.15, checked against files Keras wrote; see benchmarks/keras_parity/README.md):
`layers/<snake_case class>[_k]/vars/<i>`, one group per layer of the model in order, `_k`
counting layers of the same class from the second one (`conv2d`, `conv2d_1`, ...),
datasets in Keras weight order (kernel, bias; gamma, beta, moving_mean, moving_variance).
Weightless layers get an empty `vars` group; `vars` groups carry the layer's name as an
attribute, which Keras does not read. An `optimizer/` group, if present, is ignored.
"""
import collections
import os

import numpy as np

from .errors import WeightsFileError
from .files import atomic_path
from .saving import check_file_array

KERAS_INSTALL_HINT = 'pip install "tinycnn[keras]"  (h5py)'


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError(f"reading and writing Keras .weights.h5 files needs h5py: {KERAS_INSTALL_HINT}") from None
    return h5py


def keras_paths(model):
    """The group path of every layer in a Keras 3 weights file, in model order."""
    seen = collections.Counter()
    paths = []
    for layer in model.compute_layers:
        base = layer.base_name
        paths.append(f"layers/{base}" + (f"_{seen[base]}" if seen[base] else ""))
        seen[base] += 1
    return paths


def save_keras_weights(model, path):
    """Write the model's weights as a Keras 3 `.weights.h5` file (atomically)."""
    h5py = _h5py()
    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"Keras 3 only loads weights files named *.weights.h5, got {path!r}")
    model.build()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_group("vars").attrs["name"] = model.name
            for layer, group_path in zip(model.compute_layers, keras_paths(model)):
                group = f.create_group(f"{group_path}/vars")
                group.attrs["name"] = layer.name
                for i, value in enumerate(layer.get_weights()):
                    group.create_dataset(str(i), data=value.astype(np.float32))


def load_keras_weights(model, path):
    """Load a Keras 3 `.weights.h5` file into a model with the same layers.

    Every array is read and checked (count and shapes per layer) before any is assigned:
    a mismatched file is refused, naming the first mismatch, and the model is unchanged."""
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsFileError(f"Keras weights file {path!r} does not exist")
    model.build()
    plan = []
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsFileError(f"{path!r} is not a readable HDF5 file (corrupt or truncated?): {exc}") from None
    with f:
        if "layers" not in f:
            raise WeightsFileError(f"{path!r} has no 'layers' group: not a Keras 3 .weights.h5 file")
        expected = keras_paths(model)
        extra = sorted(set(f["layers"]) - {p.split("/", 1)[1] for p in expected})
        for layer, group_path in zip(model.compute_layers, expected):
            where = f"layer {layer.name} ({type(layer).__name__}, file group {group_path!r})"
            group = f.get(f"{group_path}/vars")
            count = 0 if group is None else len(group)
            if count != len(layer.weights):
                raise WeightsFileError(f"{path!r} does not match the model at {where}: "
                                       f"{count} arrays in the file, {len(layer.weights)} in the model")
            values = []
            for i, (name, current) in enumerate(layer.weights.items()):
                values.append(check_file_array(path, where, name, f"{group_path}/vars/{i}", np.asarray(group[str(i)]),
                                               current.shape))
            plan.append((layer, values))
        unused = [name for name in extra if len(f[f"layers/{name}"].get("vars", {})) > 0]
        if unused:
            raise WeightsFileError(f"{path!r} has weights for layers the model does not have: {', '.join(unused)}")
    for layer, values in plan:
        layer.set_weights(values)
