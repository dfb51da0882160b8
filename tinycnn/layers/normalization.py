"""BatchNormalization."""
from .. import arguments, initializers, regularizers
from ..errors import ShapeError
from .base import Layer


class BatchNormalization(Layer):
    """Normalizes the last axis: batch statistics in training (and an update of the moving
    statistics, Keras 3's rule), the moving statistics in inference. A frozen layer
    (`trainable = False`) normalizes with the moving statistics in training too, as in Keras.
    `center=False` drops beta, `scale=False` drops gamma. `synchronized=True` (Keras 3's option):
    under data-parallel training the batch statistics are those of the global batch, summed over
    the ranks (tinycnn.distributed); in one process it changes nothing."""

    base_name = "batch_normalization"

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.synchronized = bool(synchronized)
        self.sync = None  # the communicator whose ranks share the batch statistics, during a distributed fit
        self.momentum = arguments.real(momentum, "BatchNormalization momentum", 0.0, 1.0)
        self.epsilon = arguments.real(epsilon, "BatchNormalization epsilon", low=0.0, low_open=True)
        self.axis = arguments.integer(axis, "BatchNormalization axis")
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
                "center": self.center, "scale": self.scale, "beta_initializer": self.beta_initializer,
                "gamma_initializer": self.gamma_initializer, "moving_mean_initializer": self.moving_mean_initializer,
                "moving_variance_initializer": self.moving_variance_initializer,
                "beta_regularizer": self.beta_regularizer, "gamma_regularizer": self.gamma_regularizer,
                "synchronized": self.synchronized}

    def compute_output_shape(self, input_shape):
        if self.axis not in (-1, len(input_shape)):
            raise ShapeError(f"BatchNormalization {self.name} normalizes the last axis only (axis=-1 or "
                             f"{len(input_shape)} for inputs {input_shape}), got axis={self.axis}")
        return input_shape

    def create_weights(self, input_shape, rng):
        c = (input_shape[-1],)
        if self.scale:
            self.add_weight("gamma", c, self.gamma_initializer, rng, regularizer=self.gamma_regularizer)
        if self.center:
            self.add_weight("beta", c, self.beta_initializer, rng, regularizer=self.beta_regularizer)
        self.add_weight("moving_mean", c, self.moving_mean_initializer, rng, trainable=False)
        self.add_weight("moving_variance", c, self.moving_variance_initializer, rng, trainable=False)
        self._unit = self.xp.ones(c, dtype=self.dtype), self.xp.zeros(c, dtype=self.dtype)

    def affine(self):
        """(gamma, beta): the weights, or the constants 1 and 0 when scale or center is off."""
        w = self.weights
        return w["gamma"] if self.scale else self._unit[0], w["beta"] if self.center else self._unit[1]

    def affine_grads(self, dgamma, dbeta):
        grads = {}
        if self.scale:
            grads["gamma"] = dgamma
        if self.center:
            grads["beta"] = dbeta
        return grads

    def update_moving_statistics(self, mean, var):
        """moving = moving * momentum + batch * (1 - momentum), with the biased batch variance (Keras 3)."""
        w = self.weights
        w["moving_mean"] *= self.momentum
        w["moving_mean"] += (1.0 - self.momentum) * mean
        w["moving_variance"] *= self.momentum
        w["moving_variance"] += (1.0 - self.momentum) * var

    def uses_batch_statistics(self, training):
        return training and self.trainable

    def synchronize_with(self, comm):
        """Share batch statistics with the ranks of `comm` (None: this process's batch alone)."""
        self.sync = comm

    def forward(self, x, training):
        w = self.weights
        gamma, beta = self.affine()
        x2d = x.reshape(-1, x.shape[-1])
        if self.uses_batch_statistics(training) and self.sync is not None:
            return self._forward_synchronized(x, x2d, gamma, beta)
        if self.uses_batch_statistics(training) and x2d.shape[0] == 0:  # a rank's empty share: no statistics
            return x, ("empty", None, None)
        if self.uses_batch_statistics(training):
            y2d, saved, mean, var, inv_std = self.kernels.batchnorm_forward_train(x2d, gamma, beta, self.epsilon)
            self.update_moving_statistics(mean, var)
            return y2d.reshape(x.shape), ("train", saved, inv_std)
        y2d, scale = self.kernels.batchnorm_forward_infer(x2d, gamma, beta, w["moving_mean"], w["moving_variance"],
                                                          self.epsilon)
        return y2d.reshape(x.shape), ("infer", x2d, scale)

    def backward(self, saved, dy, need_input_grad=True):
        mode, a, b = saved
        dy2d = dy.reshape(-1, dy.shape[-1])
        w = self.weights
        if mode == "synchronized":
            return self._backward_synchronized(dy, dy2d, a, b, need_input_grad)
        if mode == "empty":
            zeros = self.xp.zeros(dy.shape[-1], dtype=dy.dtype)
            return dy, self.affine_grads(zeros, zeros.copy())
        if mode == "train":
            dx, dgamma, dbeta = self.kernels.batchnorm_backward_train(dy2d, a, self.affine()[0], b)
        else:  # inference mode is an affine map with constant statistics
            x2d, scale = a, b
            xhat = (x2d - w["moving_mean"]) / self.xp.sqrt(w["moving_variance"] + self.epsilon)
            dgamma, dbeta = (dy2d * xhat).sum(axis=0), dy2d.sum(axis=0)
            dx = dy2d * scale
        return (dx.reshape(dy.shape) if need_input_grad else None), self.affine_grads(dgamma, dbeta)

    # -- synchronized batch statistics (data parallelism): the formulas of the single-process
    # kernels, with each sum over rows taken over every rank's rows. Sums accumulate in float64.
    def _forward_synchronized(self, x, x2d, gamma, beta):
        xp, dtype = self.xp, x2d.dtype
        sums = xp.concatenate([x2d.sum(axis=0, dtype=xp.float64), xp.array([x2d.shape[0]], dtype=xp.float64)])
        self.sync.sum_(sums)
        count = sums[-1]
        mean = (sums[:-1] / count).astype(dtype)
        centered = x2d - mean
        squares = (centered * centered).sum(axis=0, dtype=xp.float64)
        self.sync.sum_(squares)
        var = (squares / count).astype(dtype)
        inv_std = (1.0 / xp.sqrt(squares / count + self.epsilon)).astype(dtype)
        xhat = centered * inv_std
        self.update_moving_statistics(mean, var)
        return (xhat * gamma + beta).reshape(x.shape), ("synchronized", xhat, (inv_std, count))

    def _backward_synchronized(self, dy, dy2d, xhat, stats, need_input_grad):
        inv_std, count = stats
        xp = self.xp
        dbeta = dy2d.sum(axis=0, dtype=xp.float64)
        dgamma = (dy2d * xhat).sum(axis=0, dtype=xp.float64)
        # This rank's dgamma and dbeta are its parameter gradients (the gradient sum over the
        # ranks adds them up); the input gradient needs the global ones.
        local = dgamma.astype(dy.dtype), dbeta.astype(dy.dtype)
        dx = None
        if need_input_grad:
            both = self.sync.sum_(xp.concatenate([dbeta, dgamma]))
            c = dy2d.shape[1]
            total_beta, total_gamma = both[:c].astype(dy.dtype), both[c:].astype(dy.dtype)
            dx = ((self.affine()[0] * inv_std / dy.dtype.type(count)) *
                  (dy.dtype.type(count) * dy2d - total_beta - xhat * total_gamma)).reshape(dy.shape)
        return dx, self.affine_grads(*local)
