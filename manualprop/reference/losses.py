"""Losses: each a per-term function and its gradient, in one registry.

A loss is ``(terms, grad, on_logits, per_sample)``:

* ``terms(y, t, **params)`` gives the terms the reduction runs over: one per element for MSE,
  MAE, binary cross-entropy and Huber, one per sample for the categorical cross-entropies;
  ``params`` are the loss's own (Huber's ``delta``);
* ``grad(y, t, **params)`` gives d(sum of the terms)/dy, with the shape of ``y``;
* ``on_logits`` says that ``y`` is the last layer's pre-activation Z rather than its output A
  (cross-entropies: the softmax or sigmoid is inside the loss, as in both frameworks).

Categorical cross-entropy is taken on the logits, as PyTorch's ``CrossEntropyLoss`` and Keras's
``from_logits`` path do: ``-sum_j t_j log softmax(z)_j``, whose gradient is
``softmax(z) * sum_j t_j - t`` (``p - t`` for one-hot targets). This is why a case with that loss
must end in a softmax layer. The reduced loss is ``scale * mean(terms)`` or ``scale * sum(terms)``
(see :func:`reduce` and :func:`gradient`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..concepts import LOSS_ALIASES

Array = np.ndarray


class Loss(NamedTuple):
    terms: Callable[..., Array]  # (y, t, **the loss's parameters) -> terms
    grad: Callable[..., Array]  # (y, t, **the loss's parameters) -> d(sum of the terms)/dy
    on_logits: bool  # y is the last pre-activation Z
    per_sample: bool = False  # one term per sample (cross-entropy over classes), else one per element


def _log_softmax(z: Array) -> Array:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _cce_grad(z: Array, t: Array) -> Array:
    p = np.exp(_log_softmax(z))
    return p * t.sum(axis=1, keepdims=True) - t


def _one_hot(t: Array, classes: int, dtype: np.dtype) -> Array:
    return np.eye(classes, dtype=dtype)[t]


def _bce_terms(z: Array, t: Array) -> Array:
    """-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))), written as max(z, 0) - z t + log(1 + e^-|z|)
    so that no exponential overflows."""
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def _sigmoid(z: Array) -> Array:
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _huber_terms(y: Array, t: Array, delta: float = 1.0) -> Array:
    e, d = y - t, y.dtype.type(delta)
    return np.where(np.abs(e) <= d, y.dtype.type(0.5) * e * e, d * (np.abs(e) - y.dtype.type(0.5) * d))


def _huber_grad(y: Array, t: Array, delta: float = 1.0) -> Array:
    d = y.dtype.type(delta)
    return np.clip(y - t, -d, d)


LOSSES: dict[str, Loss] = {
    # (y - t)^2 per element; d/dy = 2 (y - t)
    "mse": Loss(lambda y, t: (y - t) ** 2, lambda y, t: 2 * (y - t), False),
    # |y - t| per element; d/dy = sign(y - t), 0 where y = t (as PyTorch and TensorFlow)
    "mae": Loss(lambda y, t: np.abs(y - t), lambda y, t: np.sign(y - t), False),
    # -sum_j t_j log softmax(z)_j per sample; d/dz = softmax(z) sum_j t_j - t
    "categorical_crossentropy": Loss(lambda z, t: -(t * _log_softmax(z)).sum(axis=1), _cce_grad, True, True),
    # per element on the logits; d/dz = sigmoid(z) - t
    "binary_crossentropy": Loss(_bce_terms, lambda z, t: _sigmoid(z) - t, True),
    # categorical cross-entropy with class indices t, shape (batch,)
    "sparse_categorical_crossentropy": Loss(
        lambda z, t: -np.take_along_axis(_log_softmax(z), t[:, None], axis=1)[:, 0],
        lambda z, t: np.exp(_log_softmax(z)) - _one_hot(t, z.shape[1], z.dtype),
        True,
        True,
    ),
    # 0.5 e^2 where |e| <= delta, else delta (|e| - delta / 2); d/dy = e clipped to [-delta, delta]
    "huber": Loss(_huber_terms, _huber_grad, False),
}

ALIASES = LOSS_ALIASES  # declared in manualprop.concepts

REDUCTIONS = ("mean", "sum")


def get(identifier: str) -> Loss:
    """The loss registered under ``identifier`` (or one of its aliases)."""
    try:
        return LOSSES[ALIASES.get(identifier, identifier)]
    except KeyError:
        raise ValueError(
            f"Could not interpret loss identifier: {identifier!r}. Known: {', '.join([*LOSSES, *ALIASES])}"
        ) from None


def reduce(terms: Array, reduction: str, scale: float) -> Array:
    """L = scale * mean(terms) or scale * sum(terms)."""
    total = terms.mean() if reduction == "mean" else terms.sum()
    return total * terms.dtype.type(scale)


def factor(loss: Loss, y: Array, reduction: str, scale: float) -> float:
    """What the reduction multiplies the terms' gradient by: scale, over N for a mean."""
    terms_count = y.shape[0] if loss.per_sample else y.size
    return scale / (terms_count if reduction == "mean" else 1)


def gradient(loss: Loss, y: Array, t: Array, reduction: str, scale: float, **params: float) -> Array:
    """dL/dy for L = reduce(terms(y, t)): the terms' gradient times scale, over N for a mean."""
    return loss.grad(y, t, **params) * y.dtype.type(factor(loss, y, reduction, scale))
