"""BatchNormalization."""
from .. import arguments, batch_split, initializers, parameters, regularizers
from ..errors import ShapeError
from .base import Layer


class BatchNormalization(Layer):
    """Normalizes the last axis: batch statistics in training (and an update of the moving
    statistics, Keras 3's rule), the moving statistics in inference. A frozen layer
    (`trainable = False`) normalizes with the moving statistics in training too, as in Keras.
    `center=False` drops beta, `scale=False` drops gamma. `synchronized=True` (Keras 3's option):
    under data-parallel training the batch statistics are those of the global batch, summed over
    the ranks (tinycnn.distributed); in one process it changes nothing."""

    thread_safe = True  # see Layer.thread_safe
    base_name = "batch_normalization"

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.synchronized = bool(synchronized)
        self.reduce = None  # during a distributed fit: the sum over the ranks that share the batch statistics
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

    def gradient_targets(self):
        """(dgamma, dbeta) slots for the kernels to write (tinycnn.parameters.gradient_target), or None."""
        return parameters.gradient_target(self, "gamma"), parameters.gradient_target(self, "beta")

    def batch_reduce(self):
        """The sum the kernels take the batch statistics over: the shares of a split batch
        (tinycnn.batch_split), else the ranks (`reduce`), else None (this batch alone)."""
        return batch_split.reduce_or(self.reduce)

    def moving_update(self):
        """What a training forward's kernel updates with the batch's statistics: (moving_mean,
        moving_variance, momentum), moving = moving * momentum + batch * (1 - momentum) with the
        biased batch variance (Keras 3). None in a split batch's other shares: all of them hold the
        whole batch's statistics, and the lead's update counts."""
        if not batch_split.is_lead():
            return None
        w = self.weights
        return w["moving_mean"], w["moving_variance"], self.momentum

    def uses_batch_statistics(self, training):
        return training and self.trainable

    def synchronize_with(self, comm):
        """Share batch statistics with the ranks of `comm` (None: this process's batch alone): the
        kernels take the moments and the gradient sums over every rank's rows."""
        self.reduce = None if comm is None else comm.sum_

    def forward(self, x, training):
        w = self.weights
        gamma, beta = self.affine()
        x2d = x.reshape(-1, x.shape[-1])
        if self.uses_batch_statistics(training):
            reduce = self.batch_reduce()
            if x2d.shape[0] == 0 and reduce is None:  # a rank's empty share, statistics per rank: none
                return x, ("empty", None, None)
            y2d, saved, _, _, inv_std = self.kernels.batchnorm_forward_train(x2d, gamma, beta, self.epsilon, reduce,
                                                                            self.moving_update())
            return y2d.reshape(x.shape), ("train", saved, inv_std)
        y2d, scale = self.kernels.batchnorm_forward_infer(x2d, gamma, beta, w["moving_mean"], w["moving_variance"],
                                                          self.epsilon)
        return y2d.reshape(x.shape), ("infer", x2d, scale)

    def backward(self, saved, dy, need_input_grad=True):
        mode, a, b = saved
        dy2d = dy.reshape(-1, dy.shape[-1])
        w = self.weights
        if mode == "empty":
            zeros = self.xp.zeros(dy.shape[-1], dtype=dy.dtype)
            return dy, self.affine_grads(zeros, zeros.copy())
        if mode == "train":
            dx, dgamma, dbeta = self.kernels.batchnorm_backward_train(dy2d, a, self.affine()[0], b,
                                                                      self.batch_reduce(), self.gradient_targets())
        else:  # inference mode is an affine map with constant statistics
            x2d, scale = a, b
            xhat = (x2d - w["moving_mean"]) / self.xp.sqrt(w["moving_variance"] + self.epsilon)
            dgamma, dbeta = (dy2d * xhat).sum(axis=0), dy2d.sum(axis=0)
            dx = dy2d * scale
        return (dx.reshape(dy.shape) if need_input_grad else None), self.affine_grads(dgamma, dbeta)
