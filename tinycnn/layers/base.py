"""The layer protocol, the input layer, and the base of layers that end in an activation.

A layer is configured for one input shape (from `input_shape=`, an `Input`, or its first call),
built once for one backend and dtype (its weights, in Keras order, in `layer.weights`), and then
computes with two methods that keep no state between calls:

    y, saved = layer.forward(x, training)
    dx, grads = layer.backward(saved, dy, need_input_grad)

`saved` holds what the backward pass needs; whoever runs the layer (a model's execution plan,
the gradient checker) keeps it only when a backward pass will follow, so inference keeps
nothing, and a layer used twice in one graph has one `saved` per use. `grads` maps each
trainable weight's name to its gradient; the plan sums the gradients of every use. Neither
method may modify its inputs (`x`, `dy`, `saved` may be shared).

Layer math is written once against `self.xp` (NumPy or CuPy); the hot loops go through
`self.kernels`, the backend's kernel set.
"""
import contextlib
import inspect
import math
import threading

import numpy as np

from .. import activations, arguments, initializers, naming, parameters
from .. import regularizers as regularizers_module
from ..arrays import is_array, to_numpy
from ..backend import get_backend
from ..errors import GraphError, ShapeError
from ..graph import Node, SymbolicTensor


def pair(value, what):
    """A (height, width) pair of positive ints from an int or a pair."""
    return arguments.integer_tuple(value, what, 2, minimum=1)


def padding_mode(padding, what):
    return arguments.choice(padding, f"{what} padding", ("valid", "same"))


def window_pads(mode, size_hw, window, strides):
    """(top, bottom, left, right) of a window moving by `strides`: zeros for 'valid'; for 'same'
    enough to give ceil(size / stride) outputs, the odd pixel at the bottom/right as Keras does."""
    if mode == "valid":
        return (0, 0, 0, 0)
    pads = []
    for size, k, s in zip(size_hw, window, strides):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def channels_last(data_format, what):
    """tinycnn is NHWC throughout: data_format may only be None or "channels_last"."""
    if data_format not in (None, "channels_last"):
        raise ValueError(f"{what} supports data_format='channels_last' only (tinycnn is NHWC), got {data_format!r}")


def no_dilation(dilation_rate, what):
    if pair(dilation_rate, f"{what} dilation_rate") != (1, 1):
        raise ValueError(f"{what} supports dilation_rate=1 only, got {dilation_rate!r}")


def _shape_tuple(shape, what):
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = arguments.integer_tuple(shape, what, minimum=1)
    except (TypeError, ValueError):
        raise ShapeError(f"{what} must be a non-empty tuple of positive ints (no batch axis), got {shape!r}") from None
    if not shape:
        raise ShapeError(f"{what} must be a non-empty tuple of positive ints (no batch axis), got {shape!r}")
    return shape


_budget = threading.local()  # the weight bytes a model file's configuration may still create


@contextlib.contextmanager
def weight_budget(nbytes, error):
    """Within the block, creating weights of more than `nbytes` in all raises `error(message)`
    before anything is allocated. Loading a model file uses it: its configuration may create no
    more weights than its weights member holds, so a small crafted file cannot allocate gigabytes."""
    stack = _budget.__dict__.setdefault("stack", [])
    stack.append([nbytes, error])  # nested budgets: a weight is charged to every one in force
    try:
        yield
    finally:
        stack.pop()


def _charge_weight_budget(layer, name, nbytes):
    stack = _budget.__dict__.get("stack") or ()
    for left, error in stack:
        if nbytes > left:
            raise error(f"layer {layer.name}: weight {name!r} ({nbytes:,} bytes) would exceed what the file's "
                        f"weights hold ({left:,} bytes left): the configuration does not match its weights")
    for entry in stack:
        entry[0] -= nbytes


_trainable_changes = [0]  # counts assignments to any layer's `trainable`: models recheck their buffers then


def trainable_version():
    """A number that changes whenever some layer's `trainable` is set (cheap to compare per step)."""
    return _trainable_changes[0]


