"""How far rounding can move each gradient of one step: a running error estimate, layer kind by
layer kind, through an engine's trace (used by :mod:`manualprop.verdict.conditioning`).

First order, as numerical analysis writes it: forward, the error of each layer's output from its
own rounding and from the error of what came in (the inputs are exact; a parameter carries the
spread of the steps before it); backward, the error of the loss gradient (taken at the output
moved by its error), of each activation's derivative (taken at Z and A moved by theirs, so that
``1 - a^2`` at a = 1 shows its rounding) and of every product. An error has two parts
(:class:`Flow`): one of each element's own roundings, independent of the other elements' (summed,
they add as a root sum of squares, or a deep network's would grow by sqrt(n) a layer and excuse
everything), and one that every sample may share (a parameter's held error, a batch_norm
statistic's; summed over the batch, they add up in magnitude). A sum of n terms rounds by
``u sqrt(n) (|sum| + sqrt(sum of squares))`` (:meth:`_Walk.rounding`), more where NumPy adds
alike terms one by one (:meth:`_Walk.sum_rounding`).

Each layer kind has its rule in :data:`RULES`, as :data:`manualprop.reference.layers.KINDS` has
its maths: dense and conv2d (the dense rule on the im2col windows) sum products; max_pool2d
selects, passing its input's error through, and may send the gradient to another element of a
window that is as large within the errors; avg_pool2d sums and divides; flatten is exact;
batch_norm and layer_norm divide the errors of x and of the mean by ``sqrt(var + eps)``, large
when a feature barely varies (the ill-conditioned case), and their backward cancels. The losses
on the logits round their probability before the targets are taken away. What the reference
computes exactly from exact values (the same in the wider type, and for a sum in whatever order
it is added) carries no error.

Measured against the NumPy engine in float32 and the same case in float64 (tests/
test_layer_conditioning.py): the actual error is at most 0.66 of the estimate, typically 0.005 to
0.05, for every kind and loss. The margin compounds with depth: in a LeNet-like network with
batch_norm and layer_norm, the first conv layer's estimate is about 1e5 times its actual float32
error (a batch_norm statistic's error, shared by every sample, is added in magnitude over the
batch and the positions of every convolution before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..casefile.case import Case, Layer
from ..engines import LayerTrace, filled
from ..reference import losses
from ..reference.activations import ACTIVATIONS
from ..reference.layers import padding_of
from ..reference.losses import LOSSES

OPERATION = 2  # an operation's rounding in each of two engines, in units of u times its terms' magnitude

Array = np.ndarray


Errors = tuple[Array, Array]  # (error, shared), as in Flow
NONE: Errors = (np.zeros(0), np.zeros(0))  # the error of dL/dA_prev of the first layer: not needed


class StepErrors(NamedTuple):
    """One step's estimate: dL/dp per trainable parameter as the engine computed it, how far
    rounding can move it, how far it can move the loss, dL/dp computed in a wider type (to tell
    an exact update; empty without one) and, per moving statistic, how far its change can move."""

    grads: dict[str, Array]
    errors: dict[str, Array]
    loss: float
    wide_grads: dict[str, Array]
    moved: dict[str, Array]


class Flow(NamedTuple):
    """A value as the engine computed it (float64) and how far from the exact one rounding can
    have moved it, in two parts: ``error``, of the element's own roundings, independent of the
    other elements'; ``shared``, what may move every sample and position of a feature alike."""

    value: Array
    error: Array
    shared: Array

    @property
    def total(self) -> Array:
        return self.error + self.shared


def gradient_errors(
    case: Case, trace: list[LayerTrace], params: dict[str, np.ndarray], held: dict[str, np.ndarray] | None = None
) -> StepErrors:
    """A running error estimate through the step's forward and backward pass, each layer by the
    rule of its kind. ``trace`` has every field the rules read (:func:`manualprop.verdict.conditioning.allowance` fills them); ``held`` is how far the
    parameters an engine holds may already differ from the reference's (None: not at all, the
    first step). What the reference computes exactly from exact values (the same in the wider
    type, and for a sum in whatever order it is added) carries no error: a case built on dyadic
    numbers, a ReLU's Z exactly at 0, MAE's sign(y - t) / N, stay on their value."""
    walk = _Walk(case, trace, reference_trace(case, params, wider(case)), params, held or {})
    inputs = np.asarray(case.inputs, dtype=np.float64)
    flows = [Flow(inputs, np.zeros(inputs.shape), np.zeros(inputs.shape))]
    for i, layer in enumerate(case.layers):
        error, shared = RULES[layer.kind].forward(walk, i, flows[i])
        flows.append(Flow(_f64(trace[i].A), error, shared))
    d = walk.loss(flows[-1])
    for i in reversed(range(len(case.layers))):
        error, shared = RULES[case.layers[i].kind].backward(walk, i, flows[i], d)
        if i > 0:
            d = Flow(_f64(trace[i - 1].dA), error, shared)
    wide_grads = _gradients(walk.wide) if walk.wide is not None else {}
    return StepErrors(walk.grads, walk.errors, walk.loss_error, wide_grads, walk.moved)


