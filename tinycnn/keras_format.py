"""Keras 3's `.keras` model files: tinycnn writes files that Keras loads, and loads the files Keras
writes, for Sequential and functional models made of the layers tinycnn has.

A `.keras` file is a zip archive of `metadata.json` (the Keras version), `config.json` (the model:
its class, its layers' configurations and, for a functional model, the graph as each layer's
inbound nodes; the compile arguments) and `model.weights.h5` (tinycnn.keras_io's layout). The
formats were read off files Keras 3.15 wrote (tests/data/keras_models, made by
benchmarks/keras_parity/make_model_files.py).

Reading is strict: a layer class tinycnn lacks is refused with an error naming the layer and its
class; a Keras option tinycnn does not model (constraints, dilation, groups, ...) is accepted only
with the value that means "off", else refused with its name. Only the three known members of
the archive are read, each up to a size limit. The optimizer's saved state is not restored: a
loaded model is compiled with a fresh optimizer (tinycnn's own checkpoints resume exactly).
"""
import contextlib
import datetime
import io
import json
import os
import zipfile

from . import initializers, losses, metrics, optimizers, regularizers, schedules
from . import layers as L
from .errors import WeightsFileError
from .files import atomic_path
from .keras_io import h5py_module, read_weights_file, write_weights
from .npzfile import ZIP_ERRORS
from .saving import savable_weights

KERAS_VERSION = "3.15.1"  # the Keras release whose format this follows
MAX_JSON_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 2 << 30
# Keras stores the weights uncompressed; a recompressed file of real weights shrinks by 1.1-2x.
# A larger ratio would let a small file declare gigabytes of zeros.
MAX_COMPRESSION = 16

LAYER_CLASSES = {cls.__name__: cls for cls in (
    L.InputLayer, L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.Dense, L.Activation, L.ReLU, L.LeakyReLU, L.ELU,
    L.Softmax, L.Add, L.Concatenate, L.BatchNormalization, L.Dropout, L.MaxPooling2D, L.AveragePooling2D,
    L.GlobalAveragePooling2D, L.GlobalMaxPooling2D, L.Flatten, L.ZeroPadding2D, L.Rescaling)}

# Keras options tinycnn does not model, accepted with the values that mean "not used".
NEUTRAL = {
    "groups": (1,), "activity_regularizer": (None,), "kernel_constraint": (None,), "bias_constraint": (None,),
    "depthwise_constraint": (None,), "pointwise_constraint": (None,), "beta_constraint": (None,),
    "gamma_constraint": (None,), "renorm": (False,), "renorm_clipping": (None,),
    "renorm_momentum": (0.99,), "noise_shape": (None,), "quantization_config": (None,), "lora_rank": (None,),
    "lora_alpha": (None,), "max_value": (None,), "threshold": (0.0,), "sparse": (False,), "ragged": (False,),
    "optional": (False,), "dilation_rate": ([1, 1], (1, 1), 1), "data_format": ("channels_last", None),
    "keepdims": (False,), "batch_size": (None,),
}


def _policy(dtype):
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}, "registered_name": None}


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, initializers.Initializer):
        return {"module": "keras.initializers", "class_name": initializers.name_of(value),
                "config": value.get_config(), "registered_name": None}
    if isinstance(value, regularizers.Regularizer):
        return {"module": "keras.regularizers", "class_name": type(value).__name__, "config": value.get_config(),
                "registered_name": None}
    return value