class Layer:
    """Base class: naming, configuring, building, weights, calling on tensors or arrays.

    `trainable = False` freezes every weight of the layer: the optimizer leaves them alone, the
    summary counts them as non-trainable, and a BatchNormalization then normalizes with its
    moving statistics (as in Keras). A model notices the change at its next training step."""

    base_name = "layer"
    multi_input = False  # merge layers take a list of inputs
    # Whether two threads may run forward and backward at once, on two shares of one batch
    # (tinycnn.batch_split): true of tinycnn's layers, which keep what a call needs in `saved`
    # and coordinate the rest (Dropout's seeds, BatchNormalization's statistics). A custom layer
    # that does the same may set it; otherwise a graph holding it trains unsplit. In `fit` the
    # second share runs in a forked process (tinycnn.share_process): what such a layer changes on
    # itself there stays in that process; only the first share's changes reach the model.
    thread_safe = False

    def __init__(self, name=None, input_shape=None, trainable=True, **unknown):
        if unknown:
            accepted = [p for p in inspect.signature(type(self).__init__).parameters if p not in ("self", "kwargs")]
            accepted += ["name", "input_shape", "trainable"]
            raise TypeError(
                f"{type(self).__name__} got unknown argument(s) {', '.join(map(repr, sorted(unknown)))}; "
                f"it accepts: {', '.join(dict.fromkeys(accepted))}"
            )
        self.name = name or naming.unique_name(self.base_name)
        self.input_shape = None if input_shape is None else _shape_tuple(input_shape, f"{self.name} input_shape")
        self.output_shape = None
        self.built = False
        self.backend = None
        self.trainable = bool(trainable)
        self.weights = {}  # name -> device array, Keras order
        self.weight_trainable = {}  # name -> whether the weight is trainable (moving statistics are not)
        self.regularizers = {}  # name -> Regularizer, for weights with a penalty
        self.inbound_nodes = []  # one Node per call on a symbolic tensor

    # -- configuring and building ---------------------------------------------------------------
    def configure(self, input_shape):
        """Fix the input shape (without the batch axis) and compute the output shape; no weights.
        A layer keeps one input shape: calling it again on another shape is a ShapeError."""
        if self.multi_input:
            input_shape = [tuple(int(d) for d in s) for s in input_shape]
        else:
            input_shape = tuple(int(d) for d in input_shape)
        if self.input_shape is not None and _as_key(self.input_shape) != _as_key(input_shape):
            raise ShapeError(f"layer {self.name} was configured for inputs of shape {self.input_shape}, "
                             f"got {input_shape}")
        output_shape = self.compute_output_shape(input_shape)
        self.input_shape, self.output_shape = input_shape, tuple(output_shape)
        return self.output_shape

    def build(self, input_shape, backend=None, dtype="float32", seed=None):
        """Create the weights for inputs of shape `input_shape` (without the batch axis) on
        `backend` in `dtype`, initialized from `seed`. A layer is built once: building it again
        (for instance by a second model that shares it) checks that everything matches and keeps
        the weights."""
        backend = get_backend(backend)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"layers compute in float32 or float64, not {dtype}")
        if self.built:
            if backend.name != self.backend.name or dtype != self.dtype:
                raise GraphError(f"layer {self.name} was built for {self.dtype} on {self.backend.name}; it cannot "
                                 f"also compute in {dtype} on {backend.name} (make a new layer)")
            self.configure(input_shape)
            return self.output_shape
        self.configure(input_shape)
        self.backend, self.xp, self.kernels, self.dtype = backend, backend.xp, backend.kernels, dtype
        self.weights, self.weight_trainable = {}, {}
        self.create_weights(self.input_shape, np.random.default_rng(seed))
        self.built = True
        return self.output_shape

    def create_weights(self, input_shape, rng):
        """Subclasses with weights call `add_weight` here (host-side init, so CPU and GPU agree)."""

    def add_weight(self, name, shape, initializer, rng, trainable=True, regularizer=None):
        """Create weight `name` of `shape` from `initializer` (an Initializer or a name), drawing
        from the layer's generator `rng` unless the initializer has a seed of its own."""
        nbytes = math.prod(shape) * self.dtype.itemsize
        _charge_weight_budget(self, name, nbytes)
        try:
            value = initializers.get(initializer)(shape, self.dtype, rng)
            self.weights[name] = self.backend.asarray(value)
        except MemoryError:
            raise MemoryError(f"layer {self.name}: weight {name!r} of shape {tuple(shape)} needs {nbytes / 2**30:.1f} GiB, "
                              "more than this machine can allocate") from None
        self.weight_trainable[name] = bool(trainable)
        regularizer = regularizers_module.get(regularizer)
        if regularizer is not None:
            self.regularizers[name] = regularizer

    @property
    def trainable(self):
        return self.__dict__["_trainable"]

    @trainable.setter
    def trainable(self, value):
        self.__dict__["_trainable"] = bool(value)
        _trainable_changes[0] += 1

    @property
    def trainable_names(self):
        """The weights the optimizer updates, in Keras order (none while the layer is frozen)."""
        if not self.trainable:
            return []
        return [name for name, trainable in self.weight_trainable.items() if trainable]

    def compute_output_shape(self, input_shape):
        return input_shape

    # -- weights ----------------------------------------------------------------------------
    def count_params(self):
        return int(sum(w.size for w in self.weights.values()))

    def count_trainable_params(self):
        return int(sum(self.weights[n].size for n in self.trainable_names))

    def get_weights(self):
        """NumPy copies in Keras order (kernel, bias; gamma, beta, moving_mean, moving_variance)."""
        return [np.array(to_numpy(w), copy=True) for w in self.weights.values()]

    def check_weights(self, values):
        """`values` as NumPy arrays after checking count, shapes and finiteness (nothing assigned)."""
        values = list(values)
        if len(values) != len(self.weights):
            raise ValueError(f"layer {self.name} has {len(self.weights)} weights, got {len(values)}")
        checked = []
        for (name, current), value in zip(self.weights.items(), values):
            value = np.asarray(to_numpy(value))
            if value.shape != current.shape:
                raise ShapeError(f"layer {self.name} weight {name!r}: expected shape {current.shape}, got {value.shape}")
            if value.dtype.kind not in "biuf":
                raise TypeError(f"layer {self.name} weight {name!r}: expected numbers, got dtype {value.dtype}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"layer {self.name} weight {name!r} contains NaN or inf")
            with np.errstate(over="ignore"):
                converted = value.astype(current.dtype)
            if not np.all(np.isfinite(converted)):
                raise ValueError(f"layer {self.name} weight {name!r} holds values beyond {current.dtype}'s range")
            checked.append(converted)
        return checked

    def set_weights(self, values):
        """Assign in place (views into a model's flat buffers stay valid). Every value is checked
        before any is assigned, so a bad list leaves the layer untouched."""
        for current, value in zip(self.weights.values(), self.check_weights(values)):
            current[...] = self.xp.asarray(value, dtype=self.dtype)

    # -- computing --------------------------------------------------------------------------
    def forward(self, x, training):
        """(y, saved): the output, and what `backward` needs."""
        raise NotImplementedError

    def backward(self, saved, dy, need_input_grad=True):
        """(dx, grads): the input gradient (None when not needed) and {weight name: gradient}."""
        raise NotImplementedError

    def gradient_array(self, name, shape):
        """An array to compute weight `name`'s gradient into, in `shape` (the weight's, or a reshape
        of it): its slot in the model's gradient buffer during a backward pass that has not written
        it yet (tinycnn.parameters.gradient_target: no copy after), else a new array."""
        target = parameters.gradient_target(self, name)
        return self.xp.empty(shape, dtype=self.dtype) if target is None else target.reshape(shape)

    def bias_gradient(self, dz2d):
        """The bias gradient of a (rows, units) output gradient: its column sums, into its slot."""
        return dz2d.sum(axis=0, out=self.gradient_array("bias", (dz2d.shape[1],)))

    def reseed(self, seed):
        """Layers that draw random numbers during training restart their stream from `seed`."""

    def random_state(self):
        """The state of the layer's random stream (None for layers without one): data-parallel
        ranks take rank 0's, so they draw the same masks."""
        return None

    def set_random_state(self, state):
        """Restore a `random_state()`."""

    def place_in_batch(self, first_sample):
        """Layers that draw random masks draw them for samples `first_sample`, `first_sample + 1`, ...
        of the batch: a rank of data-parallel training computes part of a global batch."""

    def get_config(self):
        """The layer's constructor arguments, under Keras's names (so `type(layer)(**config)` remakes it)."""
        return {"name": self.name, "trainable": self.trainable}

    def __call__(self, inputs, training=None):
        """On a symbolic tensor (from tinycnn.Input): record the call in the graph and return the
        output tensor; `training=True/False` is this call's mode when the model is called on arrays
        without one (`model(x)`); fit, evaluate and predict override it, as in Keras 3.
        On arrays: compute the output (building the layer on first use), in inference mode unless
        `training=True`."""
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        symbolic = [isinstance(t, SymbolicTensor) for t in items]
        if any(symbolic):
            if not all(symbolic):
                raise GraphError(f"layer {self.name} got a mix of symbolic tensors and arrays")
            return self._call_symbolic(inputs, training)
        return self._call_arrays(inputs, bool(training))

    def _check_arity(self, inputs):
        if self.multi_input:
            if not isinstance(inputs, (list, tuple)) or len(inputs) < 2:
                raise GraphError(f"{type(self).__name__} {self.name} merges a list of two or more inputs")
        elif isinstance(inputs, (list, tuple)):
            raise GraphError(f"{type(self).__name__} {self.name} takes one input, got a list of {len(inputs)}")

    def _call_symbolic(self, inputs, training):
        self._check_arity(inputs)
        shapes = [t.shape[1:] for t in inputs] if self.multi_input else inputs.shape[1:]
        output_shape = self.configure(shapes)
        node = Node(self, list(inputs) if self.multi_input else [inputs], (None,) + output_shape, training)
        self.inbound_nodes.append(node)
        return node.output

    def _call_arrays(self, inputs, training):
        self._check_arity(inputs)
        arrays = list(inputs) if self.multi_input else [inputs]
        if not all(is_array(a) for a in arrays):
            raise TypeError(f"layer {self.name} takes NumPy/CuPy arrays or tinycnn symbolic tensors, "
                            f"got {', '.join(type(a).__name__ for a in arrays)}")
        shapes = [tuple(a.shape[1:]) for a in arrays]
        if not self.built:
            dtype = arrays[0].dtype if arrays[0].dtype in (np.float32, np.float64) else np.float32
            self.build(shapes if self.multi_input else shapes[0], dtype=dtype)
        expected = self.input_shape if self.multi_input else [self.input_shape]
        if [tuple(s) for s in expected] != shapes:
            raise ShapeError(f"layer {self.name} expects inputs of shape {self.input_shape} (without the batch "
                             f"axis), got {shapes if self.multi_input else shapes[0]}")
        arrays = [self.backend.asarray(a, dtype=self.dtype) for a in arrays]
        return self.forward(arrays if self.multi_input else arrays[0], training)[0]

    def __getattr__(self, name):
        """Keras's weight attributes: `layer.kernel`, `layer.bias`, `layer.gamma`, ... are the weights
        (device arrays, the views the optimizer updates)."""
        weights = self.__dict__.get("weights")
        if weights is not None and name in weights:
            return weights[name]
        prop = getattr(type(self), name, None)
        if isinstance(prop, property):  # a property that raised AttributeError: let its own message through
            return prop.fget(self)
        raise AttributeError(f"{type(self).__name__} object has no attribute {name!r}")

    # -- Keras's graph accessors ------------------------------------------------------------
    def _only_node(self, what):
        if len(self.inbound_nodes) != 1:
            raise AttributeError(f"layer {self.name} has {len(self.inbound_nodes)} inbound nodes, so its {what} is "
                                 "ill-defined (it was called on a symbolic tensor " +
                                 ("never)" if not self.inbound_nodes else "more than once)"))
        return self.inbound_nodes[0]

    @property
    def output(self):
        """The symbolic output of this layer's one call in a graph."""
        return self._only_node("output").output

    @property
    def input(self):
        """The symbolic input(s) of this layer's one call in a graph."""
        inputs = self._only_node("input").inputs
        return inputs if self.multi_input else inputs[0]

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


def _as_key(shape):
    if shape and isinstance(shape[0], (list, tuple)):
        return [tuple(s) for s in shape]
    return tuple(shape)


class InputLayer(Layer):
    """The entry of a graph: `tinycnn.Input(shape)` makes one and returns its output tensor.
    In a Sequential list it declares the input shape (Keras's `InputLayer(input_shape=...)`)."""

    thread_safe = True  # see Layer.thread_safe
    base_name = "input"

    def __init__(self, input_shape=None, name=None, shape=None):
        shape = shape if shape is not None else input_shape
        if shape is None:
            raise ShapeError("InputLayer needs shape=(...) (the shape of one sample, without the batch axis)")
        super().__init__(name=name, input_shape=shape)
        self.configure(self.input_shape)
        self.inbound_nodes.append(Node(self, [], (None,) + self.input_shape))

    def forward(self, x, training):
        return x, None

    def backward(self, saved, dy, need_input_grad=True):
        return dy, {}

    def get_config(self):
        return {"name": self.name, "shape": self.input_shape}


def Input(shape=None, name=None, batch_size=None, dtype=None):
    """A symbolic input of per-sample shape `shape` (Keras's `keras.Input`): call layers on it, then
    make a model with `tinycnn.Model(inputs, outputs)`. `batch_size` and `dtype` are accepted for
    Keras compatibility: batches may have any size and the model's dtype applies."""
    if shape is None:
        raise ShapeError("Input needs shape=(...): the shape of one sample, without the batch axis")
    return InputLayer(shape=shape, name=name).output


class ActivatedLayer(Layer):
    """A layer that computes a linear (affine) part and then applies `self.activation`.

    Subclasses implement `forward_linear(x, training) -> (z, saved)` and
    `backward_linear(saved, dz, need_input_grad) -> (dx, grads)`. Splitting them lets an execution
    plan run a layer without its activation (a softmax that the loss applies, fused with
    cross-entropy) without the layer knowing about it."""

    thread_safe = True  # see Layer.thread_safe
    # Conv2D and Dense activate a product they just computed, so ReLU may overwrite it in place;
    # the Activation layer's input belongs to the layer before and must not change.
    owns_linear_output = True

    def set_activation(self, activation):
        self.activation = activations.get(activation)  # validates the name now, not at build time

    def forward_linear(self, x, training):
        raise NotImplementedError

    def backward_linear(self, saved, dz, need_input_grad=True):
        raise NotImplementedError

    def forward_linear_relu(self, x, training):
        """forward_linear then ReLU, in place: (y, saved). A layer whose kernels can fuse the two
        overrides it."""
        z, saved = self.forward_linear(x, training)
        return self.xp.maximum(z, 0, out=z), saved

    def forward(self, x, training):
        act = self.activation
        if act is activations.relu and self.owns_linear_output:
            y, saved = self.forward_linear_relu(x, training)
            return y, (saved, None, y)
        z, saved = self.forward_linear(x, training)
        y = act.forward(z, self.kernels)
        return y, (saved, z if act.uses_x else None, y if act.uses_y else None)

    def backward(self, saved, dy, need_input_grad=True):
        linear_saved, z, y = saved
        dz = self.activation.backward(dy, z, y, self.kernels)
        return self.backward_linear(linear_saved, dz, need_input_grad)
