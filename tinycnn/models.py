"""Keras's `keras.models` namespace: the model classes and the model-file functions.

`load_model` rebuilds a model from a Keras 3 `.keras` file (tinycnn.keras_format reads the archive
and converts each layer's configuration; this module turns the configuration into a Sequential or
a functional Model).
"""
import contextlib
import os

from . import keras_format
from .errors import WeightsFileError
from .layers import InputLayer
from .layers.base import weight_budget
from .model import Model, Sequential

__all__ = ["Model", "Sequential", "load_model", "save_model", "model_from_config"]


def load_model(filepath, compile=True, device=None):
    """A model from a Keras 3 `.keras` file, written by Keras or by tinycnn: architecture, weights
    and, with `compile=True`, the compile arguments (with a fresh optimizer state)."""
    path = os.fspath(filepath)
    with keras_format.ModelArchive(path) as archive:
        config = archive.config
        # the configuration may create no more weights than the file's weights member holds
        with weight_budget(archive.weights_size + (1 << 20), lambda message: WeightsFileError(f"{path!r}: {message}")):
            # a layer or option tinycnn lacks, a shape that does not fit: the error names it
            with _config_errors(path, "model configuration", prefix=""):
                model = model_from_config(config, device=device)
                model.build()
        weights = archive.weights(keras_format.weights_file_limit(model))
    keras_format.load_weights_bytes(model, weights, path)
    if compile:
        # an optimizer, loss or option tinycnn lacks: the error names it
        with _config_errors(path, "compile configuration", prefix="its compile configuration: "):
            keras_format.compile_from_keras(model, config.get("compile_config"))
    return model


@contextlib.contextmanager
def _config_errors(path, part, prefix):
    """Errors from turning the file's `part` into a model, as WeightsFileErrors naming the file:
    a ValueError says what tinycnn lacks (after `prefix`); any other error of a wrong
    type, key or index means a malformed configuration."""
    try:
        yield
    except WeightsFileError:
        raise
    except ValueError as exc:
        raise WeightsFileError(f"{path!r}: {prefix}{exc}") from None
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise WeightsFileError(f"{path!r}: its {part} is malformed ({type(exc).__name__}: {exc})") from None


def save_model(model, filepath, overwrite=True):
    """Write `model` as a Keras 3 `.keras` file (the same as model.save)."""
    model.save(filepath, overwrite=overwrite)


def model_from_config(top, device=None):
    """A tinycnn model (not compiled, weights freshly initialized) from a `.keras` config."""
    class_name = top.get("class_name")
    config = top.get("config") or {}
    if class_name == "Sequential":
        layers = [keras_format.layer_from_keras(entry) for entry in config.get("layers", [])]
        model = Sequential(name=config.get("name"), device=device)
        for layer in layers:
            model.add(layer)
        if model.buildable():
            model.build()
        elif config.get("build_input_shape"):
            model.build(tuple(config["build_input_shape"]))
        return model
    if class_name not in ("Functional", "Model"):
        raise ValueError(f"tinycnn loads Sequential and functional models; this file holds a {class_name!r} "
                         "(a subclassed model cannot be rebuilt from its configuration)")
    entries = config.get("layers", [])
    layers = {entry.get("name", (entry.get("config") or {}).get("name")): keras_format.layer_from_keras(entry) for entry in entries}
    tensors = {}
    for name, layer in layers.items():
        if isinstance(layer, InputLayer):
            tensors[(name, 0)] = layer.output
    pending = [(entry, k, node) for entry in entries for k, node in enumerate(entry.get("inbound_nodes") or [])]
    while pending:
        remaining = []
        for entry, k, node in pending:
            name = entry.get("name", (entry.get("config") or {}).get("name"))
            layer = layers[name]
            args = node.get("args", []) if isinstance(node, dict) else node
            refs = args[0] if args else []
            refs = refs if isinstance(refs, list) else [refs]
            keys = [tuple(r["config"]["keras_history"][:2]) for r in refs]
            if not all(key in tensors for key in keys):
                remaining.append((entry, k, node))
                continue
            inputs = [tensors[key] for key in keys]
            training = (node.get("kwargs") or {}).get("training") if isinstance(node, dict) else None
            tensors[(name, k)] = layer(inputs if layer.multi_input else inputs[0],
                                       training=training if isinstance(training, bool) else None)
        if len(remaining) == len(pending):
            raise ValueError(f"the graph in the file cannot be rebuilt: the inputs of {remaining[0][0].get('name')} "
                             "never appear")
        pending = remaining

    def endpoints(spec):
        items = [spec] if spec and isinstance(spec[0], str) else spec
        return [tensors[(item[0], item[1])] for item in items], bool(spec and isinstance(spec[0], str))

    inputs, single_in = endpoints(config.get("input_layers"))
    outputs, single_out = endpoints(config.get("output_layers"))
    return Model(inputs[0] if single_in else inputs, outputs[0] if single_out else outputs, name=config.get("name"),
                 device=device)
