"""Convolutions: Conv2D, DepthwiseConv2D and SeparableConv2D (MobileNet's block)."""
from .. import arguments, initializers, regularizers
from ..errors import ShapeError
from ..kernels.reference import output_hw
from .base import ActivatedLayer, channels_last, no_dilation, pair, padding_mode, window_pads


class _Conv(ActivatedLayer):
    """Shared configuration: kernel size, strides, padding, bias, output size."""

    def _configure_window(self, kernel_size, strides, padding, use_bias, activation, data_format=None,
                          dilation_rate=1, bias_initializer="zeros", bias_regularizer=None):
        kind = type(self).__name__
        self.kernel_size = pair(kernel_size, f"{kind} kernel_size")
        self.strides = pair(strides, f"{kind} strides")
        self.padding = padding_mode(padding, kind)
        channels_last(data_format, kind)
        no_dilation(dilation_rate, kind)
        self.use_bias = bool(use_bias)
        self.set_activation(activation)
        self.bias_initializer = initializers.get(bias_initializer)
        self.bias_regularizer = regularizers.get(bias_regularizer)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "strides": self.strides,
                "padding": self.padding, "activation": self.activation.name, "use_bias": self.use_bias,
                "bias_initializer": self.bias_initializer, "bias_regularizer": self.bias_regularizer}

    def _add_bias(self, size, rng):
        if self.use_bias:
            self.add_weight("bias", (size,), self.bias_initializer, rng, regularizer=self.bias_regularizer)

    def _output_hw(self, input_shape):
        kind = type(self).__name__
        if len(input_shape) != 3:
            raise ShapeError(f"{kind} {self.name} needs (height, width, channels) inputs, got shape {input_shape}")
        h, w, _ = input_shape
        self.pads = window_pads(self.padding, (h, w), self.kernel_size, self.strides)
        oh, ow = output_hw(h, w, *self.kernel_size, self.strides, self.pads)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{kind} {self.name}: kernel {self.kernel_size} does not fit input {input_shape}")
        return oh, ow


