"""Export a model's inference graph to ONNX, for ONNX Runtime and the other runtimes that read it.

    model.export_onnx("week2.onnx")                       # any Sequential or functional model
    python -m tinycnn.onnx MODEL.keras OUT.onnx [--channels-first] [--no-fold] [--opset 17]

The graph is built with the `onnx` package (nodes, initializers, `onnx.checker` and strict shape
inference; no protobuf written by hand) and computes what `model.predict` computes, in float32.
tinycnn's tensors are NHWC and ONNX's convolutions NCHW, so the graph transposes the input once
and works in NCHW (a `Flatten` transposes back first, so its order stays tinycnn's); with
`channels_first=True` the graph takes and returns NCHW images instead. The batch size is a
dynamic dimension. A BatchNormalization that follows a convolution with no activation, and is
its only reader, is folded into the convolution's weights (`fold_batchnorm=False` keeps it as an
ONNX BatchNormalization). Dropout is the identity in inference and disappears.

A layer or option with no export here is refused with an error naming it. `onnx` (and
`onnxruntime`, to run the file) are an optional extra: `pip install "tinycnn[onnx]"`.
"""
import math

import numpy as np

from .. import activations
from .. import layers as L
from ..arrays import to_numpy
from ..files import atomic_write

__all__ = ["export", "to_onnx", "DEFAULT_OPSET"]

#: The ONNX opset `export` writes unless told otherwise.
DEFAULT_OPSET = 17  # ONNX Runtime 1.14 and later, ONNX Runtime Web, and the mobile runtimes read it
MIN_OPSET = 13  # Squeeze/Unsqueeze take their axes as an input, and Softmax works on one axis, from 13
ONNX_INSTALL_HINT = 'pip install "tinycnn[onnx]"  (onnx; onnxruntime to run the file)'


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(f"exporting to ONNX needs the onnx package: {ONNX_INSTALL_HINT}") from None
    return onnx


class _Builder:
    """Collects nodes and initializers; every tensor is named after the layer that makes it."""

    def __init__(self, onnx):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes, self.initializers, self.names = [], [], set()

    def unique(self, base):
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def constant(self, base, value):
        name = self.unique(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, base, **attributes):
        out = self.unique(base)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=self.unique(f"{base}/{op}"), **attributes))
        return out


def _f32(array):
    return np.ascontiguousarray(to_numpy(array), dtype=np.float32)


def _activation(b, x, activation, base, axis):
    """The nodes of an activation on tensor x (`axis`: the channel axis, for softmax)."""
    name = activation.name
    if activation is activations.linear:
        return x
    if name == "relu":
        return b.node("Relu", [x], base)
    if name == "sigmoid":
        return b.node("Sigmoid", [x], base)
    if name == "tanh":
        return b.node("Tanh", [x], base)
    if name == "softmax":
        return b.node("Softmax", [x], base, axis=axis)
    if name == "elu":
        return b.node("Elu", [x], base, alpha=float(activation.params["alpha"]))
    if name == "selu":
        return b.node("Selu", [x], base, alpha=activations.SELU_ALPHA, gamma=activations.SELU_SCALE)
    if name == "leaky_relu":
        return b.node("LeakyRelu", [x], base, alpha=float(activation.params["negative_slope"]))
    if name == "gelu":  # opset 17 has no Gelu: x * (1 + erf(x / sqrt 2)) / 2
        scaled = b.node("Mul", [x, b.constant(f"{base}/inv_sqrt2", np.float32(1 / math.sqrt(2)))], f"{base}/scaled")
        erf = b.node("Erf", [scaled], f"{base}/erf")
        one_plus = b.node("Add", [erf, b.constant(f"{base}/one", np.float32(1.0))], f"{base}/one_plus")
        half = b.node("Mul", [x, b.constant(f"{base}/half", np.float32(0.5))], f"{base}/half_x")
        return b.node("Mul", [half, one_plus], base)
    if name == "silu":
        return b.node("Mul", [x, b.node("Sigmoid", [x], f"{base}/sigmoid")], base)
    raise ValueError(f"activation {name!r} has no ONNX export here")


def _pads(pads):
    """tinycnn's (top, bottom, left, right) as ONNX's (top, left, bottom, right)."""
    top, bottom, left, right = pads
    return [top, left, bottom, right]


def _conv(b, x, kernel_oihw, bias, layer, base, group=1, strides=None, pads=None):
    inputs = [x, b.constant(f"{base}/W", kernel_oihw)]
    if bias is not None:
        inputs.append(b.constant(f"{base}/B", bias))
    kh, kw = kernel_oihw.shape[2:]
    return b.node("Conv", inputs, base, kernel_shape=[kh, kw], strides=list(strides or layer.strides),
                  pads=_pads(pads if pads is not None else layer.pads), group=group)


