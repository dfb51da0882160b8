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
    """Cosine from initial_learning_rate down to alpha * initial_learning_rate over decay_steps.

    With `warmup_target` (Keras 3), the rate first rises linearly from initial_learning_rate to
    warmup_target over `warmup_steps`, then decays by the cosine from warmup_target."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name=None, warmup_target=None, warmup_steps=0):
        if decay_steps <= 0:
            raise ValueError(f"CosineDecay needs decay_steps > 0, got {decay_steps!r}")
        if warmup_steps < 0 or (warmup_target is not None and warmup_target <= 0):
            raise ValueError("CosineDecay needs warmup_steps >= 0 and a positive warmup_target")
        if initial_learning_rate < 0 or (initial_learning_rate == 0 and warmup_target is None):
            raise ValueError("CosineDecay needs a positive initial_learning_rate (0 only when warming up)")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.alpha = float(alpha)
        self.warmup_target = None if warmup_target is None else float(warmup_target)
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        peak = self.initial_learning_rate
        if self.warmup_target is not None:
            if step < self.warmup_steps:
                return peak + (self.warmup_target - peak) * step / self.warmup_steps
            peak, step = self.warmup_target, step - self.warmup_steps
        completed = min(step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1 + math.cos(math.pi * completed))
        return peak * ((1 - self.alpha) * cosine + self.alpha)
