"""The oracle's layer kinds (SPEC section 8), each a forward pass in MPFR object arrays, written
from the definitions and sharing no line with ``manualprop.reference``.

Images are (batch, height, width, channels). Every kind gives ``forward(a)``: its trace fields
by name (dense and conv2d: Z and A; pools and flatten: A; the norms: mean, var, xhat and A), and
``apply(a)``: its output A alone. No derivative appears: the oracle differentiates the loss by
central differences (:mod:`manualprop.oracle.differences`)::

    dense        Z = A_prev @ W + b                  W (in, out)
    conv2d       Z[n, y, x, o] = sum_(i, j, c) P[n, y sy + i, x sx + j, c] W[i, j, c, o] + b[o]
                 P the input padded with zeros (valid: none; same: TensorFlow's rule, the odd
                 row or column of the total padding at the bottom or right), W (kh, kw, in, out)
    max_pool2d   A[n, y, x, c] = the largest of A_prev[n, y sy + i, x sx + j, c] over the window
    avg_pool2d   A[n, y, x, c] = their mean
    flatten      A[n, :] = A_prev[n] read in (height, width, channels) order
    batch_norm   mean, var (biased) of each feature of the last axis over every other axis;
                 xhat = (x - mean) / sqrt(var + eps); A = gamma xhat + beta
    layer_norm   the same per sample and position, over the last axis only

Dense and conv2d share one shape: ``rows(a)`` lays out what W multiplies, one row per output
position (the input itself; every window of the padded input, in (i, j, c) order), so that
``Z = rows(a) @ W.reshape(-1, out) + b`` and a column of Z is one output unit or filter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import gmpy2
import numpy as np

Array = np.ndarray
_SQRT = np.frompyfunc(gmpy2.sqrt, 1, 1)


def zeros(shape: tuple[int, ...]) -> Array:
    return np.full(shape, gmpy2.mpfr(0), dtype=object)


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same": ceil(size / stride) outputs; the total padding that needs, its odd
    part at the end (bottom, right)."""
    outputs = (size + stride - 1) // stride
    total = max(0, (outputs - 1) * stride + window - size)
    return total // 2, total - total // 2


def _windows(a: Array, window: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int]) -> Array:
    """(batch, out_h, out_w, kh, kw, c): element (n, y, x, i, j, c) is a[n, y sy + i, x sx + j, c]."""
    (kh, kw), (sy, sx), (oh, ow) = window, strides, out_hw
    found = np.empty((a.shape[0], oh, ow, kh, kw, a.shape[3]), dtype=object)
    for i in range(kh):
        for j in range(kw):
            found[:, :, :, i, j, :] = a[:, i : i + sy * (oh - 1) + 1 : sy, j : j + sx * (ow - 1) + 1 : sx, :]
    return found


class _Trained:
    """What every kind shares: its trainable arrays by short name, ``trained`` mapping each to its attribute."""

    trained: ClassVar[dict[str, str]] = {}  # parameter name -> attribute

    def parameters(self) -> dict[str, Array]:
        """Its trainable arrays by short name (kernel, bias, gamma, beta); none for pools and flatten."""
        found = {name: getattr(self, attr) for name, attr in self.trained.items()}
        return {name: value for name, value in found.items() if value is not None}

    def with_values(self, values: dict[str, Array]):
        """The same layer with other parameter values, by short name."""
        changes = {attr: values[name] for name, attr in self.trained.items() if name in values}
        return replace(self, **changes) if changes else self  # type: ignore[type-var]  # every kind with parameters is a dataclass

    def apply(self, a: Array) -> Array:
        raise NotImplementedError

    def forward(self, a: Array) -> dict[str, Array]:
        """Its trace fields by name (pools and flatten: A)."""
        return {"A": self.apply(a)}


@dataclass
class Dense(_Trained):
    """``Z = A_prev @ W + b``, ``A = f(Z)``: ``W`` (in, out), ``b`` (out,) or None."""

    W: Array
    b: Array | None
    activate: Callable[[Array], Array]  # f, the case's activation with its alpha
    elementwise: bool  # f acts on each element alone (every activation but softmax)
    kind: ClassVar[str] = "dense"
    trained: ClassVar[dict[str, str]] = {"kernel": "W", "bias": "b"}

    def rows(self, a: Array) -> Array:
        """What W multiplies: one row per output position."""
        return a

    def z_shape(self, a: Array) -> tuple[int, ...]:
        return (*a.shape[:-1], self.W.shape[-1])

    def linear(self, a: Array) -> Array:
        z = (self.rows(a) @ self.W.reshape(-1, self.W.shape[-1])).reshape(self.z_shape(a))
        return z if self.b is None else z + self.b

    def forward(self, a: Array) -> dict[str, Array]:
        z = self.linear(a)
        return {"Z": z, "A": self.activate(z)}

    def apply(self, a: Array) -> Array:
        return self.activate(self.linear(a))