@dataclass
class _Walk:
    """What a step's rules share: the case, the engine's trace, the reference's in a wider type
    (None without one), the parameters with their held errors, and what the rules find."""

    case: Case
    trace: list[LayerTrace]
    wide: list[LayerTrace] | None
    params: dict[str, Array]
    held: dict[str, Array]
    grads: dict[str, Array] = field(default_factory=dict)
    errors: dict[str, Array] = field(default_factory=dict)
    moved: dict[str, Array] = field(default_factory=dict)
    saved: dict[int, dict[str, Any]] = field(default_factory=dict)  # a layer's forward errors its backward reads
    loss_error: float = 0.0

    @property
    def u(self) -> float:
        return OPERATION * unit(self.case)

    @property
    def last(self) -> int:
        return len(self.trace) - 1

    def rounding(self, value: Array, squares: Array, n: int | Array) -> Array:
        """The rounding of a sum of ``n`` terms: ``u sqrt(n) (|sum| + sqrt(sum of the terms'
        squares))``. An engine's partial sums round independently, so their errors add up as
        sqrt(n) of them; a partial sum is about the whole where the terms share a sign, about
        sqrt(sum of squares) where they cancel. Measured on NumPy's float32 products (n from 1 to
        16384, terms of either sign or one): at most 1.3 u sqrt(n) (|sum| + sqrt(squares)) with u
        the unit roundoff, where this takes twice that (:data:`OPERATION`)."""
        return self.u * np.sqrt(n) * (np.abs(value) + np.sqrt(squares))

    def sum_rounding(self, terms: Array, axes: tuple[int, ...]) -> Array:
        """:meth:`rounding` of ``terms`` summed over ``axes`` (kept, as size 1), and what a sum
        accumulated term by term (NumPy's over any axis but the last) rounds alike at each term,
        which adds up in magnitude: a term that repeats (m equal terms count as m, not sqrt(m);
        measured: 420 u var for a float32 variance over 1600 values, three quarters of them a
        ReLU's zeros, where the square-root law alone gives 80), and terms that differ by less
        than the partial sum's ulp, whose low bits are all dropped alike (:func:`_truncated`)."""
        n = int(np.prod([terms.shape[k] for k in axes]))
        value, squares = terms.sum(axis=axes, keepdims=True), (terms**2).sum(axis=axes, keepdims=True)
        rounding = self.rounding(value, squares, n) + self.rounding(value, squares, _repeats(terms, axes) ** 2)
        if terms.ndim - 1 in axes:  # NumPy adds along the last axis pairwise
            return rounding
        return rounding + self.u * _truncated(terms, axes, unit(self.case))

    def param(self, i: int, name: str) -> Flow | None:
        """A parameter as the engine holds it; how far it may differ from the reference's is the
        same for every sample (shared)."""
        key = f"layers.{i}.{name}"
        if key not in self.params:
            return None
        value = self.params[key]
        return Flow(value, np.zeros(value.shape), np.broadcast_to(self.held.get(key, 0.0), value.shape))

    def wide_of(self, i: int, name: str) -> Array | None:
        return None if self.wide is None else getattr(self.wide[i], name)

    def exact(self, value: Array, wide_value: Array | None, propagated: Array) -> Array:
        """Where a value the engine computed is exact: the same in the wider type, and nothing it
        was computed from carries an error."""
        if wide_value is None:
            return np.zeros(np.shape(value), dtype=bool)
        return (np.asarray(wide_value) == value) & (np.asarray(propagated) == 0)

    def gradient(self, i: int, name: str, field_name: str, error: Array) -> None:
        """dL/dp as the engine's trace keeps it in ``field_name``, and how far rounding can move it."""
        self.grads[f"layers.{i}.{name}"] = _f64(getattr(self.trace[i], field_name))
        self.errors[f"layers.{i}.{name}"] = error

    # -- the loss ----------------------------------------------------------------------------

    def loss(self, output: Flow) -> Flow:
        """The loss and its gradient, both moved by the output's error, each rounded once more;
        the error of the loss is kept, the gradient's returned (dL/dZ of the last layer for a loss
        on the logits, else dL/dA). A gradient through a softmax (the categorical losses) is moved
        by the softmax Jacobian's magnitudes: probing at z + e, all moved alike, would show none."""
        case, u, last = self.case, self.u, self.last
        loss = LOSSES[case.loss]
        targets = case.targets if np.issubdtype(case.targets.dtype, np.integer) else case.targets.astype(np.float64)
        y = Flow(_f64(self.trace[last].Z), *self.saved[last]["z"]) if loss.on_logits else output
        field_name = "dZ" if loss.on_logits else "dA"
        gradient = lambda at: losses.gradient(loss, at, targets, case.reduction, case.scale, **case.loss_params)  # noqa: E731
        d_y = _f64(getattr(self.trace[last], field_name))
        factor = abs(losses.factor(loss, y.value, case.reduction, case.scale))
        terms = loss.terms(y.value, targets, **case.loss_params)
        own = _TERMS_FROM.get(case.loss, lambda y, t, terms: np.abs(terms))(y.value, targets, terms)
        reduced = self.rounding(terms.sum(), (terms**2).sum(), terms.size) + u * own.sum()
        moved = np.abs(d_y) * y.error
        self.loss_error = float(_through(moved.sum(), (moved**2).sum()) + np.sum(np.abs(d_y) * y.shared) + reduced * factor)
        probed = np.abs(gradient(y.value + y.total) - gradient(y.value - y.total)) / 2
        error, shared = _split(probed, y)
        if case.loss in _PROBABILITIES:  # the probabilities' own rounding, before the targets are taken away
            p, weight = _f64(self.trace[last].A), _PROBABILITIES[case.loss](targets) * factor
            if loss.per_sample:  # through the softmax
                error = np.maximum(error, _softmax_moved(p, y.error) * weight)
                shared = np.maximum(shared, _softmax_moved(p, y.shared) * weight)
            error = error + u * np.abs(p) * weight
        exact = self.exact(d_y, self.wide_of(last, field_name), probed)
        return Flow(d_y, np.where(exact, 0.0, error + u * np.abs(d_y)), np.where(exact, 0.0, shared))


# A loss on the logits, whose gradient is a probability times a weight less the targets:
# p sum(t) - t (categorical), p - onehot(t) (sparse), sigmoid(z) - t (binary). p rounds before t
# is taken away, so its rounding counts in proportion to p, not to the gradient.
_PROBABILITIES: dict[str, Callable[[Array], Array | float]] = {
    "categorical_crossentropy": lambda t: np.abs(t.sum(axis=-1, keepdims=True)),
    "sparse_categorical_crossentropy": lambda t: 1.0,
    "binary_crossentropy": lambda t: 1.0,
}


# What a loss's terms are computed from, in magnitude, where it is more than the term: a
# cross-entropy's log(sum exp(z - max)) is a log of at least 1, rounded as such (a confident
# -log p of 5e-4 rounds by u, not by u 5e-4); binary cross-entropy subtracts z t from max(z, 0).
_TERMS_FROM: dict[str, Callable[[Array, Array, Array], Array]] = {
    "categorical_crossentropy": lambda z, t, terms: np.abs(terms) + np.abs(t).sum(axis=-1) * (1 + np.abs(z).max(axis=-1)),
    "sparse_categorical_crossentropy": lambda z, t, terms: np.abs(terms) + 1 + np.abs(z).max(axis=-1),
    "binary_crossentropy": lambda z, t, terms: np.abs(terms) + np.maximum(z, 0) + np.abs(z * t),
}


