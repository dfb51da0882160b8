"""Learning-rate schedules: callables from a step (or epoch) count to a learning rate."""
import math


class LearningRateSchedule:
    def __call__(self, step):
        raise NotImplementedError


class _StepDecay(LearningRateSchedule):
    """What InverseTimeDecay and ExponentialDecay share: a rate applied per `decay_steps` steps."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False):
        if decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {decay_steps!r}")
        if initial_learning_rate <= 0 or decay_rate < 0:
            raise ValueError("initial_learning_rate must be positive and decay_rate non-negative")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.decay_rate = float(decay_rate)
        self.staircase = bool(staircase)

    def progress(self, step):
        """step / decay_steps, floored when staircase."""
        progress = step / self.decay_steps
        return math.floor(progress) if self.staircase else progress

    def __repr__(self):
        return (f"{type(self).__name__}({self.initial_learning_rate}, {self.decay_steps}, {self.decay_rate}, "
                f"staircase={self.staircase})")


class InverseTimeDecay(_StepDecay):
    """initial_learning_rate / (1 + decay_rate * step / decay_steps), step floored when staircase.

    Computed in Python floats (float64), so `InverseTimeDecay(0.003, 1, 0.319)(1)` is
    0.002274450341167551, the value the Week2 log prints for epoch 2."""

    def __call__(self, step):
        return self.initial_learning_rate / (1 + self.decay_rate * self.progress(step))


class ExponentialDecay(_StepDecay):
    """initial_learning_rate * decay_rate ** (step / decay_steps), the exponent floored when staircase."""

    def __call__(self, step):
        return self.initial_learning_rate * self.decay_rate ** self.progress(step)


class PiecewiseConstantDecay(LearningRateSchedule):
    """values[0] up to boundaries[0] (inclusive), values[1] up to boundaries[1], ..., values[-1] after."""

    def __init__(self, boundaries, values):
        if len(values) != len(boundaries) + 1:
            raise ValueError("PiecewiseConstantDecay needs one more value than boundaries")
        if list(boundaries) != sorted(boundaries):
            raise ValueError("PiecewiseConstantDecay boundaries must increase")
        self.boundaries, self.values = list(boundaries), [float(v) for v in values]

    def __call__(self, step):
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return value
        return self.values[-1]


class CosineDecay(LearningRateSchedule):
    """Cosine from initial_learning_rate down to alpha * initial_learning_rate over decay_steps."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0):
        if decay_steps <= 0 or initial_learning_rate <= 0:
            raise ValueError("CosineDecay needs positive initial_learning_rate and decay_steps")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.alpha = float(alpha)

    def __call__(self, step):
        completed = min(step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1 + math.cos(math.pi * completed))
        return self.initial_learning_rate * ((1 - self.alpha) * cosine + self.alpha)
