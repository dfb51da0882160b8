"""Models: a graph of layers between input and output tensors, and the weights of those layers.

    inputs = tinycnn.Input(shape=(28, 28, 1))
    x = layers.Conv2D(16, 3, activation="relu")(inputs)
    ...
    model = tinycnn.Model(inputs, outputs)

`Model` holds structure (the nodes in topological order, `layers`), builds every layer once for
its device and dtype, and keeps the trainable weights in one flat buffer (tinycnn.parameters).
Training and inference come from `Trainer` (tinycnn.training); how the graph runs, including
which layers are fused, is the execution plan's business (tinycnn.plan). `Sequential` is a
Model whose graph is a chain, built from its list of layers.
"""
import os

import numpy as np

from . import arguments, naming, saving
from .backend import get_backend
from .concurrency import exclusive
from .errors import GraphError, ShapeError, WeightsFileError
from .graph import SymbolicTensor, layer_order, topological_nodes
from .layers.base import InputLayer, Layer, trainable_version
from .parameters import ParameterBuffer
from .plan import Plan
from .randomness import derive_seed, fresh_seed
from .training import Trainer


def _as_list(tensors):
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


class Model(Trainer):
    """A network as a graph: `Model(inputs, outputs)` with the symbolic tensors of tinycnn.Input and
    the layer calls between them, on one device ('cpu', 'gpu' or 'auto'), in float32 or float64."""

    def __init__(self, inputs, outputs, name=None, device=None, dtype="float32", seed=None, fuse=True):
        self._setup(name or naming.unique_name("model"), device, dtype, seed, fuse)
        self._set_graph(inputs, outputs)

    def _setup(self, name, device, dtype, seed, fuse):
        self.name = name
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"models compute in float32 or float64, not {self.dtype}")
        # Without a seed, draw one now: the model is still reproducible from `model.seed`.
        self.seed = fresh_seed() if seed is None else arguments.integer(seed, "seed", minimum=0)
        self.fuse = bool(fuse)  # let the plan run a BatchNormalization and the Dropout after it as one kernel
        self.built = False
        self.params = None
        self._params_version = self._params_signature = None
        self._plans = {}
        Trainer.__init__(self)

    def _set_graph(self, inputs, outputs):
        self.single_input = not isinstance(inputs, (list, tuple))
        self.single_output = not isinstance(outputs, (list, tuple))
        self.inputs, self.outputs = _as_list(inputs), _as_list(outputs)
        self.nodes = topological_nodes(self.inputs, self.outputs)
        layers = layer_order(self.nodes)
        names = [layer.name for layer in layers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise GraphError(f"the layer name {repeated[0]!r} is used {names.count(repeated[0])} times in the model; "
                             "layer names must be unique (weights are saved and loaded by name)")
        self._graph_layers = layers
        self.built = False
        self._plans = {}

    # -- structure ----------------------------------------------------------------------------------
    @property
    def layers(self):
        """Every layer once, in graph order (InputLayers included, as in Keras's functional models)."""
        return list(self._graph_layers)

    @property
    def compute_layers(self):
        """The layers that compute (no InputLayers), in graph order: the order in which their
        weights are built, seeded, saved and updated."""
        return [layer for layer in self._graph_layers if not isinstance(layer, InputLayer)]

    @property
    def input_shape(self):
        """Keras's form: (None, ...) per input; a list for a model with several."""
        shapes = [t.shape for t in self.inputs]
        return shapes[0] if self.single_input else shapes

    @property
    def output_shape(self):
        shapes = [t.shape for t in self.outputs]
        return shapes[0] if self.single_output else shapes

    def get_layer(self, name=None, index=None):
        """A layer by name, or by its position in `layers`."""
        if index is not None:
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"model {self.name} has no layer named {name!r}; its layers are "
                         f"{', '.join(l.name for l in self.layers)}")

    def buildable(self):
        """Whether every shape is known, so `build()` can run."""
        return True

    def build(self, input_shape=None):
        """Build every layer for this model's device and dtype (each layer once; a layer another
        model built keeps its weights) and gather the trainable weights into the flat buffer."""
        if self.built:
            return
        order = {}
        for node in self.nodes:
            layer = node.layer
            if isinstance(layer, InputLayer):
                continue
            order.setdefault(id(layer), len(order))
            shapes = [t.shape[1:] for t in node.inputs]
            layer.build(shapes if layer.multi_input else shapes[0], self.backend, self.dtype,
                        seed=derive_seed(self.seed, 0, order[id(layer)]))
        self.built = True
        self.params = None
        self.refresh_parameters()

    def _trainable_signature(self):
        return tuple(layer.trainable for layer in self.compute_layers)

    def refresh_parameters(self):
        """Keep the flat parameter buffer in step with the layers: rebuilt (and the plans with it)
        when a layer was frozen or unfrozen since it was made; otherwise it takes back any weight a
        model sharing a layer with this one holds. Runs before every training step."""
        self.build()
        version = trainable_version()
        if self.params is not None and version == self._params_version:
            self.params.bind()
            return
        signature = self._trainable_signature()
        if self.params is None or signature != self._params_signature:
            entries = [(layer, name) for layer in self.compute_layers for name in layer.trainable_names]
            self.params = ParameterBuffer(entries, self.xp, self.dtype)
            self._params_signature = signature
            self._plans = {}
        else:
            self.params.bind()
        self._params_version = version

    def plan(self, strip_activation=None):
        """The execution plan of the graph (tinycnn.plan). `strip_activation` ("softmax" or
        "sigmoid"): the loss applies that activation of the output layer itself."""
        self.build()
        if self._params_version != trainable_version():
            self.refresh_parameters()
        if strip_activation not in self._plans:
            self._plans[strip_activation] = Plan(self.nodes, self.inputs, self.outputs, self.fuse, strip_activation,
                                                 self.backend.kernels.fuses_relu_batchnorm)
        return self._plans[strip_activation]

    @exclusive
    def __call__(self, x, training=None):
        """The outputs for input arrays (device arrays; a list for several outputs). `training`
        True/False sets every layer's mode; None (inference) leaves the modes calls fixed."""
        if any(isinstance(t, SymbolicTensor) for t in _as_list(x)):
            raise GraphError("calling a model on symbolic tensors (a model as a layer) is not supported yet")
        inputs = self.check_inputs(x)
        with self.cpu_threads(inputs[0].shape[0]):
            outputs, _ = self.plan().forward(inputs, training=None if training is None else bool(training),
                                             keep_for_backward=False)
        return outputs[0] if self.single_output else outputs

    # -- weights ------------------------------------------------------------------------------------
    def count_params(self):
        self.build()
        return sum(layer.count_params() for layer in self.compute_layers)

    @property
    def weights(self):
        """Every weight (device arrays), layer by layer in Keras order."""
        self.build()
        return [w for layer in self.compute_layers for w in layer.weights.values()]

    @property
    def trainable_weights(self):
        self.build()
        return [layer.weights[name] for layer in self.compute_layers for name in layer.trainable_names]

    @property
    def non_trainable_weights(self):
        self.build()
        return [w for layer in self.compute_layers for name, w in layer.weights.items()
                if name not in layer.trainable_names]

    def get_weights(self):
        self.build()
        return [w for layer in self.compute_layers for w in layer.get_weights()]

    @exclusive
    def set_weights(self, weights):
        """Assign every weight, in `get_weights` order. All are checked (count, shapes, finite
        values) before any is assigned: a bad list leaves the model untouched."""
        self.build()
        weights = list(weights)
        layers = self.compute_layers
        expected = sum(len(layer.weights) for layer in layers)
        if len(weights) != expected:
            raise ValueError(f"the model has {expected} weight arrays, got {len(weights)}")
        checked, start = [], 0
        for layer in layers:
            checked.append(layer.check_weights(weights[start : start + len(layer.weights)]))
            start += len(layer.weights)
        for layer, values in zip(layers, checked):
            layer.set_weights(values)

    @exclusive
    def save(self, filepath, overwrite=True):
        """Write the model (architecture, weights, compile arguments) as a Keras 3 `.keras` file."""
        from . import keras_format

        if not overwrite and os.path.exists(os.fspath(filepath)):
            raise FileExistsError(f"{os.fspath(filepath)!r} exists and overwrite=False")
        keras_format.save_model(self, filepath)

    @exclusive
    def save_weights(self, filepath, overwrite=True):
        """The weights alone, in the format the name asks for: `.weights.h5` (Keras 3's layout, needs
        h5py) or `.npz` (tinycnn's, no pickle)."""
        path = os.fspath(filepath)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path!r} exists and overwrite=False")
        self.build()
        if path.endswith(".weights.h5"):
            self.save_keras_weights(path)
        elif path.endswith(".npz"):
            saving.save_weights(self, path)
        else:
            raise ValueError(f"save_weights writes .weights.h5 (Keras's format) or .npz (tinycnn's), got {path!r}"
                             + ("; .keras files hold whole models: use model.save" if path.endswith(".keras") else ""))

    @exclusive
    def load_weights(self, filepath, by_name=False):
        """Load weights saved by save_weights (or by Keras's), whichever format the file holds."""
        from . import keras_format

        path = os.fspath(filepath)
        if not os.path.exists(path):
            raise WeightsFileError(f"weights file {path!r} does not exist")
        if not os.path.isfile(path):
            raise WeightsFileError(f"{path!r} is not a file (a directory?)")
        self.build()
        kind = keras_format.sniff_weights_format(path)
        if kind == "h5":
            if by_name:
                raise ValueError("by_name=True is supported for tinycnn's .npz weights only")
            self.load_keras_weights(path)
        elif kind == "npz" and not path.endswith(".keras"):
            saving.load_weights(self, path, by_name=by_name)
        elif kind == "npz":
            raise WeightsFileError(f"{path!r} is a whole model: load it with tinycnn.models.load_model")
        else:
            raise WeightsFileError(f"{path!r} is neither an HDF5 (.weights.h5) nor an .npz weights file")

    def export_onnx(self, filepath, channels_first=False, fold_batchnorm=True, opset=None):
        """Write the inference graph as an ONNX file (tinycnn.onnx; needs the onnx package)."""
        from . import onnx as onnx_export

        return onnx_export.export(self, filepath, channels_first=channels_first, fold_batchnorm=fold_batchnorm,
                                  opset=opset or onnx_export.DEFAULT_OPSET)

    def save_keras_weights(self, path):
        """Write a Keras 3 `.weights.h5` file that Keras loads into the same architecture (needs h5py)."""
        from . import keras_io

        keras_io.save_keras_weights(self, path)

    def load_keras_weights(self, path):
        """Load a Keras 3 `.weights.h5` file of the same architecture (needs h5py)."""
        from . import keras_io

        keras_io.load_keras_weights(self, path)

    # -- summary -----------------------------------------------------------------------------------
    def _sequential_like(self):
        """Keras 2's test: a chain of single-input nodes with no shared layer prints as a Sequential."""
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            return False
        read = set()
        for node in self.nodes:
            if len(node.inputs) > 1:
                return False
            for t in node.inputs:
                if id(t) in read:
                    return False
                read.add(id(t))
        return len(self._graph_layers) == len(self.nodes)

    def _connections(self, layer):
        """Keras 2's 'Connected to' entries of a layer: inbound layer[node index][tensor index]."""
        node_index = {}
        for node in self.nodes:
            node_index[id(node)] = sum(1 for other in self.nodes[: self.nodes.index(node)] if other.layer is node.layer)
        return [f"{t.node.layer.name}[{node_index[id(t.node)]}][0]"
                for node in self.nodes if node.layer is layer for t in node.inputs]

    def summary(self, line_length=None, positions=None, print_fn=None):
        """The Keras 2 summary table, character for character (fields cut to their column): three
        columns for a chain of layers, four ("Connected to") for any other graph."""
        self.build()
        print_fn = print_fn or print
        chain = self._sequential_like()
        if chain:
            line_length = line_length or 65
            positions = positions or (0.45, 0.85, 1.0)
            headers = ["Layer (type)", "Output Shape", "Param #"]
        else:
            line_length = line_length or 98
            positions = positions or (0.33, 0.55, 0.67, 1.0)
            headers = ["Layer (type)", "Output Shape", "Param #", "Connected to"]
        cols = [int(line_length * p) for p in positions] if positions[-1] <= 1 else list(positions)

        def row(fields):
            line = ""
            for i, field in enumerate(fields):
                if i > 0:
                    line = line[:-1] + " "
                line += str(field)
                line = line[: cols[i]]
                line += " " * (cols[i] - len(line))
            print_fn(line)

        print_fn(f'Model: "{self.name}"')
        print_fn("_" * line_length)
        row(headers)
        print_fn("=" * line_length)
        layers = self.layers
        for i, layer in enumerate(layers):
            fields = [f"{layer.name} ({type(layer).__name__})", str((None,) + tuple(layer.output_shape)),
                      layer.count_params()]
            if chain:
                row(fields)
            else:
                connections = self._connections(layer)
                row(fields + [connections[0] if connections else ""])
                for extra in connections[1:]:
                    row(["", "", "", extra])
            print_fn(("=" if i == len(layers) - 1 else "_") * line_length)
        total = self.count_params()
        trainable = sum(layer.count_trainable_params() for layer in self.compute_layers)
        print_fn(f"Total params: {total:,}")
        print_fn(f"Trainable params: {trainable:,}")
        print_fn(f"Non-trainable params: {total - trainable:,}")
        print_fn("_" * line_length)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}: {len(self.compute_layers)} layers on {self.backend.name}>"


