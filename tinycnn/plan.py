"""How a model's graph runs: the execution plan, the fusions it chooses, and the tape of a step.

A plan turns the model's nodes (in topological order) into steps and numbers every tensor, so
running the graph is a loop over a list. Planning is the one place where fusion is decided,
from the graph alone; the layers know nothing about it:

- A BatchNormalization whose output only a Dropout reads becomes one step that runs the fused
  kernel (the normalization and the mask in one pass over the activations, forward and backward;
  the same masks as the Dropout alone). Only in training; in inference the two run as they are.
- Where the kernel set reads a ReLU inside its BatchNorm kernels (`fuses_relu_batchnorm`: the
  GPU's and the CPU's), a layer ending in ReLU whose only reader is a BatchNormalization joins it
  (and the Dropout after it) in one step: the layer's linear part, then one kernel. Training only.
- When the loss applies the output layer's activation itself (a softmax fused with cross-entropy,
  a sigmoid with binary cross-entropy: gradient p - t, no division by a probability that may
  underflow), that activation is left out of the step: it emits logits. Only plans made with
  `strip_activation` (training and evaluation); `predict` runs the layer whole.

`forward` keeps each step's `saved` on a tape only when a backward pass will follow; `backward`
walks the tape in reverse, sums gradients where a tensor fans out or a layer is used twice, and
writes weight gradients into the model's ParameterBuffer.
"""
import math

from . import activations
from .layers.base import ActivatedLayer
from .layers.normalization import BatchNormalization
from .layers.regularization import Dropout


def relu_batchnorm_nodes(node, only_reader):
    """[node, its BatchNormalization, the Dropout after that (if any)] when `node` is a layer ending
    in ReLU (its linear part and the ReLU split: an ActivatedLayer that owns its output) whose only
    reader is a BatchNormalization; else None. No mode fixed by a call, and no weight name shared
    (a fused step reports its layers' gradients in one dict)."""
    layer = node.layer
    if not (isinstance(layer, ActivatedLayer) and layer.activation is activations.relu and layer.owns_linear_output
            and not layer.multi_input):
        return None
    bn = only_reader(node)
    if bn is None or not isinstance(bn.layer, BatchNormalization) or set(layer.weights) & set(bn.layer.weights):
        return None
    nodes = [node, bn]
    drop = only_reader(bn)
    if drop is not None and isinstance(drop.layer, Dropout):
        nodes.append(drop)
    return nodes if all(n.training is None for n in nodes) else None


class Step:
    """One unit of execution: reads tensors `inputs` (ids), writes tensor `output`."""

    def __init__(self, inputs, output, layers):
        self.inputs = tuple(inputs)
        self.output = output
        self.layers = tuple(layers)  # whose weight gradients this step produces
        # (layer, weight names) the optimizer updates, fixed when the plan is made (a plan is remade
        # when a layer is frozen or unfrozen)
        self.trained = [(layer, tuple(layer.trainable_names)) for layer in self.layers if layer.trainable_names]
        self.trains = bool(self.trained)
        self.need_dx = (False,) * len(self.inputs)  # set by the plan
        self.runs_backward = False  # set by the plan
        self.fixed_training = None  # the mode a call fixed (`layer(x, training=True)`), if any

    def mode(self, training):
        """The mode this step runs in. As in Keras 3, a run's explicit mode (fit, evaluate and
        predict always give one) overrides every call's; a call's fixed mode counts only when the
        model is called on arrays without one (`model(x)`), and inference is the default."""
        return bool(self.fixed_training) if training is None else training

    def describe(self):
        return " + ".join(layer.name for layer in self.layers)


class LayerStep(Step):
    """A layer as it is."""

    def __init__(self, node, inputs, output):
        super().__init__(inputs, output, [node.layer])
        self.layer = node.layer
        self.multi = node.layer.multi_input
        self.fixed_training = node.training

    def forward(self, values, training):
        training = self.mode(training)
        if self.multi:
            return self.layer.forward([values[i] for i in self.inputs], training)
        return self.layer.forward(values[self.inputs[0]], training)

    def backward(self, saved, dy):
        if self.multi:
            dxs, grads = self.layer.backward(saved, dy, any(self.need_dx))
            return dxs, grads
        dx, grads = self.layer.backward(saved, dy, self.need_dx[0])
        return (dx,), grads


class LogitsStep(LayerStep):
    """An ActivatedLayer whose activation the loss applies: its linear part only."""

    def forward(self, values, training):
        return self.layer.forward_linear(values[self.inputs[0]], self.mode(training))

    def backward(self, saved, dy):
        dx, grads = self.layer.backward_linear(saved, dy, self.need_dx[0])
        return (dx,), grads

    def describe(self):
        return f"{self.layer.name} (logits: {self.layer.activation.name} fused into the loss)"