# -- layers ---------------------------------------------------------------------------------------------
def layer_to_keras(layer, dtype):
    """A layer's entry in a Keras config: module, class name, configuration, build configuration."""
    if type(layer).__name__ not in LAYER_CLASSES:
        raise ValueError(f"layer {layer.name} ({type(layer).__name__}) has no Keras counterpart to save")
    config = {key: _jsonable(value) for key, value in layer.get_config().items()}
    if isinstance(layer, L.InputLayer):
        shape = config.pop("shape")
        config = {"batch_shape": [None] + list(shape), "dtype": dtype, "sparse": False, "ragged": False,
                  "name": layer.name}
        return {"module": "keras.layers", "class_name": "InputLayer", "config": config, "registered_name": None}
    config["dtype"] = _policy(dtype)
    entry = {"module": "keras.layers", "class_name": type(layer).__name__, "config": config, "registered_name": None}
    if layer.input_shape is not None:
        shape = [[None] + list(s) for s in layer.input_shape] if layer.multi_input else [None] + list(layer.input_shape)
        entry["build_config"] = {"input_shape": shape}
    return entry


def _initializer(value, where):
    if not isinstance(value, dict):
        return initializers.get(value)
    config = dict(value.get("config") or {})
    for key in ("input_axes", "output_axes"):
        if config.pop(key, None) is not None:
            raise ValueError(f"{where}: initializer option {key} is not supported by tinycnn")
    return initializers.get({"class_name": value.get("class_name"), "config": config})


