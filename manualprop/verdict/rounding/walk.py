"""The walk of one step's rounding errors: what a value's error is (:class:`Flow`, its own and
the part every sample may share), what the rules share as they go (:class:`_Walk`: the rounding
of a sum, the parameters' held errors, where a value is exact, the loss and its gradient), how
errors add up through a sum (:func:`_through`, :func:`_summed`, :func:`_split`) and what a layer
kind's :class:`Rule` is. The rules themselves sit by kind beside this module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ...casefile.case import Case
from ...engines import LayerTrace
from ...reference import losses
from ...reference.losses import LOSSES
from .exact import _f64, _repeats, _truncated, unit

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