class FusedStep(Step):
    """Layers that run as one kernel in training; where they cannot (inference, a frozen
    BatchNormalization, an empty share), each runs as it is, one after another: `apart`."""

    def forward_apart(self, x, training):
        saved = []
        for layer in self.layers:
            x, layer_saved = layer.forward(x, training)
            saved.append(layer_saved)
        return x, ("apart", saved, None)

    def backward_apart(self, saved, dy):
        grads = {}
        for layer, layer_saved in zip(reversed(self.layers), reversed(saved)):
            dy, layer_grads = layer.backward(layer_saved, dy, layer is not self.layers[0] or self.need_dx[0])
            grads.update(layer_grads)
        return (dy,), grads


class BatchNormDropoutStep(FusedStep):
    """A BatchNormalization and the Dropout reading it, as one kernel in training."""

    def __init__(self, bn_node, dropout_node, inputs, output):
        super().__init__(inputs, output, [bn_node.layer, dropout_node.layer])
        self.bn, self.dropout = bn_node.layer, dropout_node.layer

    def forward(self, values, training):
        training = self.mode(training)
        x = values[self.inputs[0]]
        bn, drop = self.bn, self.dropout
        if not (training and drop.rate > 0.0 and bn.uses_batch_statistics(training)) or x.shape[0] == 0:
            return self.forward_apart(x, training)
        gamma, beta = bn.affine()
        y2d, saved, _, _, inv_std = bn.kernels.batchnorm_dropout_forward_train(
            x.reshape(-1, x.shape[-1]), gamma, beta, bn.epsilon, drop.rate, drop.next_seed(), drop.mask_offset(x),
            bn.batch_reduce(), bn.moving_update())
        return y2d.reshape(x.shape), ("fused", saved, inv_std)

    def backward(self, saved, dy):
        mode, a, b = saved
        if mode == "apart":
            return self.backward_apart(a, dy)
        dx2d, dgamma, dbeta = self.bn.kernels.batchnorm_dropout_backward_train(
            dy.reshape(-1, dy.shape[-1]), a, self.bn.affine()[0], b, self.bn.batch_reduce(), self.bn.gradient_targets())
        return ((dx2d.reshape(dy.shape) if self.need_dx[0] else None),), self.bn.affine_grads(dgamma, dbeta)

    def describe(self):
        return f"{self.bn.name} + {self.dropout.name} (fused in training)"


class ReluBatchNormStep(FusedStep):
    """A layer whose activation is ReLU, the BatchNormalization reading it and (if one reads that)
    the Dropout, in training through the kernels' relu_batchnorm entries: the layer's linear part,
    then one BatchNorm kernel that reads the ReLU as it reads its input (forward) and applies its
    gradient as it writes its own (backward). Planned where the kernel set fuses them (the GPU's:
    two passes over the activations and two launches fewer per layer; the CPU's: the ReLU
    backward's pass)."""

    def __init__(self, nodes, inputs, output):
        super().__init__(inputs, output, [node.layer for node in nodes])
        self.linear, self.bn = nodes[0].layer, nodes[1].layer
        self.dropout = nodes[2].layer if len(nodes) > 2 else None

    def forward(self, values, training):
        training = self.mode(training)
        x = values[self.inputs[0]]
        linear, bn, drop = self.linear, self.bn, self.dropout
        if not (training and bn.uses_batch_statistics(training)) or x.shape[0] == 0:
            return self.forward_apart(x, training)
        z, linear_saved = linear.forward_linear(x, training)
        rate = drop.rate if drop is not None else 0.0
        seed, offset = (drop.next_seed(), drop.mask_offset(z)) if rate > 0.0 else (0, 0)
        gamma, beta = bn.affine()
        y2d, saved, _, _, inv_std = bn.kernels.relu_batchnorm_forward_train(
            z.reshape(-1, z.shape[-1]), gamma, beta, bn.epsilon, rate, seed, offset, bn.batch_reduce(),
            bn.moving_update())
        return y2d.reshape(z.shape), ("fused", (linear_saved, saved), inv_std)

    def backward(self, saved, dy):
        mode, a, b = saved
        if mode == "apart":
            return self.backward_apart(a, dy)
        linear_saved, bn_saved = a
        dz2d, dgamma, dbeta = self.bn.kernels.relu_batchnorm_backward_train(
            dy.reshape(-1, dy.shape[-1]), bn_saved, self.bn.affine()[0], b, self.bn.batch_reduce(),
            self.bn.gradient_targets())
        dx, grads = self.linear.backward_linear(linear_saved, dz2d.reshape(dy.shape), self.need_dx[0])
        return (dx,), {**grads, **self.bn.affine_grads(dgamma, dbeta)}

    def describe(self):
        return " + ".join(layer.name for layer in self.layers) + " (ReLU and BatchNorm fused in training)"


def multiply_adds_per_sample(node):
    """About how many multiply-adds a node's forward pass does per sample: each of its layer's
    weights of two axes or more (a kernel) times the output's positions (an image's pixels; 1 for
    a vector). 0 for a layer without such weights, or whose weights are not a plain dict."""
    weights = getattr(node.layer, "weights", None)
    if not isinstance(weights, dict):
        return 0
    positions = math.prod(node.output.shape[1:-1])
    return positions * sum(int(w.size) for w in weights.values() if w.ndim >= 2)


