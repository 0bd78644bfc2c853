"""The oracle's own maths: a network's forward pass and loss, in 128-bit MPFR numbers.

Written from the definitions, sharing no line with the NumPy engine (``manualprop.reference``): a
second opinion. Arrays are NumPy object arrays of ``gmpy2.mpfr`` numbers, so ``@`` and ``+`` are
exact-to-rounding MPFR arithmetic with a unit roundoff of 2^-128 (about 2.9e-39), correctly
rounded at every operation. The layer kinds are in :mod:`manualprop.oracle.layers`::

    dense    Z = A_prev @ W + b           A = f(Z)            f applied to each element (softmax: per row)
    L = scale * sum_s T_s / count   (count: the number of terms for a mean, 1 for a sum)

with ``T_s`` the terms of sample s, summed over its outputs (y the output A, or the last Z for a
loss on the logits): ``(y - t)^2`` (mse), ``|y - t|`` (mae), ``0.5 e^2`` where ``|e| <= delta``
else ``delta (|e| - delta / 2)``, e = y - t (huber); on the logits z: ``-sum_j t_j log softmax(z)_j``
(categorical cross-entropy), ``-log softmax(z)_t`` with t a class index (the sparse one),
``-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z)))`` per element, written
``t log(1 + e^-z) + (1 - t) log(1 + e^z)`` (binary cross-entropy: MPFR's exponent range keeps
both exact to rounding at any z). No derivative appears anywhere: gradients come from
:mod:`manualprop.oracle.differences`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import gmpy2
import numpy as np

from ..concepts import ACTIVATIONS, LOSSES
from .layers import Conv2d, Dense, Flatten, Layer, Norm, Pool, same_padding

PRECISION = 128  # bits of mantissa
CONTEXT = gmpy2.context(precision=PRECISION)

_to_mpfr = np.frompyfunc(lambda x: gmpy2.mpfr(float(x)), 1, 1)
_to_float = np.frompyfunc(float, 1, 1)
_EXP = np.frompyfunc(gmpy2.exp, 1, 1)
_LOG = np.frompyfunc(gmpy2.log, 1, 1)
_LOG1P = np.frompyfunc(gmpy2.log1p, 1, 1)


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
    exps = _EXP(z - z.max(axis=-1, keepdims=True)).astype(object)
    return exps / exps.sum(axis=-1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """z_i - max z - log sum_j e^(z_j - max z), over the last axis."""
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - _LOG(_EXP(shifted).sum(axis=-1, keepdims=True))


ACTIVATION: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "linear": lambda z, alpha: z,
    "sigmoid": _each(lambda z, alpha: 1 / (1 + gmpy2.exp(-z))),
    "tanh": _each(lambda z, alpha: gmpy2.tanh(z)),
    "relu": _each(lambda z, alpha: z if z > 0 else 0 * z),
    "leaky_relu": _each(lambda z, alpha: z if z > 0 else gmpy2.mpfr(alpha) * z),
    "softmax": _softmax,
}


def _per_sample(terms: np.ndarray) -> np.ndarray:
    """Each sample's terms summed (over every axis but the first)."""
    return terms.reshape(terms.shape[0], -1).sum(axis=1)


def _huber(y: np.ndarray, t: np.ndarray, delta: float = 1.0) -> np.ndarray:
    d, half = gmpy2.mpfr(float(delta)), gmpy2.mpfr(0.5)
    return np.frompyfunc(lambda e: half * e * e if abs(e) <= d else d * (abs(e) - half * d), 1, 1)(y - t)


# The terms of each sample, summed over its outputs: y the network's output A (or the last Z for a
# loss on the logits), t the targets (class indices for the sparse loss), params the loss's own.
SAMPLE_TERMS: dict[str, Callable[..., np.ndarray]] = {
    "mse": lambda y, t: _per_sample((y - t) * (y - t)),
    "mae": lambda y, t: _per_sample(np.frompyfunc(abs, 1, 1)(y - t)),
    "categorical_crossentropy": lambda z, t: -_per_sample(t * _log_softmax(z)),
    "sparse_categorical_crossentropy": lambda z, t: -_log_softmax(z)[np.arange(z.shape[0]), t],
    "binary_crossentropy": lambda z, t: _per_sample(t * _LOG1P(_EXP(-z)) + (1 - t) * _LOG1P(_EXP(z))),
    "huber": lambda y, t, delta=1.0: _per_sample(_huber(y, t, delta)),
}


def _activation(name: str, alpha: float) -> Callable[[np.ndarray], np.ndarray]:
    """f(z) with the case's alpha."""
    f = ACTIVATION[name]
    return lambda z: f(z, alpha)


def _linear(kind: str) -> Callable:
    """dense or conv2d in MPFR: its kernel, bias and activation (with its alpha) from the case."""

    def build(layer) -> Dense:
        w, b = exact(layer.kernel), None if layer.bias is None else exact(layer.bias)
        activate = _activation(layer.activation, layer.alpha)
        elementwise = ACTIVATIONS[layer.activation].elementwise
        if kind == "dense":
            return Dense(w, b, activate, elementwise)
        (kh, kw), (sy, sx) = layer.window, layer.strides
        padding = (
            (same_padding(layer.in_shape[0], kh, sy), same_padding(layer.in_shape[1], kw, sx))
            if layer.padding == "same"
            else ((0, 0), (0, 0))
        )
        return Conv2d(w, b, activate, elementwise, layer.strides, padding, layer.out_shape[:2])

    return build