def _through(magnitude: Array, squares: Array) -> Array:
    """Independent errors of several terms reaching one sum: at most their magnitudes added, and
    as they have independent signs, about their root sum of squares: the smaller is taken. Added
    in magnitude, they would grow by sqrt(n) a layer, and nothing of a deep network would be
    compared."""
    return np.minimum(magnitude, np.sqrt(squares))


def _summed(error: Array, shared: Array, axes: tuple[int, ...], batch: bool) -> Errors:
    """The error of a sum over ``axes`` of terms with these errors: the independent parts add as a
    root sum of squares; the shared parts too across features (each feature's its own), in
    magnitude over the batch (``batch``), where they may all have one sign. A sum over the batch
    is itself one value for every sample: shared."""
    independent = _through(error.sum(axis=axes, keepdims=True), (error**2).sum(axis=axes, keepdims=True))
    if batch:
        return np.zeros(independent.shape), independent + shared.sum(axis=axes, keepdims=True)
    return independent, _through(shared.sum(axis=axes, keepdims=True), (shared**2).sum(axis=axes, keepdims=True))


def _split(moved: Array, by: Flow) -> Errors:
    """A move caused by the errors of ``by``, parted as they are."""
    total = by.total
    independent = np.divide(by.error, total, out=np.ones(np.shape(total)), where=total > 0)
    return moved * independent, moved * (1 - independent)


def _softmax_moved(a: Array, e_z: Array) -> Array:
    """How far softmax moves for errors e_z of its inputs: the Jacobian a (e - sum(a e)) in magnitudes."""
    return np.abs(a) * (e_z + (np.abs(a) * e_z).sum(axis=-1, keepdims=True))


class Rule(NamedTuple):
    """A layer kind's error rule: ``forward(walk, i, x) -> errors of A_i`` from its input x;
    ``backward(walk, i, x, d) -> errors of dL/dA_{i-1}`` from d = dL/dA_i (dL/dZ_i for the last
    layer under a loss on the logits), filling the layer's gradients and their errors."""

    forward: Callable[[_Walk, int, Flow], Errors]
    backward: Callable[[_Walk, int, Flow, Flow], Errors]


# -- dense and conv2d: sums of products -----------------------------------------------------------


def _product_forward(walk: _Walk, i: int, rows: Flow, kernel: Flow, z: Array) -> Errors:
    """Z = rows @ K + b, each element a sum of (inputs + 1) terms: its rounding, and the errors
    of rows, K and b through the product (K's and b's, held, shared by every sample); none where
    the sum is exact in any order and nothing it takes carries an error."""
    bias = walk.param(i, "bias")
    b = None if bias is None else bias.value
    abs_k, k2 = np.abs(kernel.value), kernel.value**2
    error = _through(rows.error @ abs_k, rows.error**2 @ k2)
    shared = _through(
        rows.shared @ abs_k + np.abs(rows.value) @ kernel.shared, rows.shared**2 @ k2 + rows.value**2 @ kernel.shared**2
    )
    shared = shared + (0.0 if bias is None else bias.shared)
    rounding = walk.rounding(z, rows.value**2 @ k2 + (0.0 if b is None else b**2), rows.value.shape[1] + (b is not None))
    exact = _exact_sums(rows.value, kernel.value, walk.case, b) & (error + shared == 0)
    return np.where(exact, 0.0, rounding + error), np.where(exact, 0.0, shared)


def _activation_forward(walk: _Walk, i: int, z_errors: Errors) -> Errors:
    """A = f(Z): Z's error through f (f taken at Z moved either way; softmax by its Jacobian),
    and f's own rounding."""
    layer, trace = walk.case.layers[i], walk.trace[i]
    z, a = _f64(trace.Z), _f64(trace.A)
    z_flow = Flow(z, *z_errors)
    act = ACTIVATIONS[layer.activation]
    moved = [act.forward(z + s * z_flow.total, layer.alpha) for s in (1, -1)]
    error, shared = _split(np.abs(moved[0] - moved[1]) / 2, z_flow)
    if not act.elementwise:
        error, shared = np.maximum(error, _softmax_moved(a, z_flow.error)), np.maximum(shared, _softmax_moved(a, z_flow.shared))
        error = error + walk.u * np.abs(a)  # exp, its sum, the division
    exact = walk.exact(a, walk.wide_of(i, "A"), z_flow.total)
    found = np.where(exact, 0.0, error + unit(walk.case) * np.abs(a)), np.where(exact, 0.0, shared)  # f within an ulp
    walk.saved[i] = {"z": z_errors, "a": found}
    return found


def _d_z(walk: _Walk, i: int, d: Flow) -> Flow:
    """dZ from dA through the activation (or the loss's dL/dZ itself, on the logits): dA's error
    through the derivative, and the derivative's own, taken at Z and A moved by their errors."""
    layer, trace = walk.case.layers[i], walk.trace[i]
    if i == walk.last and LOSSES[walk.case.loss].on_logits:
        return d
    act = ACTIVATIONS[layer.activation]
    z, a, d_z = _f64(trace.Z), _f64(trace.A), _f64(trace.dZ)
    z_flow, a_flow = Flow(z, *walk.saved[i]["z"]), Flow(a, *walk.saved[i]["a"])
    moved = np.maximum(
        *[np.abs(act.backward(d.value, z + s * z_flow.total, a + s * a_flow.total, layer.alpha) - d_z) for s in (1, -1)]
    )
    moved_error, moved_shared = _split(moved, Flow(z, z_flow.error + a_flow.error, z_flow.shared + a_flow.shared))
    if act.elementwise:
        slope = np.abs(act.backward(np.ones_like(d.value), z, a, layer.alpha))
        error, shared = d.error * slope, d.shared * slope
    else:
        error, shared = _softmax_moved(a, d.error), _softmax_moved(a, d.shared)
    exact = walk.exact(d_z, walk.wide_of(i, "dZ"), error + shared + moved)
    return Flow(
        d_z, np.where(exact, 0.0, error + moved_error + walk.u * np.abs(d_z)), np.where(exact, 0.0, shared + moved_shared)
    )