def layer_from_keras(entry):
    """A tinycnn layer from a Keras config entry; refuses classes and options tinycnn lacks."""
    class_name = entry.get("class_name")
    config = dict(entry.get("config") or {})
    name = config.get("name", entry.get("name", "?"))
    cls = LAYER_CLASSES.get(class_name)
    if cls is None:
        raise ValueError(f"the model has a layer tinycnn lacks: {name} ({class_name})")
    where = f"layer {name} ({class_name})"
    if cls is L.InputLayer:
        shape = config.get("batch_shape") or [None] + list(config.get("shape") or [])
        for key in set(config) - {"batch_shape", "shape", "dtype", "name"}:
            _check_neutral(key, config[key], where)
        return L.InputLayer(shape=tuple(shape[1:]), name=name)
    config.pop("dtype", None)
    accepted = set(cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount]) | {"name", "trainable"}
    kwargs = {}
    for key, value in config.items():
        if key in accepted:
            if key.endswith("_initializer"):
                value = _initializer(value, where)
            elif key.endswith("_regularizer"):
                value = regularizers.get(value)
            elif isinstance(value, list) and key in ("padding",):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[key] = value
        elif key == "negative_slope" and cls is L.ReLU:
            _check_neutral(key, value, where, (0.0,))
        else:
            _check_neutral(key, value, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_neutral(key, value, where, allowed=None):
    allowed = NEUTRAL.get(key) if allowed is None else allowed
    if allowed is None:
        raise ValueError(f"{where}: option {key}={value!r} is not supported by tinycnn")
    if value not in allowed:
        raise ValueError(f"{where}: option {key}={value!r} is not supported by tinycnn (only {allowed[0]!r})")


# -- models -----------------------------------------------------------------------------------------------
def _node_indices(model):
    counts, index = {}, {}
    for node in model.nodes:
        index[id(node)] = counts.get(id(node.layer), 0)
        counts[id(node.layer)] = index[id(node)] + 1
    return index


def model_to_config(model):
    """The config.json of a `.keras` file for `model`."""
    model.build()
    dtype = str(model.dtype)
    if type(model).__name__ == "Sequential":
        layers = [layer_to_keras(model.inputs[0].node.layer, dtype)] + [layer_to_keras(l, dtype) for l in model.layers]
        shape = list(model.input_shape)
        config = {"name": model.name, "trainable": True, "dtype": _policy(dtype), "layers": layers,
                  "build_input_shape": shape}
        top = {"module": "keras", "class_name": "Sequential", "config": config, "registered_name": None,
               "build_config": {"input_shape": shape}}
    else:
        node_index = _node_indices(model)

        def ref(t):
            return {"class_name": "__keras_tensor__",
                    "config": {"shape": list(t.shape), "dtype": dtype,
                               "keras_history": [t.node.layer.name, node_index[id(t.node)], 0]}}

        entries = []
        for layer in model.layers:
            entry = layer_to_keras(layer, dtype)
            entry["name"] = layer.name
            entry["inbound_nodes"] = []
            for node in model.nodes:
                if node.layer is layer and node.inputs:
                    args = [[ref(t) for t in node.inputs]] if layer.multi_input else [ref(node.inputs[0])]
                    kwargs = {} if node.training is None else {"training": node.training}
                    entry["inbound_nodes"].append({"args": args, "kwargs": kwargs})
            entries.append(entry)

        def endpoints(tensors, single):
            items = [[t.node.layer.name, node_index[id(t.node)], 0] for t in tensors]
            return items[0] if single else items

        config = {"name": model.name, "trainable": True, "layers": entries,
                  "input_layers": endpoints(model.inputs, model.single_input),
                  "output_layers": endpoints(model.outputs, model.single_output)}
        top = {"module": "keras.src.models.functional", "class_name": "Functional", "config": config,
               "registered_name": None, "build_config": {"input_shape": None}}
    top["compile_config"] = compile_config(model)
    return top


# -- compile arguments ----------------------------------------------------------------------------------------
_OPTIMIZER_NEUTRAL = {"use_ema": (False,), "ema_momentum": None, "ema_overwrite_frequency": (None,),
                      "loss_scale_factor": (None,), "gradient_accumulation_steps": (None,), "amsgrad": (False,),
                      "name": None}
_SCHEDULES = {"InverseTimeDecay": schedules.InverseTimeDecay, "ExponentialDecay": schedules.ExponentialDecay,
              "PiecewiseConstantDecay": schedules.PiecewiseConstantDecay, "CosineDecay": schedules.CosineDecay}


def _schedule_to_keras(schedule):
    name = type(schedule).__name__
    if name not in _SCHEDULES:
        return None
    config = {k: v for k, v in vars(schedule).items()}
    return {"module": "keras.optimizers.schedules", "class_name": name, "config": config, "registered_name": None}


def compile_config(model):
    if model.loss is None:
        return {}
    opt = model.optimizer
    opt_config = {k: v for k, v in opt.get_config().items()}
    if callable(opt.learning_rate):
        opt_config["learning_rate"] = _schedule_to_keras(opt.learning_rate)
        if opt_config["learning_rate"] is None:
            opt_config["learning_rate"] = opt.current_learning_rate()
    loss = model.loss
    default = type(loss)()
    if losses.class_named(type(loss).__name__) is not None and loss.get_config() == default.get_config():
        loss_value = loss.name
    else:
        loss_value = {"module": "keras.losses", "class_name": type(loss).__name__,
                      "config": {**loss.get_config(), "reduction": "sum_over_batch_size"}, "registered_name": None}
    plain = len(model.metric_identifiers)
    metric_values = _metrics_to_keras(model.metric_identifiers, model.metrics[:plain])
    weighted_values = _metrics_to_keras(model.weighted_metric_identifiers, model.metrics[plain:])
    return {"optimizer": {"module": "keras.optimizers", "class_name": type(opt).__name__, "config": opt_config,
                          "registered_name": None},
            "loss": loss_value, "loss_weights": None, "metrics": metric_values or None,
            "weighted_metrics": weighted_values or None,
            "run_eagerly": False, "steps_per_execution": 1, "jit_compile": False}


def _metrics_to_keras(identifiers, metric_objects):
    return [identifier if isinstance(identifier, str) else
            {"module": "keras.metrics", "class_name": type(metric).__name__, "config": metric.get_config(),
             "registered_name": None}
            for identifier, metric in zip(identifiers, metric_objects)]


def _optimizer_from_keras(spec):
    if isinstance(spec, str):
        return optimizers.get(spec)
    cls = optimizers.class_named(spec.get("class_name"))
    if cls is None:
        raise ValueError(f"the model was compiled with optimizer {spec.get('class_name')!r}, which tinycnn lacks")
    kwargs = {}
    for key, value in (spec.get("config") or {}).items():
        if key in _OPTIMIZER_NEUTRAL:
            allowed = _OPTIMIZER_NEUTRAL[key]
            if allowed is not None and value not in allowed:
                raise ValueError(f"optimizer option {key}={value!r} is not supported by tinycnn")
            continue
        if key == "learning_rate" and isinstance(value, dict):
            schedule = _SCHEDULES.get(value.get("class_name"))
            if schedule is None:
                raise ValueError(f"learning-rate schedule {value.get('class_name')!r} is not supported by tinycnn")
            config = {k: v for k, v in (value.get("config") or {}).items() if k != "name"}
            try:
                value = schedule(**config)
            except TypeError as error:  # an option a later Keras added that tinycnn's schedule lacks
                raise ValueError(f"learning-rate schedule {value.get('class_name')} with options {sorted(config)}: "
                                 f"{error}") from None
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:  # an option tinycnn's optimizer lacks
        raise ValueError(f"optimizer {spec.get('class_name')} with options {sorted(kwargs)}: {error}") from None


def _loss_from_keras(spec):
    if isinstance(spec, str) or spec is None:
        return spec
    cls = losses.class_named(spec.get("class_name"))
    if cls is None:
        raise ValueError(f"the model was compiled with loss {spec.get('class_name')!r}, which tinycnn lacks")
    config = dict(spec.get("config") or {})
    for key, neutral in (("reduction", "sum_over_batch_size"), ("label_smoothing", 0.0), ("axis", -1),
                         ("ignore_class", None), ("dtype", None)):
        value = config.pop(key, neutral)
        if value != neutral and not (key == "dtype"):
            raise ValueError(f"loss option {key}={value!r} is not supported by tinycnn")
    return cls(**{k: v for k, v in config.items() if k in ("from_logits", "name")})


def _metric_from_keras(spec):
    if isinstance(spec, str):
        return spec
    cls = metrics.class_named(spec.get("class_name"))
    if cls is None:
        raise ValueError(f"the model was compiled with metric {spec.get('class_name')!r}, which tinycnn lacks")
    config = {k: v for k, v in (spec.get("config") or {}).items() if k in ("name", "k", "threshold")}
    return cls(**config)


def compile_from_keras(model, spec):
    """Compile `model` as the file's compile_config says (nothing when it is empty)."""
    if not spec or spec.get("loss") is None:
        return
    weights = spec.get("loss_weights")
    if weights is not None and not (isinstance(weights, list) and all(isinstance(w, str) for w in weights)) \
            and weights not in (1, 1.0, [1], [1.0]):
        raise ValueError(f"loss_weights={weights!r} is not supported by tinycnn (one output, weight 1)")
    model.compile(_optimizer_from_keras(spec.get("optimizer") or "rmsprop"), _loss_from_keras(spec["loss"]),
                  metrics=[_metric_from_keras(m) for m in spec.get("metrics") or []],
                  weighted_metrics=[_metric_from_keras(m) for m in spec.get("weighted_metrics") or []])


# -- files ------------------------------------------------------------------------------------------------
def save_model(model, path):
    """Write `model` as a Keras 3 `.keras` file (atomically)."""
    h5py = h5py_module()
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"a model file must end in .keras (Keras 3's format), got {path!r}; for weights alone use "
                         "save_weights with .weights.h5 or .npz")
    model.build()  # so that the weights checked are the ones written
    weights = savable_weights(model)
    config = model_to_config(model)
    metadata = {"keras_version": KERAS_VERSION, "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver=("v110", "v110")) as f:
        write_weights(model, f, weights)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr("metadata.json", json.dumps(metadata))
            zf.writestr("config.json", json.dumps(config))
            zf.writestr("model.weights.h5", buffer.getvalue())


class ModelArchive:
    """A `.keras` file opened for checked reading: the config at once (a JSON object of bounded
    size), the weights member only when asked, up to a size the caller derives from the model the
    config describes (so a small file cannot make tinycnn read or allocate gigabytes)."""

    def __init__(self, path):
        self.path = path = os.fspath(path)
        if not os.path.exists(path):
            raise WeightsFileError(f"model file {path!r} does not exist")
        if os.path.isdir(path) or not zipfile.is_zipfile(path):
            hint = " (a legacy Keras 2 .h5 model? tinycnn reads Keras 3's .keras format)" if path.endswith(".h5") else ""
            raise WeightsFileError(f"{path!r} is not a .keras model file (not a zip archive){hint}")
        try:
            with self._reading():
                self.zip = zipfile.ZipFile(path)
                self.config = json.loads(self._member("config.json", MAX_JSON_BYTES))
                self.weights_size = self._weights_size(self._info("model.weights.h5"))
        except WeightsFileError:
            self.close()
            raise
        if not isinstance(self.config, dict):
            self.close()
            raise WeightsFileError(f"{path!r}: config.json does not hold a model configuration")

    def _weights_size(self, info):
        """The most bytes the weights member can hold, as far as the file itself can vouch: its
        declared size, but never more than its stored bytes allow (a stored member is as long as
        its data; a compressed one at most MAX_COMPRESSION times that), nor MAX_WEIGHTS_BYTES."""
        if info.compress_size > os.path.getsize(self.path):
            raise WeightsFileError(f"{self.path!r}: model.weights.h5 declares {info.compress_size} stored bytes, more "
                                   "than the whole file holds (truncated or crafted)")
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_COMPRESSION
        return min(info.file_size, info.compress_size * ratio, MAX_WEIGHTS_BYTES)

    @contextlib.contextmanager
    def _reading(self):
        """What zipfile and json raise on a damaged file (json's errors are ValueErrors, its
        RecursionError a RuntimeError: all among ZIP_ERRORS) as a WeightsFileError naming it."""
        try:
            yield
        except WeightsFileError:
            raise
        except ZIP_ERRORS as exc:
            raise WeightsFileError(f"{self.path!r} is not a readable .keras file (corrupt or truncated?): "
                                   f"{exc}") from None

    def _info(self, name):
        try:
            return self.zip.getinfo(name)
        except KeyError:
            raise WeightsFileError(f"{self.path!r} is not a .keras model file: it has no {name}") from None

    def _member(self, name, limit):
        """The bytes of member `name`, refused when it declares or holds more than `limit`."""
        info = self._info(name)
        if info.file_size > limit:
            raise WeightsFileError(f"{self.path!r}: {name} declares {info.file_size} bytes, more than the "
                                   f"{limit} allowed")
        with self.zip.open(info) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise WeightsFileError(f"{self.path!r}: {name} is larger than the {limit} bytes allowed")
        return data

    def weights(self, limit):
        """The bytes of model.weights.h5, refused when they declare more than `limit` bytes."""
        with self._reading():
            return self._member("model.weights.h5", min(limit, MAX_WEIGHTS_BYTES))

    def close(self):
        if getattr(self, "zip", None) is not None:
            self.zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def weights_file_limit(model):
    """The most bytes an HDF5 weights file of `model` can need: its values in float64 (Keras writes
    float64 weights for a float64 model) plus HDF5's bookkeeping (a few KiB per array; 16 KiB and
    1 MiB are generous)."""
    arrays = [w for layer in model.compute_layers for w in layer.weights.values()]
    return sum(w.size * 8 for w in arrays) + 16 * 1024 * len(arrays) + (1 << 20)


def load_weights_bytes(model, weights, path):
    """Assign the weights of a `.keras` file's model.weights.h5 (bytes) to `model`, all checked first."""
    plan = read_weights_file(model, io.BytesIO(weights), f"{path}:model.weights.h5")
    for layer, values in plan:
        layer.set_weights(values)


def sniff_weights_format(path):
    """"h5" or "npz" from a file's first bytes (None if neither)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise WeightsFileError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "h5"
    if head.startswith(b"PK"):
        return "npz"
    return None
