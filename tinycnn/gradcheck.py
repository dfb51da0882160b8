"""Check backward passes against central finite differences in float64.

A layer's output is reduced to a scalar with a fixed random projection, L = sum(r * y), so
one backward pass (with dy = r) gives the analytic gradient of L for the input and every
trainable weight; each entry is then compared with (L(w + h) - L(w - h)) / 2h.

The error of one quantity is ``max|a - n| / max(floor, max|a| + max|n|)``: scale-free, and
unlike a per-element ratio it does not blow up on entries that are legitimately near zero.
With h = 1e-6 in float64 the central difference is exact to about 1e-9 relative for smooth
functions, so the default tolerance 1e-6 fails real bugs (errors of order 1) and passes
round-off. Inputs must keep away from kinks (ReLU at 0, max-pool ties) by more than h.

A quantity whose true gradient is zero (a bias feeding a training-mode BatchNormalization)
has no scale to be relative to: differences then resolve nothing below the noise of
(L(w + h) - L(w - h)) / 2h, about 1e-10 here, so such a quantity also passes when every
``|a - n|`` is within `atol` (1e-8).
"""
import numpy as np

from .arrays import to_numpy

DEFAULT_EPS = 1e-6
DEFAULT_TOLERANCE = 1e-6
DEFAULT_ATOL = 1e-8
_FLOOR = 1e-12


class GradientCheckResult:
    """Per checked quantity: its relative error, and where the worst entry is."""

    def __init__(self, tolerance, atol=DEFAULT_ATOL):
        self.tolerance = tolerance
        self.atol = atol
        self.entries = []

    def add(self, name, analytic, numeric, indices):
        diff = np.abs(analytic - numeric)
        scale = max(_FLOOR, float(np.abs(analytic).max(initial=0)) + float(np.abs(numeric).max(initial=0)))
        k = int(np.argmax(diff)) if diff.size else 0
        self.entries.append({
            "name": name,
            "error": float(diff.max(initial=0)) / scale,
            "max_abs_diff": float(diff.max(initial=0)),
            "index": indices[k] if diff.size else None,
            "analytic": float(analytic[k]) if diff.size else 0.0,
            "numeric": float(numeric[k]) if diff.size else 0.0,
            "checked": int(diff.size),
        })

    @property
    def worst(self):
        return max(self.entries, key=lambda e: e["error"])

    def _passes(self, e):
        return e["error"] <= self.tolerance or e["max_abs_diff"] <= self.atol

    @property
    def ok(self):
        return all(self._passes(e) for e in self.entries)

    def __str__(self):
        lines = [f"gradient check (relative tolerance {self.tolerance:g}, atol {self.atol:g}): "
                 f"{'passed' if self.ok else 'FAILED'}"]
        for e in self.entries:
            mark = "ok" if self._passes(e) else "FAIL"
            lines.append(
                f"  {mark:4} {e['name']}: relative error {e['error']:.2e} over {e['checked']} entries; "
                f"worst at {e['index']}: analytic {e['analytic']:.8g} vs numeric {e['numeric']:.8g} "
                f"(|diff| {e['max_abs_diff']:.1e})"
            )
        return "\n".join(lines)

    def assert_ok(self):
        if not self.ok:
            raise AssertionError(str(self))
        return self


def _pick(size, max_checks, rng):
    if max_checks is None or size <= max_checks:
        return np.arange(size)
    return np.sort(rng.choice(size, size=max_checks, replace=False))


def _numeric(f, array, flat_indices, eps):
    """Central differences of scalar f() w.r.t. entries of `array`, perturbed in place."""
    flat = array.reshape(-1)  # a view: arrays passed here are contiguous
    out = np.empty(len(flat_indices))
    for j, i in enumerate(flat_indices):
        i = int(i)
        original = flat[i].item()
        flat[i] = original + eps
        up = f()
        flat[i] = original - eps
        down = f()
        flat[i] = original
        out[j] = (up - down) / (2 * eps)
    return out