def _product_gradients(walk: _Walk, i: int, rows: Flow, d_z: Flow) -> None:
    """dK = rows.T @ dZ and db = dZ summed over the rows (the batch; for conv2d, every output
    position too): the independent errors of the terms add as a root sum of squares, the shared
    ones in magnitude; and the sums' rounding."""
    case, abs_dz = walk.case, np.abs(d_z.value)
    kernel = walk.params[f"layers.{i}.kernel"]
    d_kernel = _f64(walk.trace[i].dW).reshape(-1, kernel.shape[-1])
    abs_rows = np.abs(rows.value)
    independent = _through(
        rows.error.T @ abs_dz + abs_rows.T @ d_z.error, (rows.error**2).T @ abs_dz**2 + (abs_rows**2).T @ d_z.error**2
    )
    propagated = independent + rows.shared.T @ abs_dz + abs_rows.T @ d_z.shared
    rounding = walk.rounding(d_kernel, (abs_rows**2).T @ abs_dz**2, len(abs_dz))
    exact = _exact_sums(rows.value.T, d_z.value, case) & (propagated == 0)
    walk.gradient(i, "kernel", "dW", np.where(exact, 0.0, rounding + propagated).reshape(kernel.shape))
    if walk.param(i, "bias") is not None:
        independent, shared = _summed(d_z.error, d_z.shared, (0,), batch=True)
        propagated = (independent + shared)[0]
        rounding = walk.sum_rounding(d_z.value, (0,))[0]
        exact = _exact_sums(np.ones((1, len(abs_dz))), d_z.value, case)[0] & (propagated == 0)
        walk.gradient(i, "bias", "db", np.where(exact, 0.0, rounding + propagated))


def _product_input(d_z: Flow, kernel: Flow) -> tuple[Array, Array, Array, Array, Array, Array]:
    """d rows = dZ @ K.T: its value, its terms' squares, and the magnitudes and squares of its
    independent and shared errors through the product (as :func:`_through` takes them)."""
    abs_k, k2 = np.abs(kernel.value).T, kernel.value.T**2
    abs_dz = np.abs(d_z.value)
    return (
        d_z.value @ kernel.value.T,
        abs_dz**2 @ k2,
        d_z.error @ abs_k,
        d_z.error**2 @ k2,
        d_z.shared @ abs_k + abs_dz @ kernel.shared.T,
        d_z.shared**2 @ k2 + abs_dz**2 @ kernel.shared.T**2,
    )


def _dense_kernel(walk: _Walk, i: int) -> Flow:
    kernel = walk.param(i, "kernel")
    assert kernel is not None  # a dense or conv2d layer always has one
    as_rows = lambda a: a.reshape(-1, kernel.value.shape[-1])  # noqa: E731
    return Flow(as_rows(kernel.value), as_rows(kernel.error), as_rows(kernel.shared))


def _dense_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """Each Z sums its inputs' products and the bias."""
    return _activation_forward(walk, i, _product_forward(walk, i, x, _dense_kernel(walk, i), _f64(walk.trace[i].Z)))


def _dense_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    """dW and db sum over the batch; dA_prev sums each unit's dZ W."""
    kernel, d_z = _dense_kernel(walk, i), _d_z(walk, i, d)
    _product_gradients(walk, i, x, d_z)
    if i == 0:
        return NONE
    value, terms, error, error_squares, shared, shared_squares = _product_input(d_z, kernel)
    error, shared = _through(error, error_squares), _through(shared, shared_squares)
    exact = _exact_sums(d_z.value, kernel.value.T, walk.case) & (error + shared == 0)
    return np.where(exact, 0.0, walk.rounding(value, terms, d_z.value.shape[1]) + error), np.where(exact, 0.0, shared)


def _patches(layer: Layer, x: Array) -> Array:
    """im2col: each window of the padded input a row (batch out_h out_w, kh kw in); the padding is exact."""
    padded = np.pad(x, ((0, 0), *padding_of(layer), (0, 0)))
    windows = _windows(padded, layer, layer.out_shape[:2])
    return windows.reshape(-1, windows[0, 0, 0].size)


def _conv_rows(layer: Layer, x: Flow) -> Flow:
    return Flow(_patches(layer, x.value), _patches(layer, x.error), _patches(layer, x.shared))


def _conv_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """Each output sums kh kw in products and the bias: the dense rule on the im2col rows."""
    layer, z = walk.case.layers[i], _f64(walk.trace[i].Z)
    error, shared = _product_forward(walk, i, _conv_rows(layer, x), _dense_kernel(walk, i), z.reshape(-1, z.shape[-1]))
    return _activation_forward(walk, i, (error.reshape(z.shape), shared.reshape(z.shape)))


def _conv_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    """dK and db sum over batch out_h out_w, as the dense rule on the rows; an input's dA_prev
    sums, over the windows that read it, out products each: one sum of (windows x out) terms."""
    layer, case = walk.case.layers[i], walk.case
    d_z = _d_z(walk, i, d)
    as_rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    flat = Flow(as_rows(d_z.value), as_rows(d_z.error), as_rows(d_z.shared))
    kernel = _dense_kernel(walk, i)
    _product_gradients(walk, i, _conv_rows(layer, x), flat)
    if i == 0:
        return NONE
    (top, bottom), (left, right) = padding_of(layer)
    shape = x.value.shape
    padded = (shape[0], shape[1] + top + bottom, shape[2] + left + right, shape[3])
    windowed = (shape[0], *layer.out_shape[:2], *layer.window, shape[3])
    added = lambda rows: _gather(rows.reshape(windowed), layer, padded)  # noqa: E731
    value, terms, error, error_squares, shared, shared_squares = _product_input(flat, kernel)
    count = added(np.ones_like(value))
    inexact_rows = added((~_exact_sums(flat.value, kernel.value.T, case)).astype(np.float64))
    quantum = _gather(_lowest_bit(value).reshape(windowed).astype(np.float64), layer, padded, np.minimum, np.inf)
    error, shared = _through(added(error), added(error_squares)), _through(added(shared), added(shared_squares))
    exact = (inexact_rows == 0) & _fits(added(np.abs(value)), quantum, case) & (error + shared == 0)
    rounding = walk.rounding(added(value), added(terms), np.maximum(count, 1) * flat.value.shape[1])
    cut = lambda a: np.where(exact, 0.0, a)[:, top : top + shape[1], left : left + shape[2], :]  # noqa: E731
    return cut(rounding + error), cut(shared)


