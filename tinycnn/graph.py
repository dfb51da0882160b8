"""Networks as graphs: symbolic tensors, the nodes that make them, and their topological order.

Calling a layer on a `SymbolicTensor` (what `tinycnn.Input` returns) computes no numbers: it
checks shapes and records a `Node` (this layer, applied to these tensors), whose output is a new
symbolic tensor. A model is the set of nodes between its input and output tensors, in the order
`topological_nodes` gives.
"""
from .errors import GraphError


class SymbolicTensor:
    """A placeholder for a batch of arrays: its shape (None for the batch axis) and the node making it."""

    __slots__ = ("shape", "node")

    def __init__(self, shape, node):
        self.shape = tuple(shape)
        self.node = node

    @property
    def ndim(self):
        return len(self.shape)

    def __repr__(self):
        return f"<SymbolicTensor shape={self.shape} from {self.node.layer.name}>"


class Node:
    """One call of `layer` on symbolic `inputs` (a list; empty for an input layer). `training`: None,
    or the True/False given at the call. As in Keras 3 it decides the layer's mode only when the
    model runs without a mode of its own (`model(x)`); fit, evaluate and predict set every
    layer's mode (see plan.Step.mode)."""

    __slots__ = ("layer", "inputs", "output", "training")

    def __init__(self, layer, inputs, output_shape, training=None):
        self.layer = layer
        self.inputs = list(inputs)
        self.output = SymbolicTensor(output_shape, self)
        self.training = None if training is None else bool(training)

    def __repr__(self):
        return f"<Node {self.layer.name}({', '.join(t.node.layer.name for t in self.inputs)})>"


def topological_nodes(inputs, outputs):
    """Every node that the output tensors depend on, in Keras's order: by decreasing depth (the
    longest path to an output), nodes of equal depth in the order a depth-first walk from the
    outputs first meets them. Each node comes after every node it reads from, and a model's
    layers come out in the order Keras gives them (which weight files rely on). Raises GraphError
    if an output depends on an input tensor that is not among `inputs`, or on a cycle."""
    for t in list(inputs) + list(outputs):
        if not isinstance(t, SymbolicTensor):
            raise GraphError(f"a model's inputs and outputs are symbolic tensors (from tinycnn.Input and layer calls), "
                             f"got {type(t).__name__}")
    input_nodes = {id(t.node) for t in inputs}
    for t in inputs:
        if t.node.inputs:
            raise GraphError(f"model inputs must come from tinycnn.Input; {t!r} is the output of layer {t.node.layer.name}")
    post_order, first_met, done, active = [], {}, set(), set()

    def visit(node):
        if id(node) in done:
            return
        if id(node) in active:
            raise GraphError(f"the graph has a cycle through layer {node.layer.name}")
        if not node.inputs and id(node) not in input_nodes:
            raise GraphError(f"the outputs depend on input {node.layer.name}, which is not among the model's inputs")
        first_met.setdefault(id(node), len(first_met))
        active.add(id(node))
        for t in node.inputs:
            visit(t.node)
        active.discard(id(node))
        done.add(id(node))
        post_order.append(node)

    for t in outputs:  # recursion depth would only matter for graphs thousands of layers deep
        visit(t.node)
    unused = [t for t in inputs if id(t.node) not in done]
    if unused:
        raise GraphError(f"the outputs do not depend on input {unused[0].node.layer.name}")
    depth = {}
    for node in reversed(post_order):  # consumers before the nodes they read from
        d = depth.setdefault(id(node), 0)
        for t in node.inputs:
            depth[id(t.node)] = max(depth.get(id(t.node), 0), d + 1)
    return sorted(post_order, key=lambda node: (-depth[id(node)], first_met[id(node)]))


def layer_order(nodes):
    """The layers of `nodes` (in the order topological_nodes gives), each once, as Keras orders a
    model's layers: by the greatest depth of any of their calls, then by the first call met."""
    rank = {}
    for k, node in enumerate(nodes):
        rank.setdefault(id(node.layer), (k, node.layer))
    return [layer for _, layer in sorted(rank.values(), key=lambda item: item[0])]
