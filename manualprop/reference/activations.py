"""Activations: each a forward function and its backward, in one registry.

An activation is a pair ``(forward, backward)``:

* ``forward(z, alpha) -> a`` computes ``A = f(Z)``;
* ``backward(dA, z, a, alpha) -> dZ`` computes ``dL/dZ`` from ``dL/dA``. It receives the
  forward output ``a`` as well, so sigmoid and tanh differentiate from it.

Element-wise activations are built from ``f`` and ``f'`` by :func:`elementwise`, which gives
``dZ = dA * f'(Z)``. Softmax is not element-wise: its backward is the full Jacobian-vector
product ``dZ = A * (dA - sum(dA * A))`` per sample, never only the Jacobian's diagonal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Array = np.ndarray


class Activation(NamedTuple):
    forward: Callable[[Array, float], Array]
    backward: Callable[[Array, Array, Array, float], Array]
    elementwise: bool


def elementwise(f: Callable[[Array, float], Array], df: Callable[[Array, Array, float], Array]) -> Activation:
    """Build an activation from f(z) and f'(z), the derivative given z and a = f(z)."""

    def backward(dA: Array, z: Array, a: Array, alpha: float) -> Array:
        return dA * df(z, a, alpha)

    return Activation(f, backward, True)


def _sigmoid(z: Array, alpha: float) -> Array:
    # exp of -|z| only, so neither branch overflows.
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def _softmax(z: Array, alpha: float) -> Array:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _softmax_backward(dA: Array, z: Array, a: Array, alpha: float) -> Array:
    """dZ = A * (dA - sum_j dA_j A_j): the softmax Jacobian applied to dA, sample by sample."""
    return a * (dA - (dA * a).sum(axis=1, keepdims=True))


ACTIVATIONS: dict[str, Activation] = {
    # f(z) = z, f'(z) = 1
    "linear": elementwise(lambda z, alpha: z, lambda z, a, alpha: np.ones_like(z)),
    # f(z) = 1 / (1 + e^-z), f'(z) = a (1 - a)
    "sigmoid": elementwise(_sigmoid, lambda z, a, alpha: a * (1 - a)),
    # f(z) = tanh z, f'(z) = 1 - a^2
    "tanh": elementwise(lambda z, alpha: np.tanh(z), lambda z, a, alpha: 1 - a * a),
    # f(z) = max(0, z), f'(z) = 1 where z > 0 else 0 (0 at z = 0, as in PyTorch and TensorFlow)
    "relu": elementwise(
        lambda z, alpha: np.maximum(z, 0),
        lambda z, a, alpha: (z > 0).astype(z.dtype),
    ),
    # f(z) = z where z > 0 else alpha z, f'(z) = 1 where z > 0 else alpha (alpha at z = 0)
    "leaky_relu": elementwise(
        lambda z, alpha: np.where(z > 0, z, z * z.dtype.type(alpha)),
        lambda z, a, alpha: np.where(z > 0, z.dtype.type(1), z.dtype.type(alpha)),
    ),
    # f(z)_i = e^z_i / sum_j e^z_j over each sample's outputs
    "softmax": Activation(_softmax, _softmax_backward, False),
}


def get(identifier: str) -> Activation:
    """The activation registered under ``identifier``."""
    try:
        return ACTIVATIONS[identifier]
    except KeyError:
        raise ValueError(
            f"Could not interpret activation function identifier: {identifier!r}. Known: {', '.join(ACTIVATIONS)}"
        ) from None