def _norm(layer) -> Norm:
    moving = {
        name: None if getattr(layer, name) is None else exact(getattr(layer, name)) for name in ("moving_mean", "moving_variance")
    }
    return Norm(
        exact(layer.gamma),
        exact(layer.beta),
        gmpy2.mpfr(float(layer.epsilon)),
        layer.kind == "batch_norm",
        gmpy2.mpfr(float(layer.momentum)),
        **moving,
    )


# Each case layer kind (manualprop.concepts.LAYER_TYPES) as the oracle builds it.
KINDS: dict[str, Callable[..., Layer]] = {
    "dense": _linear("dense"),
    "conv2d": _linear("conv2d"),
    "max_pool2d": lambda layer: Pool(True, layer.window, layer.strides, layer.out_shape[:2]),
    "avg_pool2d": lambda layer: Pool(False, layer.window, layer.strides, layer.out_shape[:2]),
    "flatten": lambda layer: Flatten(),
    "batch_norm": _norm,
    "layer_norm": _norm,
}


@dataclass
class Network:
    """The case's network, inputs and targets in MPFR, and the loss as the case defines it."""

    layers: list[Layer]
    inputs: np.ndarray
    targets: np.ndarray  # MPFR, or class indices (int) for a sparse loss
    loss: str
    reduction: str
    scale: float
    loss_params: dict[str, float]

    @classmethod
    def of(cls, case) -> Network:
        layers = [KINDS[layer.kind](layer) for layer in case.layers]
        targets = np.asarray(case.targets) if LOSSES[case.loss].class_indices else exact(case.targets)
        return cls(layers, exact(case.inputs), targets, case.loss, case.reduction, case.scale, dict(case.loss_params))

    @property
    def on_logits(self) -> bool:
        """Whether the loss takes the last layer's Z (the cross-entropies) rather than its A."""
        return LOSSES[self.loss].on_logits

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable arrays by name (``layers.<i>.kernel``, ``.bias``, ``.gamma``, ``.beta``)."""
        return {f"layers.{i}.{name}": value for i, layer in enumerate(self.layers) for name, value in layer.parameters().items()}

    def with_parameters(self, params: dict[str, np.ndarray]) -> Network:
        """The same network with other parameter values in MPFR, by name (kernels (in, out))."""
        layers = [
            layer.with_values({name: params[f"layers.{i}.{name}"] for name in layer.trained if f"layers.{i}.{name}" in params})
            for i, layer in enumerate(self.layers)
        ]
        return replace(self, layers=layers)

    def moving(self) -> dict[str, tuple[np.ndarray, gmpy2.mpfr]]:
        """batch_norm's state by name (``layers.<i>.moving_mean``, ``.moving_variance``), each with its momentum."""
        found = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Norm) and layer.over_batch and layer.momentum is not None:
                for name in ("moving_mean", "moving_variance"):
                    value = getattr(layer, name)
                    if value is not None:
                        found[f"layers.{i}.{name}"] = (value, layer.momentum)
        return found

    def factor(self) -> gmpy2.mpfr:
        """scale / count for a mean (count: every element, or every sample for cross-entropy), else scale."""
        count = self.targets.size if LOSSES[self.loss].per == "element" else self.targets.shape[0]  # what a mean divides by
        return gmpy2.mpfr(self.scale) / (count if self.reduction == "mean" else 1)

    def forward(self) -> list[dict[str, np.ndarray]]:
        """The trace fields of every layer (Z, A, mean, ...), input side first."""
        out, a = [], self.inputs
        for layer in self.layers:
            fields = layer.forward(a)
            a = fields["A"]
            out.append(fields)
        return out

    def loss_input(self, last: dict[str, np.ndarray]) -> np.ndarray:
        """What the loss reads from the last layer's fields: Z for a loss on the logits, else A."""
        return last["Z"] if self.on_logits else last["A"]

    def output_from(self, start: int, a: np.ndarray) -> np.ndarray:
        """The loss's input (the last Z on the logits, else the last A) when layer ``start``
        receives ``a`` (samples along the first axis); ``start`` past the last layer: ``a`` is its A."""
        for layer in self.layers[start:-1]:
            a = layer.apply(a)
        if start >= len(self.layers):
            if self.on_logits:
                raise ValueError(f"the {self.loss} loss reads the last layer's Z, not its A")
            return a
        last = self.layers[-1]
        if self.on_logits:
            if not isinstance(last, Dense):
                raise ValueError(f"the {self.loss} loss reads the logits of a dense or conv2d last layer, found {last.kind}")
            return last.linear(a)
        return last.apply(a)

    def from_z(self, i: int, z: np.ndarray) -> np.ndarray:
        """The loss's input when layer ``i`` (dense or conv2d) has pre-activation ``z``."""
        layer = self.layers[i]
        if not isinstance(layer, Dense):
            raise ValueError(f"layer {i} ({layer.kind}) has no Z")
        if i == len(self.layers) - 1 and self.on_logits:
            return z
        return self.output_from(i + 1, layer.activate(z))

    def sample_losses(self, output: np.ndarray, rows: slice | int = slice(None)) -> np.ndarray:
        """scale / count * T_s for the samples ``rows`` whose loss input is given."""
        return SAMPLE_TERMS[self.loss](output, self.targets[rows], **self.loss_params) * self.factor()

    def loss_of(self, output: np.ndarray) -> gmpy2.mpfr:
        """The loss L of the whole batch from its loss input."""
        return self.sample_losses(output).sum()