# -- pooling and flatten -------------------------------------------------------------------------


def _windows(x: Array, layer: Layer, out_hw: tuple[int, ...]) -> Array:
    """Every window of x (batch, H, W, c): (batch, out_h, out_w, kh, kw, c)."""
    (kh, kw), (sh, sw), (oh, ow) = layer.window, layer.strides, out_hw
    found = np.empty((x.shape[0], oh, ow, kh, kw, x.shape[3]), dtype=x.dtype)
    for r in range(kh):
        for c in range(kw):
            found[:, :, :, r, c, :] = x[:, r : r + sh * (oh - 1) + 1 : sh, c : c + sw * (ow - 1) + 1 : sw, :]
    return found


def _gather(values: Array, layer: Layer, shape: tuple[int, ...], combine: Callable = np.add, start: float = 0.0) -> Array:
    """Each window's values (batch, out_h, out_w, kh, kw, c) combined where they were read from
    an input of ``shape``: added (the adjoint of :func:`_windows`), or their minimum."""
    (kh, kw), (sh, sw) = layer.window, layer.strides
    oh, ow = values.shape[1:3]
    out = np.full(shape, start, dtype=np.float64)
    for r in range(kh):
        for c in range(kw):
            view = out[:, r : r + sh * (oh - 1) + 1 : sh, c : c + sw * (ow - 1) + 1 : sw, :]
            view[...] = combine(view, values[:, :, :, r, c, :])
    return out


def _pooled_back(walk: _Walk, layer: Layer, d_windows: Array, errors: Errors, shape: tuple[int, ...]) -> Errors:
    """The errors of dA_prev = each window's share added back where it was read: the shares'
    errors, and where several windows read an input, the addition's rounding unless the shares
    add exactly in any order."""
    windowed = (shape[0], *layer.out_shape[:2], *layer.window, shape[3])
    d_windows = d_windows.reshape(windowed)
    error, shared = (_gather(np.reshape(e, windowed), layer, shape) for e in errors)
    if layer.strides[0] >= layer.window[0] and layer.strides[1] >= layer.window[1]:
        return error, shared  # no input read twice: nothing is added
    count = _gather(np.ones_like(d_windows), layer, shape)
    value, squares = _gather(d_windows, layer, shape), _gather(d_windows**2, layer, shape)
    quantum = _gather(_lowest_bit(d_windows).astype(np.float64), layer, shape, np.minimum, np.inf)
    added = (count > 1) & ~_fits(_gather(np.abs(d_windows), layer, shape), quantum, walk.case)
    return error + np.where(added, walk.rounding(value, squares, count), 0.0), shared


def _pool_windows(layer: Layer, x: Array) -> Array:
    windows = _windows(x, layer, layer.out_shape[:2])
    return windows.reshape(*windows.shape[:3], -1, windows.shape[-1])


def _max_pool_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """A selects: |max(x + e) - max(x)| <= max(e) over the window; no rounding."""
    layer = walk.case.layers[i]
    return _pool_windows(layer, x.error).max(axis=3), _pool_windows(layer, x.shared).max(axis=3)


def _max_pool_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    """dA goes to one element of each window, its errors with it; an element as large as the
    selected one within their errors may be the one another engine selects: both may be off by
    the whole of dA. Exact ties (no error) go to the first, as every engine does."""
    if i == 0:
        return NONE
    layer = walk.case.layers[i]
    values, errors = _pool_windows(layer, x.value), _pool_windows(layer, x.total)
    first = values.argmax(axis=3)[:, :, :, None, :]
    top, top_error = np.take_along_axis(values, first, axis=3), np.take_along_axis(errors, first, axis=3)
    selected = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(selected, first, True, axis=3)
    gap = top - values
    rival = ~selected & (gap <= top_error + errors) & ~((gap == 0) & (top_error + errors == 0))
    contested = rival.any(axis=3, keepdims=True)
    share = np.abs(d.value)[:, :, :, None, :]
    other = np.where(selected, np.where(contested, share, 0.0), np.where(rival, share, 0.0))
    at = lambda e: np.where(selected, e[:, :, :, None, :], 0.0)  # noqa: E731
    return _pooled_back(walk, layer, at(d.value), (at(d.error) + other, at(d.shared)), x.value.shape)


def _avg_pool_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """A = (sum of the window) / size: the errors' mean, the sum's rounding and the division's;
    none where the sum is exact in any order, the size a power of two and nothing carries an error."""
    layer = walk.case.layers[i]
    values = _pool_windows(layer, x.value)
    size = values.shape[3]
    error, shared = _pool_windows(layer, x.error).sum(axis=3) / size, _pool_windows(layer, x.shared).sum(axis=3) / size
    rounding = walk.rounding(values.sum(axis=3), (values**2).sum(axis=3), size) / size + walk.u * np.abs(_f64(walk.trace[i].A))
    exact = _exact_total(values, 1.0, 3, walk.case)[:, :, :, 0, :] & _power_of_two(size) & (error + shared == 0)
    return np.where(exact, 0.0, rounding + error), np.where(exact, 0.0, shared)


def _avg_pool_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    """Each element of a window gets dA / size: dA's errors over size, the division's rounding,
    and the addition's where windows overlap."""
    if i == 0:
        return NONE
    layer = walk.case.layers[i]
    size = layer.window[0] * layer.window[1]
    share = d.value / size
    error = d.error / size + (0.0 if _power_of_two(size) else walk.u * np.abs(share))
    spread = lambda a: np.broadcast_to(a[:, :, :, None, None, :], (*a.shape[:3], *layer.window, a.shape[-1]))  # noqa: E731
    return _pooled_back(walk, layer, spread(share), (spread(error), spread(d.shared / size)), x.value.shape)


def _flatten_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """A reshape: exact."""
    return x.error.reshape(len(x.error), -1), x.shared.reshape(len(x.shared), -1)


def _flatten_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    return d.error.reshape(x.value.shape), d.shared.reshape(x.value.shape)


# -- batch_norm and layer_norm --------------------------------------------------------------------