def _compare(result, name, array, analytic, f, eps, max_checks, rng):
    idx = _pick(array.size, max_checks, rng)
    numeric = _numeric(f, array, idx, eps)
    analytic = np.asarray(to_numpy(analytic), dtype=np.float64).reshape(-1)[idx]
    result.add(name, analytic, numeric, [tuple(int(v) for v in np.unravel_index(i, array.shape)) for i in idx])


def check_layer(layer, x, training=True, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE, seed=0,
                before_forward=None, max_checks=None, check_input=True):
    """Check `layer.backward` (input and weight gradients) at input `x` (a list of arrays for a
    layer that merges several inputs).

    The layer is built in float64 on the CPU if it is not built yet. `before_forward()` runs
    before every forward pass: use it to replay the same random stream (e.g. Dropout's mask).
    `max_checks` limits the entries checked per quantity (a random subset)."""
    # A stream of its own: a projection equal to the (equally seeded) input would make
    # BatchNormalization's input gradient vanish and the check meaningless.
    rng = np.random.default_rng((seed, 0x6A09E667))
    multi = isinstance(x, (list, tuple))
    if not layer.built:
        shapes = [np.shape(a)[1:] for a in x] if multi else np.shape(x)[1:]
        layer.build(shapes, backend="cpu", dtype="float64", seed=seed)
    if layer.dtype != np.float64:
        raise TypeError("gradient checks need a float64 layer (build it with dtype='float64')")
    xp = layer.xp
    xs = [xp.array(a, dtype=np.float64) for a in (x if multi else [x])]
    hook = before_forward or (lambda: None)

    def run():
        return layer.forward(xs if multi else xs[0], training)

    def f():
        hook()
        return float((run()[0] * projection).sum())

    hook()
    y, saved = run()  # what backward uses
    projection = xp.asarray(rng.standard_normal(y.shape))
    dx, grads = layer.backward(saved, projection, True)
    dxs = dx if multi else [dx]

    result = GradientCheckResult(tolerance)
    if check_input:
        for k, (a, d) in enumerate(zip(xs, dxs)):
            _compare(result, f"input {k}" if multi else "input", a, d, f, eps, max_checks, rng)
    for name in layer.trainable_names:
        _compare(result, name, layer.weights[name], to_numpy(grads[name]).copy(), f, eps, max_checks, rng)
    return result


def check_loss(loss, output, targets, from_logits=True, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE):
    """Check a loss's gradient (of its batch mean) w.r.t. its input, logits or probabilities."""
    output = np.array(output, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)

    def f():
        return float(loss.compute(output, targets, from_logits)[1].mean())

    _, _, grad = loss.compute(output, targets, from_logits)
    result = GradientCheckResult(tolerance)
    _compare(result, f"{loss.name} w.r.t. {'logits' if from_logits else 'probabilities'}",
             output, grad / output.shape[0], f, eps, None, np.random.default_rng(0))
    return result


def check_model(model, x, y, eps=DEFAULT_EPS, tolerance=DEFAULT_TOLERANCE, max_checks=None, seed=0):
    """Check the gradient of a compiled float64 model's training loss against every trainable weight.
    Dropout replays the same masks on every pass, so the loss is a fixed function of the weights.
    A layer used twice is checked once, against the sum of its uses' gradients."""
    if model.dtype != np.float64:
        raise TypeError("gradient checks need a float64 model (Model(..., dtype='float64'))")
    rng = np.random.default_rng(seed)

    def f():
        model.seed_random_streams(0)
        return model.loss_and_gradients(x, y)[0]

    model.seed_random_streams(0)
    _, grads = model.loss_and_gradients(x, y)
    result = GradientCheckResult(tolerance)
    names = [f"{layer.name}/{name}" for layer in model.compute_layers for name in layer.trainable_names]
    for label, weight, grad in zip(names, model.trainable_weights, grads):
        _compare(result, label, weight, grad, f, eps, max_checks, rng)
    return result
