"""Learning-rate schedules: callables from a step (or epoch) count to a learning rate."""
import math


class LearningRateSchedule:
    def __call__(self, step):
        raise NotImplementedError


class InverseTimeDecay(LearningRateSchedule):
    """initial_learning_rate / (1 + decay_rate * step / decay_steps), step floored when staircase.

    Computed in Python floats (float64), so `InverseTimeDecay(0.003, 1, 0.319)(1)` is
    0.002274450341167551, the value the Week2 log prints for epoch 2."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        if decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {decay_steps!r}")
        if initial_learning_rate <= 0 or decay_rate < 0:
            raise ValueError("initial_learning_rate must be positive and decay_rate non-negative")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.decay_rate = float(decay_rate)
        self.staircase = bool(staircase)

    def __call__(self, step):
        progress = step / self.decay_steps
        if self.staircase:
            progress = math.floor(progress)
        return self.initial_learning_rate / (1 + self.decay_rate * progress)

    def __repr__(self):
        return (f"InverseTimeDecay({self.initial_learning_rate}, {self.decay_steps}, {self.decay_rate}, "
                f"staircase={self.staircase})")