def _norm_axes(layer: Layer, x: Array) -> tuple[int, ...]:
    """batch_norm: every axis but the last (per feature over the batch); layer_norm: the last."""
    return tuple(range(x.ndim - 1)) if layer.kind == "batch_norm" else (x.ndim - 1,)


def _statistic(layer: Layer, stat: Array, ndim: int) -> Array:
    """A statistic as the trace keeps it, shaped to broadcast against x."""
    stat = _f64(stat)
    return stat.reshape((1,) * (ndim - 1) + (-1,)) if layer.kind == "batch_norm" else stat[..., None]


def _norm_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """mean = sum x / n, var = sum (x - mean)^2 / n (n the count normalized together): their
    sums' rounding and x's errors (the mean's error moves var only to second order, as sum(x -
    mean) = 0); x^ = (x - mean) / s with s = sqrt(var + eps): the errors of x and of the mean over
    s, which is large where a feature barely varies, var's through s, and the rounding of what the
    engines subtract: (x - mean), or x/s - mean/s (TensorFlow's), so ``(|x| + |mean|) / s``;
    A = gamma x^ + beta. The statistics' errors move all that is normalized together alike: the
    layer's own sums over it take them with their sign (:func:`_norm_backward`); past the layer,
    passed through other samples' values, they count as independent. A batch_norm's moving
    statistics move by (1 - momentum) times them."""
    layer, trace, case, u = walk.case.layers[i], walk.trace[i], walk.case, walk.u
    axes, batch = _norm_axes(layer, x.value), layer.kind == "batch_norm"
    n = int(np.prod([x.value.shape[k] for k in axes]))
    mean, var = _statistic(layer, filled(trace.mean), x.value.ndim), _statistic(layer, filled(trace.var), x.value.ndim)
    s = np.sqrt(var + layer.epsilon)
    d, xhat, a = x.value - mean, _f64(trace.xhat), _f64(trace.A)
    pure = np.all(x.total == 0, axis=axes, keepdims=True)  # nothing came in with an error
    exact = pure & _exact_total(x.value, 1.0, axes, case) & _power_of_two(n)
    mean_error, mean_shared = _summed(x.error, x.shared, axes, batch)
    mean_error = np.where(exact, 0.0, (mean_error + mean_shared if batch else mean_error) / n)
    mean_error = np.where(exact, 0.0, mean_error + walk.sum_rounding(x.value, axes) / n + u * np.abs(mean))
    mean_shared = np.zeros(mean_error.shape) if batch else mean_shared / n
    var_error, var_shared = _summed(2 * np.abs(d) * x.error, 2 * np.abs(d) * x.shared, axes, batch)
    var_error = (var_error + var_shared if batch else var_error) / n
    var_error = var_error + walk.sum_rounding(d**2, axes) / n + 3 * u * var + mean_error**2  # d's, d^2's, the division's
    exact = exact & _exact_total(d, d, axes, case)
    var_error, var_shared = np.where(exact, 0.0, var_error), np.zeros(var_error.shape) if batch else var_shared / n
    magnitude = (np.abs(x.value) + np.abs(mean)) / s  # of what x^ is computed from
    stats = mean_error / s + np.abs(xhat) * var_error / (2 * s**2)  # alike for all normalized together
    own = x.error / s + u * (magnitude + np.abs(xhat))
    shared = (x.shared + mean_shared) / s + np.abs(xhat) * var_shared / (2 * s**2)
    exact = walk.exact(xhat, walk.wide_of(i, "xhat"), x.total + stats)
    own, stats, shared = (np.where(exact, 0.0, e) for e in (own, stats, shared))
    # Past the layer, a batch_norm's statistics move every sample alike (as an error of its beta
    # and gamma would): shared; a layer_norm's are each sample's own.
    independent, alike = (own, shared + stats) if batch else (own + stats, shared)
    gamma, beta = walk.param(i, "gamma"), walk.param(i, "beta")
    g, g_shared = (gamma.value, gamma.shared) if gamma is not None else (1.0, 0.0)
    a_error = np.abs(g) * independent + u * (np.abs(g) * magnitude + np.abs(a))
    a_shared = np.abs(g) * alike + np.abs(xhat) * g_shared + (beta.shared if beta is not None else 0.0)
    exact = walk.exact(a, walk.wide_of(i, "A"), a_shared + np.abs(g) * (x.total + stats))
    walk.saved[i] = {
        "own": own,
        "stats": (mean_error, var_error),
        "shared": shared,
        "scale": s,
        "magnitude": magnitude,
        "mean": mean,
    }
    if batch:
        _moving(walk, i, {"moving_mean": (mean, mean_error), "moving_variance": (var, var_error)})
    return np.where(exact, 0.0, a_error), np.where(exact, 0.0, a_shared)


def _moving(walk: _Walk, i: int, stats: dict[str, tuple[Array, Array]]) -> None:
    """moving <- m moving + (1 - m) stat changes by (1 - m)(stat - moving): the statistic's error
    and the moving value's own (held) times (1 - m), the rounding of the two products and their
    sum, and m's own in the case's dtype (0.99 is not a float32: 1 - m moves by u m / (1 - m))."""
    layer, u = walk.case.layers[i], walk.u
    m = layer.momentum
    for name, (stat, e_stat) in stats.items():
        moving = walk.param(i, name)
        if moving is None:
            continue
        stat, e_stat = stat.reshape(moving.value.shape), e_stat.reshape(moving.value.shape)
        new = m * moving.value + (1 - m) * stat
        rounding = u * (np.abs(m * moving.value) + np.abs((1 - m) * stat) + np.abs(new) + abs(m) * np.abs(stat - moving.value))
        walk.moved[f"layers.{i}.{name}"] = (1 - m) * (e_stat + moving.shared) + rounding


def _centred_rounding(walk: _Walk, a: Array, x: Array, saved: dict[str, Array], axes: tuple[int, ...]) -> Array:
    """The rounding of sum(a x^) over ``axes``, however an engine forms it: from x^, or as
    TensorFlow's gradients do, (sum(a x) - sum(a mean)) / s, whose two sums cancel where the
    mean is large against s."""
    mean, s = np.broadcast_to(saved["mean"], x.shape), saved["scale"]
    total = lambda v: np.abs(v.sum(axis=axes, keepdims=True))  # noqa: E731
    raw = (
        walk.sum_rounding(a * x / s, axes)
        + walk.sum_rounding(a * mean / s, axes)
        + walk.u * (total(a * x / s) + total(a * mean / s))
    )
    return walk.sum_rounding(a * (x - mean) / s, axes) + raw


