"""BatchNormalization."""
import math

import numpy as np

from .base import Layer


class BatchNormalization(Layer):
    """Normalizes the last axis: batch statistics in training (and an update of the moving
    statistics, Keras 3's rule), the moving statistics in inference."""

    base_name = "batch_normalization"

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"BatchNormalization momentum must be in [0, 1], got {momentum!r}")
        if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
            raise ValueError(f"BatchNormalization epsilon must be positive and finite, got {epsilon!r}")
        if not (center and scale):
            raise ValueError("BatchNormalization supports center=True and scale=True only")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    def create_weights(self, input_shape, rng):
        c = input_shape[-1]
        self.add_weight("gamma", np.ones(c), True)
        self.add_weight("beta", np.zeros(c), True)
        self.add_weight("moving_mean", np.zeros(c), False)
        self.add_weight("moving_variance", np.ones(c), False)

    def update_moving_statistics(self, mean, var):
        """moving = moving * momentum + batch * (1 - momentum), with the biased batch variance (Keras 3)."""
        w = self.weights
        w["moving_mean"] *= self.momentum
        w["moving_mean"] += (1.0 - self.momentum) * mean
        w["moving_variance"] *= self.momentum
        w["moving_variance"] += (1.0 - self.momentum) * var

    def forward(self, x, training):
        w = self.weights
        x2d = x.reshape(-1, x.shape[-1])
        if training:
            y2d, saved, mean, var, inv_std = self.kernels.batchnorm_forward_train(x2d, w["gamma"], w["beta"],
                                                                                 self.epsilon)
            self.update_moving_statistics(mean, var)
            return y2d.reshape(x.shape), ("train", saved, inv_std)
        y2d, scale = self.kernels.batchnorm_forward_infer(x2d, w["gamma"], w["beta"], w["moving_mean"],
                                                          w["moving_variance"], self.epsilon)
        return y2d.reshape(x.shape), ("infer", x2d, scale)

    def backward(self, saved, dy, need_input_grad=True):
        mode, a, b = saved
        dy2d = dy.reshape(-1, dy.shape[-1])
        w = self.weights
        if mode == "train":
            dx, dgamma, dbeta = self.kernels.batchnorm_backward_train(dy2d, a, w["gamma"], b)
        else:  # inference mode is an affine map with constant statistics
            x2d, scale = a, b
            xhat = (x2d - w["moving_mean"]) / self.xp.sqrt(w["moving_variance"] + self.epsilon)
            dgamma, dbeta = (dy2d * xhat).sum(axis=0), dy2d.sum(axis=0)
            dx = dy2d * scale
        return (dx.reshape(dy.shape) if need_input_grad else None), {"gamma": dgamma, "beta": dbeta}
