"""Losses: each a per-term function and its gradient, in one registry.

A loss is ``(terms, grad, on_logits)``:

* ``terms(y, t)`` gives the terms the reduction runs over: one per element for MSE and MAE,
  one per sample for categorical cross-entropy;
* ``grad(y, t)`` gives d(sum of the terms)/dy, with the shape of ``y``;
* ``on_logits`` says that ``y`` is the last layer's pre-activation Z rather than its output A.

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
    terms: Callable[[Array, Array], Array]
    grad: Callable[[Array, Array], Array]
    on_logits: bool  # y is the last pre-activation Z; the terms are then one per sample


def _log_softmax(z: Array) -> Array:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _cce_grad(z: Array, t: Array) -> Array:
    p = np.exp(_log_softmax(z))
    return p * t.sum(axis=1, keepdims=True) - t


LOSSES: dict[str, Loss] = {
    # (y - t)^2 per element; d/dy = 2 (y - t)
    "mse": Loss(lambda y, t: (y - t) ** 2, lambda y, t: 2 * (y - t), False),
    # |y - t| per element; d/dy = sign(y - t), 0 where y = t (as PyTorch and TensorFlow)
    "mae": Loss(lambda y, t: np.abs(y - t), lambda y, t: np.sign(y - t), False),
    # -sum_j t_j log softmax(z)_j per sample; d/dz = softmax(z) sum_j t_j - t
    "categorical_crossentropy": Loss(lambda z, t: -(t * _log_softmax(z)).sum(axis=1), _cce_grad, True),
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
    terms_count = y.shape[0] if loss.on_logits else y.size
    return scale / (terms_count if reduction == "mean" else 1)


def gradient(loss: Loss, y: Array, t: Array, reduction: str, scale: float) -> Array:
    """dL/dy for L = reduce(terms(y, t)): the terms' gradient times scale, over N for a mean."""
    return loss.grad(y, t) * y.dtype.type(factor(loss, y, reduction, scale))