@dataclass
class Conv2d(Dense):
    """``Z[n, y, x, o] = sum_(i, j, c) P[n, y sy + i, x sx + j, c] W[i, j, c, o] + b[o]``,
    ``A = f(Z)``; ``W`` (kh, kw, in, out), P the input padded by ``padding`` ((top, bottom),
    (left, right)), ``out_hw`` the output's (height, width)."""

    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    out_hw: tuple[int, int] = (1, 1)
    kind: ClassVar[str] = "conv2d"

    def padded(self, a: Array) -> Array:
        (top, bottom), (left, right) = self.padding
        if not (top or bottom or left or right):
            return a
        out = zeros((a.shape[0], a.shape[1] + top + bottom, a.shape[2] + left + right, a.shape[3]))
        out[:, top : top + a.shape[1], left : left + a.shape[2], :] = a
        return out

    def rows(self, a: Array) -> Array:
        """Every window of the padded input, (batch out_h out_w, kh kw in), in (i, j, c) order as W
        reshaped to (kh kw in, out)."""
        windows = _windows(self.padded(a), self.W.shape[:2], self.strides, self.out_hw)
        return windows.reshape(-1, windows[0, 0, 0].size)

    def z_shape(self, a: Array) -> tuple[int, ...]:
        return (a.shape[0], *self.out_hw, self.W.shape[-1])


@dataclass
class Pool(_Trained):
    """max_pool2d (``A`` the largest of each window, per channel) or avg_pool2d (its mean); no padding."""

    largest: bool  # max, else average
    window: tuple[int, int]
    strides: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def kind(self) -> str:
        return "max_pool2d" if self.largest else "avg_pool2d"

    def apply(self, a: Array) -> Array:
        windows = _windows(a, self.window, self.strides, self.out_hw)
        out = windows[:, :, :, 0, 0, :]
        for i in range(self.window[0]):
            for j in range(self.window[1]):
                if i or j:
                    moved = windows[:, :, :, i, j, :]
                    out = np.maximum(out, moved) if self.largest else out + moved
        return out if self.largest else out / (self.window[0] * self.window[1])


class Flatten(_Trained):
    """``A[n, :]`` = ``A_prev[n]`` in (height, width, channels) order: a row-major reshape."""

    kind: ClassVar[str] = "flatten"

    def apply(self, a: Array) -> Array:
        return a.reshape(a.shape[0], -1)


@dataclass
class Norm(_Trained):
    """batch_norm (``over_batch``: each feature of the last axis over every other axis) or
    layer_norm (each sample and position over the last axis):
    ``xhat = (x - mean) / sqrt(var + eps)``, var biased, ``A = gamma xhat + beta``.

    batch_norm's ``moving_mean`` and ``moving_variance`` are state, not trained: the training
    forward pass never reads them, and the step moves them (``momentum``, Keras's convention)."""

    gamma: Array
    beta: Array
    epsilon: gmpy2.mpfr
    over_batch: bool
    momentum: gmpy2.mpfr | None = None
    moving_mean: Array | None = None
    moving_variance: Array | None = None
    trained: ClassVar[dict[str, str]] = {"gamma": "gamma", "beta": "beta"}

    @property
    def kind(self) -> str:
        return "batch_norm" if self.over_batch else "layer_norm"

    def axes(self, a: Array) -> tuple[int, ...]:
        return tuple(range(a.ndim - 1)) if self.over_batch else (a.ndim - 1,)

    def forward(self, a: Array) -> dict[str, Array]:
        axes = self.axes(a)
        count = int(np.prod([a.shape[k] for k in axes]))
        mean = a.sum(axis=axes, keepdims=True) / count
        centred = a - mean
        var = (centred * centred).sum(axis=axes, keepdims=True) / count
        xhat = centred / _SQRT(var + self.epsilon)
        kept = mean.reshape(-1) if self.over_batch else mean[..., 0]
        spread = var.reshape(-1) if self.over_batch else var[..., 0]
        return {"mean": kept, "var": spread, "xhat": xhat, "A": self.gamma * xhat + self.beta}

    def apply(self, a: Array) -> Array:
        return self.forward(a)["A"]


Layer = Dense | Pool | Flatten | Norm