def _with_x_hat(walk: _Walk, i: int, a: Flow, xhat: Array, axes: tuple[int, ...], normalized: bool) -> Errors:
    """The errors of sum(a x^) over ``axes``: a's and x^'s own; the statistics', which move
    every x^ normalized together alike, taken with their sign where the sum runs over those
    (``normalized``: x^ moves by -dmean / s - x^ dvar / (2 s^2), so the sum by dmean / s sum(a)
    and dvar / (2 s^2) sum(a x^)), else as independent; and the sum's rounding."""
    saved = walk.saved[i]
    (mean_error, var_error), s = saved["stats"], saved["scale"]
    own = saved["own"] if normalized else saved["own"] + mean_error / s + np.abs(xhat) * var_error / (2 * s**2)
    batch = normalized == (walk.case.layers[i].kind == "batch_norm")
    error, shared = _summed(
        a.error * np.abs(xhat) + np.abs(a.value) * own, a.shared * np.abs(xhat) + np.abs(a.value) * saved["shared"], axes, batch
    )
    if normalized:
        total = lambda v: np.abs(v.sum(axis=axes, keepdims=True))  # noqa: E731
        moved = mean_error / s * total(a.value) + var_error / (2 * s**2) * total(a.value * xhat)
        error, shared = (error, shared + moved) if batch else (error + moved, shared)
    return error, shared


def _norm_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    """dbeta = sum dA, dgamma = sum dA x^ (over every axis but the last), dx^ = dA gamma; then
    dx = (n dx^ - S1 - x^ S2) / (n s), S1 = sum dx^, S2 = sum dx^ x^ (over the axes normalized
    together): its numerator cancels, so its rounding is taken from the terms' magnitudes, and
    all of it is divided by s."""
    layer, trace, case, u = walk.case.layers[i], walk.trace[i], walk.case, walk.u
    saved = walk.saved[i]
    s, magnitude = saved["scale"], saved["magnitude"]
    xhat = _f64(trace.xhat)
    every = tuple(range(d.value.ndim - 1))
    batch = layer.kind == "batch_norm"
    flat = lambda a: a.reshape(a.shape[-1])  # noqa: E731  (a sum over the batch, kept as size 1)
    if walk.param(i, "beta") is not None:
        propagated = flat(sum(_summed(d.error, d.shared, every, batch=True)))
        exact = flat(_exact_total(d.value, 1.0, every, case)) & (propagated == 0)
        walk.gradient(i, "beta", "dbeta", np.where(exact, 0.0, propagated + flat(walk.sum_rounding(d.value, every))))
    gamma = walk.param(i, "gamma")
    if gamma is not None:
        propagated = flat(sum(_with_x_hat(walk, i, d, xhat, every, normalized=batch)))
        exact = flat(_exact_total(d.value, xhat, every, case)) & (propagated == 0)
        rounding = flat(_centred_rounding(walk, np.broadcast_to(d.value, x.value.shape), x.value, saved, every))
        walk.gradient(i, "gamma", "dgamma", np.where(exact, 0.0, propagated + rounding))
    if i == 0:
        return NONE
    g, g_shared = (gamma.value, gamma.shared) if gamma is not None else (1.0, 0.0)
    d_xhat = d.value * g
    abs_dxhat = np.abs(d_xhat)
    exact = walk.exact(d_xhat, walk.wide_of(i, "dxhat"), d.total * np.abs(g) + np.abs(d.value) * g_shared)
    dxhat = Flow(
        d_xhat,
        np.where(exact, 0.0, d.error * np.abs(g) + u * abs_dxhat),
        np.where(exact, 0.0, d.shared * np.abs(g) + np.abs(d.value) * g_shared),
    )
    axes = _norm_axes(layer, x.value)
    n = int(np.prod([x.value.shape[k] for k in axes]))
    s1, s2 = d_xhat.sum(axis=axes, keepdims=True), (d_xhat * xhat).sum(axis=axes, keepdims=True)
    s1_error, s1_shared = _summed(dxhat.error, dxhat.shared, axes, batch)
    s2_error, s2_shared = _with_x_hat(walk, i, dxhat, xhat, axes, normalized=True)
    s1_rounding = np.where(_exact_total(d_xhat, 1.0, axes, case), 0.0, walk.sum_rounding(d_xhat, axes))
    s2_rounding = _centred_rounding(walk, d_xhat, x.value, saved, axes)
    if batch:  # one value for every sample
        s1_shared, s2_shared = s1_shared + s1_rounding, s2_shared + s2_rounding
    else:
        s1_error, s2_error = s1_error + s1_rounding, s2_error + s2_rounding
    (mean_error, var_error), own, shared = saved["stats"], saved["own"], saved["shared"]
    stats = mean_error / s + np.abs(xhat) * var_error / (2 * s**2)
    xhat_error, xhat_shared = (own, shared + stats) if batch else (own + stats, shared)
    error = n * dxhat.error + s1_error + np.abs(xhat) * s2_error + np.abs(s2) * xhat_error
    error = error + 2 * u * (n * abs_dxhat + np.abs(s1) + magnitude * np.abs(s2))  # the numerator's own rounding
    shared = n * dxhat.shared + s1_shared + np.abs(xhat) * s2_shared + np.abs(s2) * xhat_shared
    d_x = np.abs(_f64(walk.trace[i - 1].dA))
    moved = var_error / (2 * s**2)  # s's relative error from var's: alike for all normalized together
    s_error, s_shared = (0.0, moved) if batch else (moved, 0.0)
    return error / (n * s) + d_x * (s_error + 2 * u), shared / (n * s) + d_x * s_shared


RULES: dict[str, Rule] = {
    "dense": Rule(_dense_forward, _dense_backward),
    "conv2d": Rule(_conv_forward, _conv_backward),
    "max_pool2d": Rule(_max_pool_forward, _max_pool_backward),
    "avg_pool2d": Rule(_avg_pool_forward, _avg_pool_backward),
    "flatten": Rule(_flatten_forward, _flatten_backward),
    "batch_norm": Rule(_norm_forward, _norm_backward),
    "layer_norm": Rule(_norm_forward, _norm_backward),
}


