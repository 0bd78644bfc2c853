"""The oracle's own maths: a dense network's forward pass and loss, in 128-bit MPFR numbers.

Written from the definitions, sharing no line with the NumPy engine (``manualprop.reference.engine``,
``activations``, ``losses``): a second opinion. Arrays are NumPy object arrays of
``gmpy2.mpfr`` numbers, so ``@`` and ``+`` are exact-to-rounding MPFR arithmetic with a unit
roundoff of 2^-128 (about 2.9e-39), correctly rounded at every operation.

    Z = A_prev @ W + b           A = f(Z)            f applied to each element (softmax: per row)
    L = scale * sum_s T_s / count   (count: the number of terms for a mean, 1 for a sum)

with ``T_s`` the terms of sample s: ``sum_j (y - t)^2`` (mse), ``sum_j |y - t|`` (mae),
``-sum_j t_j log y_j`` with ``y = softmax(z)`` (categorical cross-entropy). No derivative appears
anywhere: gradients come from :mod:`manualprop.oracle.differences`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import gmpy2
import numpy as np

from ..concepts import LOSSES

PRECISION = 128  # bits of mantissa
CONTEXT = gmpy2.context(precision=PRECISION)

_to_mpfr = np.frompyfunc(lambda x: gmpy2.mpfr(float(x)), 1, 1)
_to_float = np.frompyfunc(float, 1, 1)


def exact(values: np.ndarray) -> np.ndarray:
    """The case's float32 or float64 numbers as MPFR numbers: every binary float converts exactly."""
    return _to_mpfr(np.asarray(values, dtype=np.float64)).astype(object)


def to_float64(values) -> np.ndarray:
    """MPFR numbers rounded to the nearest float64 (half an ulp: 2^-53 relative)."""
    return np.asarray(_to_float(np.asarray(values, dtype=object)), dtype=np.float64)


def _each(f: Callable) -> Callable[[np.ndarray, float], np.ndarray]:
    """An element-wise function of (z, alpha) over an object array."""
    apply = np.frompyfunc(f, 2, 1)
    return lambda z, alpha: apply(z, alpha).astype(object)


def _softmax(z: np.ndarray, alpha: float) -> np.ndarray:
    """e^(z_i - max z) / sum_j e^(z_j - max z), each row (sample) on its own."""
    exps = np.frompyfunc(gmpy2.exp, 1, 1)(z - z.max(axis=-1, keepdims=True)).astype(object)
    return exps / exps.sum(axis=-1, keepdims=True)


ACTIVATION: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "linear": lambda z, alpha: z,
    "sigmoid": _each(lambda z, alpha: 1 / (1 + gmpy2.exp(-z))),
    "tanh": _each(lambda z, alpha: gmpy2.tanh(z)),
    "relu": _each(lambda z, alpha: z if z > 0 else 0 * z),
    "leaky_relu": _each(lambda z, alpha: z if z > 0 else gmpy2.mpfr(alpha) * z),
    "softmax": _softmax,
}

# The terms of one sample, summed over its outputs: y the network's output A, t the targets.
SAMPLE_TERMS: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
    "mse": lambda y, t: ((y - t) * (y - t)).sum(axis=-1),
    "mae": lambda y, t: np.frompyfunc(abs, 1, 1)(y - t).sum(axis=-1),
    "categorical_crossentropy": lambda y, t: -(t * np.frompyfunc(gmpy2.log, 1, 1)(y)).sum(axis=-1),
}


@dataclass
class Dense:
    """One layer in MPFR numbers: ``W`` (in, out), ``b`` (out,) or None."""

    W: np.ndarray
    b: np.ndarray | None
    activation: str
    alpha: float

    def linear(self, a: np.ndarray) -> np.ndarray:
        z = a @ self.W
        return z if self.b is None else z + self.b

    def activate(self, z: np.ndarray) -> np.ndarray:
        return ACTIVATION[self.activation](z, self.alpha)


@dataclass
class Network:
    """The case's network, inputs and targets in MPFR, and the loss as the case defines it."""

    layers: list[Dense]
    inputs: np.ndarray
    targets: np.ndarray
    loss: str
    reduction: str
    scale: float

    @classmethod
    def of(cls, case) -> Network:
        layers = [
            Dense(exact(layer.kernel), None if layer.bias is None else exact(layer.bias), layer.activation, layer.alpha)
            for layer in case.layers
        ]
        return cls(layers, exact(case.inputs), exact(case.targets), case.loss, case.reduction, case.scale)

    def with_parameters(self, params: dict[str, np.ndarray]) -> Network:
        """The same network with other parameter values in MPFR, by name (kernels (in, out))."""
        layers = [
            replace(layer, W=params[f"layers.{i}.kernel"], b=params.get(f"layers.{i}.bias", layer.b))
            for i, layer in enumerate(self.layers)
        ]
        return replace(self, layers=layers)

    def factor(self) -> gmpy2.mpfr:
        """scale / count for a mean (count: every element, or every sample for cross-entropy), else scale."""
        count = self.targets.size if LOSSES[self.loss].per == "element" else self.targets.shape[0]  # what a mean divides by
        return gmpy2.mpfr(self.scale) / (count if self.reduction == "mean" else 1)

    def forward(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(Z, A) of every layer, input side first."""
        out, a = [], self.inputs
        for layer in self.layers:
            z = layer.linear(a)
            a = layer.activate(z)
            out.append((z, a))
        return out

    def output_from(self, start: int, a: np.ndarray) -> np.ndarray:
        """The network's output when layer ``start`` receives ``a`` (rows of samples)."""
        for layer in self.layers[start:]:
            a = layer.activate(layer.linear(a))
        return a

    def sample_losses(self, output: np.ndarray, rows: slice | int = slice(None)) -> np.ndarray:
        """scale / count * T_s for the samples ``rows`` whose outputs are given."""
        return SAMPLE_TERMS[self.loss](output, self.targets[rows]) * self.factor()

    def loss_of(self, output: np.ndarray) -> gmpy2.mpfr:
        """The loss L of the whole batch from the network's output."""
        return self.sample_losses(output).sum()