class Plan:
    """The steps of a graph, ready to run."""

    def __init__(self, nodes, inputs, outputs, fuse_batchnorm_dropout=True, strip_activation=None,
                 fuse_relu_batchnorm=False):
        ids = {}

        def tensor_id(tensor):
            return ids.setdefault(id(tensor), len(ids))

        self.input_ids = [tensor_id(t) for t in inputs]
        consumers = {}
        for node in nodes:
            for t in node.inputs:
                consumers.setdefault(id(t), []).append(node)
        output_keys = {id(t) for t in outputs}

        def only_reader(node):
            """The one node reading `node`'s output, if it is not also a model output."""
            readers = consumers.get(id(node.output), [])
            return readers[0] if len(readers) == 1 and id(node.output) not in output_keys else None

        self.emits_logits = False
        steps, absorbed = [], set()
        for node in nodes:
            layer = node.layer
            if id(node) in absorbed or not node.inputs:  # fused into the step before, or a model input
                continue
            in_ids = [tensor_id(t) for t in node.inputs]
            after = only_reader(node)
            fused = relu_batchnorm_nodes(node, only_reader) if fuse_relu_batchnorm and fuse_batchnorm_dropout else None
            if fused:
                steps.append(ReluBatchNormStep(fused, in_ids, tensor_id(fused[-1].output)))
                absorbed.update(id(n) for n in fused[1:])
            elif (fuse_batchnorm_dropout and isinstance(layer, BatchNormalization) and after is not None
                    and isinstance(after.layer, Dropout) and node.training is None and after.training is None):
                steps.append(BatchNormDropoutStep(node, after, in_ids, tensor_id(after.output)))
                absorbed.add(id(after))
            elif (strip_activation and len(outputs) == 1 and node.output is outputs[0]
                  and not consumers.get(id(node.output)) and isinstance(layer, ActivatedLayer)
                  and layer.activation is activations.get(strip_activation) and node.training is None):
                steps.append(LogitsStep(node, in_ids, tensor_id(node.output)))
                self.emits_logits = True
            else:
                steps.append(LayerStep(node, in_ids, tensor_id(node.output)))
        self.steps = steps
        # Whether a batch may run as shares in threads (tinycnn.batch_split), and how much work a
        # sample brings to its share
        self.thread_safe = all(layer.thread_safe for step in steps for layer in step.layers)
        self.sample_multiply_adds = sum(multiply_adds_per_sample(node) for node in nodes if node.inputs)
        self.output_ids = [tensor_id(t) for t in outputs]
        self.size = len(ids)

        # Which tensors need a gradient: those that depend on a trainable weight. A step's
        # backward runs only if its output needs one; its input gradients only where they do.
        requires = [False] * self.size
        for step in steps:
            step.need_dx = tuple(requires[i] for i in step.inputs)
            step.runs_backward = step.trains or any(step.need_dx)
            requires[step.output] = step.runs_backward

        # Free each tensor after its last reader (inference then holds only what is live).
        last_read = {}
        for k, step in enumerate(steps):
            for i in step.inputs:
                last_read[i] = k
        self.free_after = [[] for _ in steps]
        for i, k in last_read.items():
            if i not in self.output_ids:
                self.free_after[k].append(i)

    def forward(self, inputs, training, keep_for_backward):
        """Run every step. Returns (outputs, tape); the tape is None unless keep_for_backward."""
        values = [None] * self.size
        for i, x in zip(self.input_ids, inputs):
            values[i] = x
        tape = [] if keep_for_backward else None
        for step, free in zip(self.steps, self.free_after):
            if tape is None:  # nothing of `saved` outlives the step
                values[step.output] = step.forward(values, training)[0]
            else:
                values[step.output], saved = step.forward(values, training)
                tape.append(saved if step.runs_backward else None)
            for i in free:
                values[i] = None
        return [values[i] for i in self.output_ids], tape

    def backward(self, tape, output_grads, params):
        """Backpropagate `output_grads` (one per output, None for none) through the tape, writing
        every trainable weight's gradient into `params` (a ParameterBuffer)."""
        grads = [None] * self.size
        for i, g in zip(self.output_ids, output_grads):
            grads[i] = g
        with params.collecting():
            for step, saved in zip(reversed(self.steps), reversed(tape)):
                if not step.runs_backward:
                    continue
                dy = grads[step.output]
                grads[step.output] = None
                if dy is None:
                    continue
                dxs, weight_grads = step.backward(saved, dy)
                for i, need, dx in zip(step.inputs, step.need_dx, dxs):
                    if need and dx is not None:
                        grads[i] = dx if grads[i] is None else grads[i] + dx
                for layer, names in step.trained:
                    for name in names:
                        params.add_gradient(layer, name, weight_grads[name])

    def describe(self):
        """One line per step (what runs, in order)."""
        return [step.describe() for step in self.steps]