class Sequential(Model):
    """A linear stack of layers: a Model whose graph is a chain, made from its list of layers.

    The input shape comes from the first layer's `input_shape=`, an `InputLayer` (or a
    `tinycnn.Input`) at the head of the list, `build((None, ...))`, or the first data it sees.
    Layers may be added after the model is built (even after `summary()`): it rebuilds, and the
    layers it already had keep their weights."""

    def __init__(self, layers=None, device=None, name=None, dtype="float32", seed=None, fuse=True):
        self._setup(name or naming.unique_name("sequential"), device, dtype, seed, fuse)
        self._stack = []
        self._input_layer = None
        self._made_nodes = []
        self.inputs = self.outputs = []
        self.single_input = self.single_output = True
        self.nodes, self._graph_layers = [], []
        for layer in layers or []:
            self._append(layer)
        if self.buildable():  # as Keras builds a Sequential whose input shape is known
            self.build()

    def add(self, layer):
        """Append a layer; the model rebuilds (now, if its input shape is known), keeping the
        weights of the layers it had."""
        self._append(layer)
        if self.buildable():
            self.build()

    def _append(self, layer):
        if isinstance(layer, SymbolicTensor) and isinstance(layer.node.layer, InputLayer):
            layer = layer.node.layer  # Keras 3 accepts keras.Input(...) at the head of a Sequential
        if isinstance(layer, InputLayer):
            if self._stack or self._input_layer is not None:
                raise GraphError("an InputLayer can only be the first entry of a Sequential")
            self._input_layer = layer
        elif not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add expects a tinycnn layer, got {type(layer).__name__}")
        elif layer.multi_input:
            raise GraphError(f"{type(layer).__name__} merges several inputs; use the functional API "
                             "(tinycnn.Input and tinycnn.Model) for graphs with branches")
        else:
            shape = self._declared_input_shape() if self._stack or self._input_layer else layer.input_shape
            if shape is not None and (self._stack or self._input_layer):
                for before in self._stack:  # refuse a layer that does not fit, before it is added
                    shape = before.configure(shape)
                layer.configure(shape)
            self._stack.append(layer)
        self.built = False
        self._plans = {}

    @property
    def layers(self):
        """The stacked layers (without the input layer, as in Keras)."""
        return list(self._stack)

    @property
    def input_shape(self):
        if self.inputs:
            return self.inputs[0].shape
        declared = self._declared_input_shape()
        return None if declared is None else (None,) + declared

    @property
    def output_shape(self):
        return self.outputs[0].shape if self.built else None

    def buildable(self):
        return self.built or (bool(self._stack) and self._declared_input_shape() is not None)

    def _declared_input_shape(self):
        if self._input_layer is not None:
            return self._input_layer.input_shape
        return self._stack[0].input_shape if self._stack else None

    def build(self, input_shape=None):
        """Chain the layers from the input shape (`(None, ...)` as in Keras, or without the batch
        axis), then build them."""
        shape = self._declared_input_shape() if not self.built else self.inputs[0].shape[1:]
        if input_shape is not None:
            given = tuple(input_shape)
            given = given[1:] if given and given[0] is None else given
            if shape is not None and tuple(shape) != tuple(given):
                raise ShapeError(f"model {self.name} was declared with input shape {tuple(shape)}, build got {given}")
            shape = given
        if self.built:
            return
        if not self._stack:
            raise ValueError("the model has no layers")
        if shape is None:
            raise ValueError("the first layer needs input_shape=(...) (or call model.build((None, ...)))")
        for node in self._made_nodes:  # a rebuild (after add): forget the previous chain
            if node in node.layer.inbound_nodes:
                node.layer.inbound_nodes.remove(node)
        head = self._input_layer or InputLayer(shape=shape, name=f"{self._stack[0].name}_input")
        x = head.output
        self._made_nodes = []
        for layer in self._stack:
            x = layer(x)
            self._made_nodes.append(x.node)
        self._set_graph(head.output, x)
        super().build()
        if self.loss is not None:  # compiled before this (re)build: resolve metrics for the new output
            self.resolve_compile()

    def _sequential_like(self):
        return True