class Conv2D(_Conv):
    """2-D convolution. Kernel (kh, kw, c_in, c_out) as in Keras; the backend's kernel set chooses
    the algorithm (direct loops or im2col + GEMM on the CPU, im2col + cuBLAS on the GPU)."""

    base_name = "conv2d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, data_format=None, dilation_rate=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = arguments.integer(filters, "Conv2D filters", minimum=1)
        self._configure_window(kernel_size, strides, padding, use_bias, activation, data_format, dilation_rate,
                               bias_initializer, bias_regularizer)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)

    def compute_output_shape(self, input_shape):
        return self._output_hw(input_shape) + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_initializer": self.kernel_initializer,
                "kernel_regularizer": self.kernel_regularizer}

    def create_weights(self, input_shape, rng):
        kh, kw = self.kernel_size
        self.add_weight("kernel", (kh, kw, input_shape[2], self.filters), self.kernel_initializer, rng,
                        regularizer=self.kernel_regularizer)
        self._add_bias(self.filters, rng)

    def forward_linear(self, x, training):
        kh, kw = self.kernel_size
        kernel2d = self.weights["kernel"].reshape(-1, self.filters)
        z, saved = self.kernels.conv2d_forward(x, kernel2d, kh, kw, self.strides, self.pads)
        if self.use_bias:
            z += self.weights["bias"]
        return z.reshape((x.shape[0],) + self.output_shape), (saved, x.shape)

    def forward_linear_relu(self, x, training):
        if self.use_bias:  # the bias goes in before the ReLU: the kernels cannot fuse it here
            return super().forward_linear_relu(x, training)
        kh, kw = self.kernel_size
        kernel2d = self.weights["kernel"].reshape(-1, self.filters)
        y, saved = self.kernels.conv2d_relu_forward(x, kernel2d, kh, kw, self.strides, self.pads)
        return y.reshape((x.shape[0],) + self.output_shape), (saved, x.shape)

    def backward_linear(self, saved, dz, need_input_grad=True):
        conv_saved, x_shape = saved
        kh, kw = self.kernel_size
        kernel = self.weights["kernel"]
        dz2d = dz.reshape(-1, self.filters)
        grads = {}
        if self.use_bias:
            grads["bias"] = self.bias_gradient(dz2d)
        dkernel2d = self.gradient_array("kernel", (kernel.size // self.filters, self.filters))
        dx = self.kernels.conv2d_backward(dz2d, conv_saved, x_shape, kernel.reshape(-1, self.filters), kh, kw,
                                          self.strides, self.pads, dkernel2d, need_input_grad)
        grads["kernel"] = dkernel2d.reshape(kernel.shape)
        return dx, grads


class DepthwiseConv2D(_Conv):
    """Each input channel convolved with its own `depth_multiplier` filters: output channel
    c * depth_multiplier + m. Weights `depthwise_kernel` (kh, kw, c_in, depth_multiplier), `bias`."""

    base_name = "depthwise_conv2d"

    def __init__(self, kernel_size, strides=1, padding="valid", depth_multiplier=1, activation=None, use_bias=True,
                 depthwise_initializer="glorot_uniform", bias_initializer="zeros", depthwise_regularizer=None,
                 bias_regularizer=None, data_format=None, dilation_rate=1, **kwargs):
        super().__init__(**kwargs)
        self.depth_multiplier = arguments.integer(depth_multiplier, "DepthwiseConv2D depth_multiplier", minimum=1)
        self._configure_window(kernel_size, strides, padding, use_bias, activation, data_format, dilation_rate,
                               bias_initializer, bias_regularizer)
        self.depthwise_initializer = initializers.get(depthwise_initializer)
        self.depthwise_regularizer = regularizers.get(depthwise_regularizer)

    def compute_output_shape(self, input_shape):
        return self._output_hw(input_shape) + (input_shape[2] * self.depth_multiplier,)

    def get_config(self):
        return {**super().get_config(), "depth_multiplier": self.depth_multiplier,
                "depthwise_initializer": self.depthwise_initializer, "depthwise_regularizer": self.depthwise_regularizer}

    def create_weights(self, input_shape, rng):
        kh, kw = self.kernel_size
        self.add_weight("depthwise_kernel", (kh, kw, input_shape[2], self.depth_multiplier),
                        self.depthwise_initializer, rng, regularizer=self.depthwise_regularizer)
        self._add_bias(input_shape[2] * self.depth_multiplier, rng)

    def forward_linear(self, x, training):
        z, saved = self.kernels.depthwise_conv2d_forward(x, self.weights["depthwise_kernel"], self.strides, self.pads)
        if self.use_bias:
            z += self.weights["bias"]
        return z, (saved, x.shape)

    def backward_linear(self, saved, dz, need_input_grad=True):
        dw_saved, x_shape = saved
        kernel = self.weights["depthwise_kernel"]
        grads = {}
        if self.use_bias:
            grads["bias"] = self.bias_gradient(dz.reshape(-1, dz.shape[-1]))
        dkernel = self.gradient_array("depthwise_kernel", kernel.shape)
        dx = self.kernels.depthwise_conv2d_backward(dz, dw_saved, x_shape, kernel, self.strides, self.pads, dkernel,
                                                    need_input_grad)
        grads["depthwise_kernel"] = dkernel
        return dx, grads


class SeparableConv2D(_Conv):
    """A depthwise convolution followed by a 1x1 convolution to `filters` channels (no bias
    between them). Weights `depthwise_kernel` (kh, kw, c_in, m), `pointwise_kernel`
    (1, 1, c_in * m, filters), `bias`, as in Keras."""

    base_name = "separable_conv2d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", depth_multiplier=1, activation=None,
                 use_bias=True, depthwise_initializer="glorot_uniform", pointwise_initializer="glorot_uniform",
                 bias_initializer="zeros", depthwise_regularizer=None, pointwise_regularizer=None,
                 bias_regularizer=None, data_format=None, dilation_rate=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = arguments.integer(filters, "SeparableConv2D filters", minimum=1)
        self.depth_multiplier = arguments.integer(depth_multiplier, "SeparableConv2D depth_multiplier", minimum=1)
        self._configure_window(kernel_size, strides, padding, use_bias, activation, data_format, dilation_rate,
                               bias_initializer, bias_regularizer)
        self.depthwise_initializer = initializers.get(depthwise_initializer)
        self.pointwise_initializer = initializers.get(pointwise_initializer)
        self.depthwise_regularizer = regularizers.get(depthwise_regularizer)
        self.pointwise_regularizer = regularizers.get(pointwise_regularizer)

    def compute_output_shape(self, input_shape):
        return self._output_hw(input_shape) + (self.filters,)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "depth_multiplier": self.depth_multiplier,
                "depthwise_initializer": self.depthwise_initializer,
                "pointwise_initializer": self.pointwise_initializer,
                "depthwise_regularizer": self.depthwise_regularizer,
                "pointwise_regularizer": self.pointwise_regularizer}

    def create_weights(self, input_shape, rng):
        kh, kw = self.kernel_size
        mid = input_shape[2] * self.depth_multiplier
        self.add_weight("depthwise_kernel", (kh, kw, input_shape[2], self.depth_multiplier),
                        self.depthwise_initializer, rng, regularizer=self.depthwise_regularizer)
        self.add_weight("pointwise_kernel", (1, 1, mid, self.filters), self.pointwise_initializer, rng,
                        regularizer=self.pointwise_regularizer)
        self._add_bias(self.filters, rng)

    def forward_linear(self, x, training):
        w = self.weights
        mid, dw_saved = self.kernels.depthwise_conv2d_forward(x, w["depthwise_kernel"], self.strides, self.pads)
        pointwise2d = w["pointwise_kernel"].reshape(-1, self.filters)
        z, pw_saved = self.kernels.conv2d_forward(mid, pointwise2d, 1, 1, (1, 1), (0, 0, 0, 0))
        if self.use_bias:
            z += w["bias"]
        return z.reshape((x.shape[0],) + self.output_shape), (dw_saved, pw_saved, x.shape, mid.shape)

    def backward_linear(self, saved, dz, need_input_grad=True):
        dw_saved, pw_saved, x_shape, mid_shape = saved
        w = self.weights
        dz2d = dz.reshape(-1, self.filters)
        grads = {}
        dpointwise2d = self.gradient_array("pointwise_kernel", (mid_shape[-1], self.filters))
        dmid = self.kernels.conv2d_backward(dz2d, pw_saved, mid_shape, w["pointwise_kernel"].reshape(-1, self.filters),
                                            1, 1, (1, 1), (0, 0, 0, 0), dpointwise2d, True)
        ddepthwise = self.gradient_array("depthwise_kernel", w["depthwise_kernel"].shape)
        dx = self.kernels.depthwise_conv2d_backward(dmid, dw_saved, x_shape, w["depthwise_kernel"], self.strides,
                                                    self.pads, ddepthwise, need_input_grad)
        grads["depthwise_kernel"] = ddepthwise
        grads["pointwise_kernel"] = dpointwise2d.reshape(w["pointwise_kernel"].shape)
        if self.use_bias:
            grads["bias"] = self.bias_gradient(dz2d)
        return dx, grads