def _conv2d_weights(layer, fold):
    """OIHW weights and bias of a Conv2D, with a following BatchNormalization folded in."""
    kernel = _f32(layer.weights["kernel"]).transpose(3, 2, 0, 1)
    bias = _f32(layer.weights["bias"]) if layer.use_bias else None
    if fold is None:
        return kernel, bias
    gamma, beta = (_f32(w) for w in fold.affine())
    mean, var = _f32(fold.weights["moving_mean"]), _f32(fold.weights["moving_variance"])
    scale = gamma / np.sqrt(var + np.float32(fold.epsilon))
    bias = np.zeros(kernel.shape[0], np.float32) if bias is None else bias
    return (kernel * scale[:, None, None, None]).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)


def _depthwise_weights(kernel):
    """(kh, kw, C, M) -> (C*M, 1, kh, kw): output channel c*M + m reads input channel c (group=C)."""
    kh, kw, c, m = kernel.shape
    return np.ascontiguousarray(kernel.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None], dtype=np.float32)


def to_onnx(model, channels_first=False, fold_batchnorm=True, opset=DEFAULT_OPSET):
    """The model's inference graph as an `onnx.ModelProto` (checked, with shapes inferred)."""
    onnx = _onnx()
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} (axes of Squeeze and Unsqueeze as inputs) to "
                         f"{newest} (the newest this onnx package knows), got {opset!r}")
    model.build()
    b = _Builder(onnx)
    helper, TP = onnx.helper, onnx.TensorProto
    graph_inputs, values, layouts = [], {}, {}

    for tensor in model.inputs:
        name = b.unique(tensor.node.layer.name)
        shape = list(tensor.shape[1:])
        if len(shape) == 3:
            onnx_shape = ["batch"] + ([shape[2], shape[0], shape[1]] if channels_first else shape)
            graph_inputs.append(helper.make_tensor_value_info(name, TP.FLOAT, onnx_shape))
            values[id(tensor)] = name if channels_first else b.node("Transpose", [name], f"{name}/nchw",
                                                                     perm=[0, 3, 1, 2])
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, TP.FLOAT, ["batch"] + shape))
            values[id(tensor)] = name
        layouts[id(tensor)] = len(shape)

    readers = {}
    for node in model.nodes:
        for t in node.inputs:
            readers.setdefault(id(t), []).append(node)
    output_ids = {id(t) for t in model.outputs}
    folded = {}  # id(BatchNormalization node) -> the Conv2D it was folded into
    if fold_batchnorm:
        for node in model.nodes:
            after = readers.get(id(node.output), [])
            if (isinstance(node.layer, L.Conv2D) and node.layer.activation is activations.linear and len(after) == 1
                    and isinstance(after[0].layer, L.BatchNormalization) and id(node.output) not in output_ids):
                folded[id(after[0])] = node

    for node in model.nodes:
        layer = node.layer
        if isinstance(layer, L.InputLayer):
            continue
        rank = layouts[id(node.inputs[0])]  # 3: an image (NCHW in the graph), 1: a vector
        if rank not in (1, 3):
            raise ValueError(f"layer {layer.name} ({type(layer).__name__}) reads a tensor of shape "
                             f"{node.inputs[0].shape}: ONNX export handles vectors (batch, features) and images "
                             "(batch, height, width, channels)")
        xs = [values[id(t)] for t in node.inputs]
        base = layer.name
        out = _export_layer(b, layer, node, xs, rank, base, folded, readers)
        values[id(node.output)] = out
        layouts[id(node.output)] = len(node.output.shape) - 1

    graph_outputs = []
    for tensor in model.outputs:
        out = values[id(tensor)]
        shape = list(tensor.shape[1:])
        if len(shape) == 3 and not channels_first:
            out = b.node("Transpose", [out], f"{tensor.node.layer.name}/nhwc", perm=[0, 2, 3, 1])
        elif len(shape) == 3:
            shape = [shape[2], shape[0], shape[1]]
        final = b.unique(f"{tensor.node.layer.name}_output")
        b.nodes.append(helper.make_node("Identity", [out], [final], name=b.unique(f"{final}/Identity")))
        graph_outputs.append(helper.make_tensor_value_info(final, TP.FLOAT, ["batch"] + shape))

    graph = helper.make_graph(b.nodes, model.name, graph_inputs, graph_outputs, b.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tinycnn",
                              ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _export_layer(b, layer, node, xs, rank, base, folded, readers):
    x = xs[0]
    channel_axis = 1 if rank == 3 else -1
    if id(node) in folded:  # a BatchNormalization folded into the convolution before it
        return x
    if isinstance(layer, L.Conv2D):
        after = readers.get(id(node.output), [])
        fold = after[0].layer if after and id(after[0]) in folded else None
        kernel, bias = _conv2d_weights(layer, fold)
        return _activation(b, _conv(b, x, kernel, bias, layer, base), layer.activation, f"{base}/act", 1)
    if isinstance(layer, L.DepthwiseConv2D):
        kernel = _depthwise_weights(_f32(layer.weights["depthwise_kernel"]))
        bias = _f32(layer.weights["bias"]) if layer.use_bias else None
        out = _conv(b, x, kernel, bias, layer, base, group=layer.input_shape[2])
        return _activation(b, out, layer.activation, f"{base}/act", 1)
    if isinstance(layer, L.SeparableConv2D):
        depthwise = _depthwise_weights(_f32(layer.weights["depthwise_kernel"]))
        mid = _conv(b, x, depthwise, None, layer, f"{base}/depthwise", group=layer.input_shape[2])
        pointwise = _f32(layer.weights["pointwise_kernel"]).transpose(3, 2, 0, 1)
        bias = _f32(layer.weights["bias"]) if layer.use_bias else None
        out = _conv(b, mid, pointwise, bias, layer, f"{base}/pointwise", strides=(1, 1), pads=(0, 0, 0, 0))
        return _activation(b, out, layer.activation, f"{base}/act", 1)
    if isinstance(layer, L.Dense):
        inputs = [x, b.constant(f"{base}/W", _f32(layer.weights["kernel"]))]
        if layer.use_bias:
            inputs.append(b.constant(f"{base}/B", _f32(layer.weights["bias"])))
        return _activation(b, b.node("Gemm", inputs, base), layer.activation, f"{base}/act", -1)
    if isinstance(layer, L.Activation):  # ReLU, LeakyReLU, ELU, Softmax included
        return _activation(b, x, layer.activation, base, channel_axis)
    if isinstance(layer, L.BatchNormalization):
        gamma, beta = (_f32(w) for w in layer.affine())
        args = [x, b.constant(f"{base}/scale", gamma), b.constant(f"{base}/bias", beta),
                b.constant(f"{base}/mean", _f32(layer.weights["moving_mean"])),
                b.constant(f"{base}/var", _f32(layer.weights["moving_variance"]))]
        if rank == 3:
            return b.node("BatchNormalization", args, base, epsilon=layer.epsilon)
        # a vector: (N, C) -> (N, C, 1) for ONNX's BatchNormalization, and back
        expanded = b.node("Unsqueeze", [x, b.constant(f"{base}/axes", np.array([2], np.int64))], f"{base}/nc1")
        normalized = b.node("BatchNormalization", [expanded] + args[1:], f"{base}/bn", epsilon=layer.epsilon)
        return b.node("Squeeze", [normalized, b.constant(f"{base}/squeeze_axes", np.array([2], np.int64))], base)
    if isinstance(layer, L.Dropout):
        return x
    if isinstance(layer, (L.MaxPooling2D, L.AveragePooling2D)):
        op, extra = ("MaxPool", {}) if isinstance(layer, L.MaxPooling2D) else ("AveragePool", {"count_include_pad": 0})
        return b.node(op, [x], base, kernel_shape=list(layer.pool_size), strides=list(layer.strides),
                      pads=_pads(layer.pads), **extra)
    if isinstance(layer, (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
        op = "GlobalAveragePool" if isinstance(layer, L.GlobalAveragePooling2D) else "GlobalMaxPool"
        return b.node("Flatten", [b.node(op, [x], f"{base}/pool")], base, axis=1)
    if isinstance(layer, L.Flatten):
        if rank == 3:  # tinycnn flattens in (h, w, c) order
            x = b.node("Transpose", [x], f"{base}/nhwc", perm=[0, 2, 3, 1])
        return b.node("Flatten", [x], base, axis=1)
    if isinstance(layer, L.Add):
        out = xs[0]
        for k, other in enumerate(xs[1:]):
            out = b.node("Add", [out, other], base if k == len(xs) - 2 else f"{base}/{k}")
        return out
    if isinstance(layer, L.Concatenate):
        axis = layer.axis if layer.axis >= 0 else layer.axis + rank + 1
        if rank == 3:
            axis = {1: 2, 2: 3, 3: 1}[axis]  # NHWC axis -> NCHW axis
        return b.node("Concat", xs, base, axis=axis)
    if isinstance(layer, L.ZeroPadding2D):
        (top, bottom), (left, right) = layer.padding
        pads = b.constant(f"{base}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
        return b.node("Pad", [x, pads], base, mode="constant")
    if isinstance(layer, L.Rescaling):
        out = b.node("Mul", [x, b.constant(f"{base}/scale", np.float32(layer.scale))],
                     base if not layer.offset else f"{base}/scaled")
        if layer.offset:
            out = b.node("Add", [out, b.constant(f"{base}/offset", np.float32(layer.offset))], base)
        return out
    raise ValueError(f"layer {layer.name} ({type(layer).__name__}) has no ONNX export")


def export(model, path, channels_first=False, fold_batchnorm=True, opset=DEFAULT_OPSET):
    """Write the model's inference graph to `path` (atomically); returns the ModelProto."""
    proto = to_onnx(model, channels_first=channels_first, fold_batchnorm=fold_batchnorm, opset=opset)
    with atomic_write(path, "wb") as f:
        f.write(proto.SerializeToString())
    return proto
