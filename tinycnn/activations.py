"""Activation functions: each a forward and a backward, and a statement of what the backward needs.

`activation=` on a layer takes a name ("relu", "gelu", ...), None (linear) or one of the objects
below (`tinycnn.activations.relu`), as in Keras. An `ActivationFunction` declares whether its
backward reads the input x, the output y, or both (`uses`), so a layer keeps only those for its
backward pass. ReLU goes through the backend's kernel set, so the CPU and GPU paths use their
fast versions; the others are array code that runs on NumPy and CuPy alike.
"""
import math

from .arrays import get_array_module

__all__ = ["ActivationFunction", "get", "names", "linear", "relu", "sigmoid", "tanh", "softmax", "elu", "selu",
           "leaky_relu", "gelu", "silu", "swish"]


class ActivationFunction:
    """y = forward(x, kernels); dx = backward(dy, x, y, kernels), where x and y are None unless
    named in `uses`. Neither may modify its inputs."""

    def __init__(self, name, forward, backward, uses, params=None):
        self.name = name
        self.params = dict(params or {})  # the constants of a parametric activation (alpha, negative_slope)
        self._forward = forward
        self._backward = backward
        self.uses = frozenset(uses)
        if not self.uses <= {"x", "y"}:
            raise ValueError(f"an activation's backward uses 'x' and/or 'y', got {sorted(uses)}")

    @property
    def uses_x(self):
        return "x" in self.uses

    @property
    def uses_y(self):
        return "y" in self.uses

    def forward(self, x, kernels=None):
        return self._forward(x, kernels)

    def backward(self, dy, x, y, kernels=None):
        return self._backward(dy, x, y, kernels)

    def __call__(self, x):
        """Apply it to an array, as `keras.activations.relu(x)` does."""
        return self.forward(x)

    def __repr__(self):
        return f"<activation {self.name}>"


def _relu_forward(x, kernels):
    return kernels.relu_forward(x) if kernels is not None else get_array_module(x).maximum(x, 0)


def _relu_backward(dy, x, y, kernels):
    return kernels.relu_backward(dy, y) if kernels is not None else dy * (y > 0)


def _sigmoid_forward(x, kernels):
    return 0.5 * (get_array_module(x).tanh(0.5 * x) + 1)  # overflow-free form of 1 / (1 + exp(-x))


def _softmax_forward(x, kernels=None):
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ELU_ALPHA = 1.0
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
LEAKY_RELU_SLOPE = 0.2  # keras.activations.leaky_relu's default (the LeakyReLU layer's is 0.3)


def _elu(x, alpha):
    xp = get_array_module(x)
    return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0)))


def _elu_backward(dy, y, alpha):
    # x > 0 exactly where y > 0, and there d/dx = 1; elsewhere d/dx = alpha * exp(x) = y + alpha
    return dy * get_array_module(dy).where(y > 0, 1, y + alpha)


def _erf(x):
    """The error function, elementwise, on NumPy (numba's libm erf) or CuPy arrays."""
    xp = get_array_module(x)
    if xp.__name__ == "numpy":
        return _numpy_erf()(x)
    from cupyx.scipy.special import erf

    return erf(x)


def _erf_scalar(x):
    return math.erf(x)


_ERF_UFUNC = []


def _numpy_erf():
    if not _ERF_UFUNC:  # compiled (or loaded from numba's cache) on first use only
        from numba import vectorize

        _ERF_UFUNC.append(vectorize(["float32(float32)", "float64(float64)"], cache=True)(_erf_scalar))
    return _ERF_UFUNC[0]


def _gelu_forward(x, kernels):
    """Keras's default (exact) GELU: x * Phi(x), Phi the standard normal CDF."""
    return 0.5 * x * (1 + _erf(x * x.dtype.type(1 / math.sqrt(2))))


def _gelu_backward(dy, x, y, kernels):
    xp = get_array_module(x)
    cdf = 0.5 * (1 + _erf(x * x.dtype.type(1 / math.sqrt(2))))
    pdf = xp.exp(-0.5 * x * x) * x.dtype.type(1 / math.sqrt(2 * math.pi))
    return dy * (cdf + x * pdf)


def _silu_backward(dy, x, y, kernels):
    s = _sigmoid_forward(x, kernels)
    return dy * (s * (1 + x * (1 - s)))


#: f(x) = x.
linear = ActivationFunction("linear", lambda x, k: x, lambda dy, x, y, k: dy, ())
#: max(x, 0).
relu = ActivationFunction("relu", _relu_forward, _relu_backward, ("y",))
#: 1 / (1 + exp(-x)).
sigmoid = ActivationFunction("sigmoid", _sigmoid_forward, lambda dy, x, y, k: dy * y * (1 - y), ("y",))
#: The hyperbolic tangent.
tanh = ActivationFunction("tanh", lambda x, k: get_array_module(x).tanh(x), lambda dy, x, y, k: dy * (1 - y * y), ("y",))
#: exp(x) / sum(exp(x)) over the last axis.
softmax = ActivationFunction("softmax", _softmax_forward,
                             lambda dy, x, y, k: y * (dy - (dy * y).sum(axis=-1, keepdims=True)), ("y",))
def make_elu(alpha=ELU_ALPHA):
    """ELU: x for x > 0, alpha * (exp(x) - 1) otherwise."""
    alpha = float(alpha)
    return ActivationFunction("elu", lambda x, k: _elu(x, alpha), lambda dy, x, y, k: _elu_backward(dy, y, alpha),
                              ("y",), {"alpha": alpha})


#: x for x > 0, else alpha (exp(x) - 1), alpha = 1.
elu = make_elu()
#: Scaled ELU with the self-normalizing constants (Klambauer et al. 2017).
selu = ActivationFunction("selu", lambda x, k: SELU_SCALE * _elu(x, SELU_ALPHA),
                          lambda dy, x, y, k: SELU_SCALE * _elu_backward(dy, y / SELU_SCALE, SELU_ALPHA), ("y",))
#: The Gaussian error linear unit, x * Phi(x).
gelu = ActivationFunction("gelu", _gelu_forward, _gelu_backward, ("x",))
#: x * sigmoid(x).
silu = ActivationFunction("silu", lambda x, k: x * _sigmoid_forward(x, k), _silu_backward, ("x",))
#: Another name of silu.
swish = silu


def make_leaky_relu(negative_slope=LEAKY_RELU_SLOPE):
    """Leaky ReLU: x for x > 0, negative_slope * x otherwise."""
    slope = float(negative_slope)

    def forward(x, kernels):
        return get_array_module(x).where(x > 0, x, x * x.dtype.type(slope))

    def backward(dy, x, y, kernels):
        return dy * get_array_module(dy).where(x > 0, 1, dy.dtype.type(slope))

    return ActivationFunction("leaky_relu", forward, backward, ("x",), {"negative_slope": slope})


#: x for x > 0, else 0.2 x (Keras 3's default slope).
leaky_relu = make_leaky_relu()

_BY_NAME = {f.name: f for f in (linear, relu, sigmoid, tanh, softmax, elu, selu, leaky_relu, gelu, silu)}
_BY_NAME["swish"] = silu


def names():
    """Every activation name `get` accepts."""
    return sorted(_BY_NAME)


def get(activation):
    """The ActivationFunction for a name, None (linear) or an ActivationFunction itself."""
    if activation is None:
        return linear
    if isinstance(activation, ActivationFunction):
        return activation
    if isinstance(activation, str) and activation in _BY_NAME:
        return _BY_NAME[activation]
    raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(names())}")
