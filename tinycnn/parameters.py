"""A model's trainable weights as views into one flat buffer, and their gradients into another.

The optimizer then updates every parameter with one fused kernel call per step (12,316 numbers
for the Week2 model, not 22 small arrays). Each layer's `weights[name]` *is* the view, so layer
code reads the current values with no copy.

A layer may belong to several models (Keras lets two models share layers). Its weights live in
the buffer of the model that bound them last: before a model trains, `bind()` takes back any
weight another model took, copying its current value in, so shared weights always have one
current value and every model updates the copy its optimizer state describes.

While a backward pass runs (`collecting()`), a layer may ask for the slot its gradient goes to
(`gradient_target`) and compute the gradient straight into it, instead of into a new array that
is then copied: on a GPU each of those copies is a kernel launch (23 per Week2 step).
"""
import contextlib
import contextvars

_collecting = contextvars.ContextVar("tinycnn_gradient_sink", default=None)


def gradient_target(layer, name):
    """Where `layer` may write weight `name`'s gradient in the backward pass running here: its
    slot in the model's gradient buffer if this pass has not written that yet, else None (write a
    new array, which the pass adds). A layer that asks must return its gradient there, whole."""
    sink = _collecting.get()
    return None if sink is None else sink.target(layer, name)


class _GradientSink:
    """Where a backward pass writes weight gradients: `grad_views[k]` for entry k of `index`."""

    # -- gradients: one backward pass writes each entry once per use, summing uses -------------
    @contextlib.contextmanager
    def collecting(self):
        """The block of one backward pass: it writes every entry (zero where no gradient came)."""
        self._written = [False] * len(self.grad_views)
        self._handed = set()
        token = _collecting.set(self)
        try:
            yield self
        finally:
            _collecting.reset(token)
        self._finish()

    def target(self, layer, name):
        k = self.index.get((id(layer), name))
        if k is None or self._written[k] or k in self._handed:
            return None
        self._handed.add(k)
        return self.grad_views[k]

    def add_gradient(self, layer, name, value):
        k = self.index[(id(layer), name)]
        view = self.grad_views[k]
        if k in self._handed:
            self._handed.discard(k)
            if self.xp.may_share_memory(value, view):  # written in place (gradient_target): nothing to copy
                self._written[k] = True
                return
        if self._written[k]:
            view += value
        else:
            view[...] = value
            self._written[k] = True

    def _finish(self):
        """Zero the gradients of weights no step of this backward pass reached."""
        for written, view in zip(self._written, self.grad_views):
            if not written:
                view[...] = 0


class ParameterBuffer(_GradientSink):
    def __init__(self, entries, xp, dtype):
        """`entries`: (layer, weight name) pairs in a fixed order (the model's layer order)."""
        self.entries = list(entries)
        self.xp = xp
        sizes = [layer.weights[name].size for layer, name in self.entries]
        self.size = int(sum(sizes))
        self.params = xp.empty(self.size, dtype=dtype)
        self.grads = xp.zeros(self.size, dtype=dtype)
        self.views, self.grad_views, offset = [], [], 0
        for (layer, name), size in zip(self.entries, sizes):
            shape = layer.weights[name].shape
            self.views.append(self.params[offset : offset + size].reshape(shape))
            self.grad_views.append(self.grads[offset : offset + size].reshape(shape))
            offset += size
        self.index = {(id(layer), name): k for k, (layer, name) in enumerate(self.entries)}
        self.regularized = [(k, layer.regularizers[name]) for k, (layer, name) in enumerate(self.entries)
                            if name in layer.regularizers]
        self._written = [False] * len(self.entries)
        self.bind()

    def bind(self):
        """Make every entry's layer weight this buffer's view again (copying the current value in
        where another model's buffer or a fresh build holds it). Returns how many were rebound."""
        rebound = 0
        for (layer, name), view in zip(self.entries, self.views):
            current = layer.weights[name]
            if current is not view:
                view[...] = current
                layer.weights[name] = view
                rebound += 1
        return rebound

    def owns_all(self):
        return all(layer.weights[name] is view for (layer, name), view in zip(self.entries, self.views))

    def gradient_share(self, k):
        """Gradient buffer k (1, 2, ...) for the other shares of a split batch (tinycnn.batch_split):
        this buffer's layout in an array of its own, kept for the next step. Share 0 writes here."""
        shares = self.__dict__.setdefault("_shares", {})
        if k not in shares:
            shares[k] = _GradientShare(self)
        return shares[k]

    def share_gradients(self, shares):
        """The gradient arrays of shares 1 .. shares-1 (gradient_share), in share order."""
        return [self.gradient_share(k).grads for k in range(1, shares)]

    def gradient_share_into(self, grads):
        """A gradient buffer for another share that writes into `grads` (this buffer's layout; the
        memory a share process hands back, tinycnn.share_process)."""
        return _GradientShare(self, grads)

    # -- regularizers: their penalty joins the loss and their gradient the weights' gradients ------
    def regularization_penalty(self):
        """The sum of the regularizers' penalties (a device scalar), or None without regularizers."""
        if not self.regularized:
            return None
        total = 0.0
        for k, regularizer in self.regularized:
            total = total + regularizer.penalty(self.views[k])
        return total

    def add_regularization(self):
        """Add each regularizer's gradient to its weight's gradient; returns the penalty (or None)."""
        for k, regularizer in self.regularized:
            self.grad_views[k] += regularizer.gradient(self.views[k])
        return self.regularization_penalty()


class _GradientShare(_GradientSink):
    def __init__(self, buffer, grads=None):
        self.index = buffer.index
        self.xp = buffer.xp
        self.grads = buffer.xp.zeros_like(buffer.grads) if grads is None else grads
        self.grad_views, offset = [], 0
        for view in buffer.grad_views:
            self.grad_views.append(self.grads[offset : offset + view.size].reshape(view.shape))
            offset += view.size
        self._written = [False] * len(self.grad_views)
