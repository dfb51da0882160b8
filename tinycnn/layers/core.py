"""Dense and the activation layers."""
from .. import activations, arguments, initializers, regularizers
from ..errors import ShapeError
from .base import ActivatedLayer, Layer


class Dense(ActivatedLayer):
    """Fully connected layer on (batch, features) inputs; kernel (in, units) as in Keras."""

    base_name = "dense"

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.units = arguments.integer(units, "Dense units", minimum=1)
        self.use_bias = bool(use_bias)
        self.set_activation(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ShapeError(f"Dense {self.name} needs flat (features,) inputs, got shape {input_shape}; add Flatten()")
        return (self.units,)

    def create_weights(self, input_shape, rng):
        self.add_weight("kernel", (input_shape[0], self.units), self.kernel_initializer, rng,
                        regularizer=self.kernel_regularizer)
        if self.use_bias:
            self.add_weight("bias", (self.units,), self.bias_initializer, rng, regularizer=self.bias_regularizer)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation.name, "use_bias": self.use_bias,
                "kernel_initializer": self.kernel_initializer, "bias_initializer": self.bias_initializer,
                "kernel_regularizer": self.kernel_regularizer, "bias_regularizer": self.bias_regularizer}

    def forward_linear(self, x, training):
        z = x @ self.weights["kernel"]
        if self.use_bias:
            z += self.weights["bias"]
        return z, x

    def backward_linear(self, saved, dz, need_input_grad=True):
        x = saved
        grads = {"kernel": self.xp.matmul(x.T, dz, out=self.gradient_array("kernel", self.weights["kernel"].shape))}
        if self.use_bias:
            grads["bias"] = self.bias_gradient(dz)
        return (dz @ self.weights["kernel"].T if need_input_grad else None), grads


class Activation(ActivatedLayer):
    """An activation by name (or an ActivationFunction): elementwise, or softmax over the last axis."""

    base_name = "activation"
    owns_linear_output = False

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.set_activation(activation)

    def get_config(self):
        return {**super().get_config(), "activation": self.activation.name}

    def forward_linear(self, x, training):
        return x, None

    def backward_linear(self, saved, dz, need_input_grad=True):
        return dz, {}


class ReLU(Activation):
    base_name = "re_lu"

    def __init__(self, **kwargs):
        super().__init__("relu", **kwargs)

    def get_config(self):
        return Layer.get_config(self)


class Softmax(Activation):
    """Softmax over the last axis."""

    base_name = "softmax"

    def __init__(self, axis=-1, **kwargs):
        if axis != -1:
            raise ValueError(f"Softmax supports axis=-1 only, got {axis!r}")
        super().__init__("softmax", **kwargs)

    def get_config(self):
        return {**Layer.get_config(self), "axis": -1}


class LeakyReLU(Activation):
    """x for x > 0, negative_slope * x otherwise (Keras's default slope 0.3; `alpha` is Keras 2's name)."""

    base_name = "leaky_re_lu"

    def __init__(self, negative_slope=None, alpha=None, **kwargs):
        if negative_slope is not None and alpha is not None:
            raise TypeError("LeakyReLU takes negative_slope or alpha (its Keras 2 name), not both")
        slope = 0.3 if negative_slope is None and alpha is None else \
            arguments.real(alpha if negative_slope is None else negative_slope, "LeakyReLU negative_slope", low=0)
        super().__init__(activations.make_leaky_relu(slope), **kwargs)
        self.negative_slope = slope

    def get_config(self):
        return {**Layer.get_config(self), "negative_slope": self.negative_slope}


class ELU(Activation):
    """x for x > 0, alpha * (exp(x) - 1) otherwise."""

    base_name = "elu"

    def __init__(self, alpha=1.0, **kwargs):
        alpha = arguments.real(alpha, "ELU alpha")
        super().__init__(activations.make_elu(alpha), **kwargs)
        self.alpha = alpha

    def get_config(self):
        return {**Layer.get_config(self), "alpha": self.alpha}