# -- traces and exact sums ------------------------------------------------------------------


def reference_trace(case: Case, params: dict[str, Array], dtype: type | None) -> list[LayerTrace] | None:
    """The NumPy reference's trace at ``params`` computed in ``dtype`` (None: none)."""
    if dtype is None:
        return None
    from ..reference import engine as reference

    targets = case.targets if np.issubdtype(case.targets.dtype, np.integer) else case.targets.astype(dtype)
    at = dataclasses.replace(
        case.with_parameters({name: p.astype(dtype) for name, p in params.items()}),
        dtype=np.dtype(dtype),
        inputs=case.inputs.astype(dtype),
        targets=targets,
    )
    try:
        traces = reference.forward(at)
        reference.backward(at, traces)
    except (ValueError, FloatingPointError):  # an input the reference cannot take: no estimate
        return None
    return traces


def _gradients(traces: list[LayerTrace]) -> dict[str, Array]:
    from ..reference import engine as reference

    return reference.gradients(traces)


# -- exact sums ----------------------------------------------------------------------------------


def _exact_sums(x: np.ndarray, w: np.ndarray, case: Case, bias: np.ndarray | None = None) -> np.ndarray:
    """Where ``x @ w (+ bias)`` is exact in the case's dtype in whatever order an engine sums it:
    every term is a multiple of the smallest power of two dividing one of them, and the terms'
    magnitudes add up to less than 2^p times it (p the dtype's significand bits), so every product
    and every partial sum is representable. Too large to check (over 4e6 terms): nowhere."""
    rows, inner = x.shape
    cols = w.shape[1]
    if rows * inner * cols > 4_000_000:
        return np.zeros((rows, cols), dtype=bool)
    low = _lowest_bit(x)[:, :, None] + _lowest_bit(w)[None, :, :]  # each product's lowest set bit
    quantum = low.min(axis=1)
    if bias is not None:
        quantum = np.minimum(quantum, _lowest_bit(bias)[None, :])
    total = np.abs(x) @ np.abs(w) + (0.0 if bias is None else np.abs(bias))
    return _fits(total, quantum, case)


def _exact_total(a: Array, b: Array | float, axes: int | tuple[int, ...], case: Case) -> Array:
    """Where ``sum(a * b)`` over ``axes`` (kept, as size 1) is exact in any order, as :func:`_exact_sums`."""
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), np.shape(a))
    quantum = (_lowest_bit(a) + _lowest_bit(b)).min(axis=axes, keepdims=True)
    return _fits(np.abs(a * b).sum(axis=axes, keepdims=True), quantum, case)


def _fits(total: Array, quantum: Array, case: Case) -> Array:
    """Whether terms that are multiples of 2^quantum, adding up to ``total`` in magnitude, add exactly."""
    bits = np.finfo(case.dtype).nmant + 1
    limit = np.ldexp(1.0, np.clip(bits + np.nan_to_num(quantum, posinf=1023), -1074, 1023).astype(np.int64))
    return (total == 0) | (total < limit)


def _lowest_bit(v: np.ndarray) -> np.ndarray:
    """The exponent of each element's lowest set bit (v = odd * 2^that); a large number for 0, a
    term that adds nothing to a sum."""
    v = np.asarray(v, dtype=np.float64)
    mantissa, exponent = np.frexp(v)
    whole = np.abs(mantissa * 2.0**53).astype(np.int64)  # the 53-bit significand as an integer
    low = np.round(np.log2((whole & -whole).clip(min=1))).astype(np.int64)
    return np.where(v == 0, 10_000, exponent - 53 + low)


def _repeats(terms: Array, axes: tuple[int, ...]) -> Array:
    """Over the terms summed over ``axes`` (kept, as size 1), sqrt(sum of m^2) for each nonzero
    value that m > 1 of them share (adding 0 is exact)."""
    kept = [k for k in range(terms.ndim) if k not in axes]
    moved = np.moveaxis(terms, list(axes), list(range(len(kept), terms.ndim)))
    shape = moved.shape[: len(kept)]
    ordered = np.sort(moved.reshape(-1, int(np.prod(moved.shape[len(kept) :]))), axis=-1)
    groups, n = ordered.shape
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    runs = np.cumsum(starts, axis=1) - 1 + (n * np.arange(groups))[:, None]  # one id per run of equal values
    counts = np.bincount(runs.ravel(), weights=(ordered != 0).ravel().astype(np.float64), minlength=groups * n).reshape(groups, n)
    shared = np.sqrt(np.where(counts > 1, counts**2, 0.0).sum(axis=1))
    return np.expand_dims(shared.reshape(shape), tuple(axes))


def _truncated(terms: Array, axes: tuple[int, ...], unit: float) -> Array:
    """The rounding that adding terms one by one repeats alike: once the partial sum s_k = k
    mean is so large that the terms' spread is below its ulp (k > k0 = std / (unit |mean|)), the
    low bits of every term are dropped the same way, so the sum's error is up to unit sum(|s_k|)
    over k > k0: unit |mean| (n^2 - k0^2) / 2 (kept, as size 1). Measured: nearly equal float32
    values (1 + 1e-5 U(0, 1)) lose 25% of their spread in a mean over 256 of them."""
    n = int(np.prod([terms.shape[k] for k in axes]))
    mean = terms.mean(axis=axes, keepdims=True)
    spread = np.sqrt(((terms - mean) ** 2).mean(axis=axes, keepdims=True))
    start = np.clip(np.divide(spread, unit * np.abs(mean), out=np.full(mean.shape, float(n)), where=mean != 0), 0, n)
    return np.abs(mean) * (n**2 - start**2) / 2


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def wider(case: Case) -> type | None:
    """A floating type wider than the case's, to tell an exact result from a rounded one: float64
    for float32, the long double for float64 where it is wider (x86's 80-bit); else None, and no
    result is taken for exact."""
    if np.dtype(case.dtype) == np.float32:
        return np.float64
    return np.longdouble if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps else None


def unit(case: Case) -> float:
    return float(np.finfo(case.dtype).eps) / 2


def _f64(value: np.ndarray | None) -> np.ndarray:
    return np.asarray(filled(value), dtype=np.float64)
