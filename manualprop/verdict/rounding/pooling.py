"""The rules of max_pool2d, avg_pool2d and flatten, and the windows of an image (read, and
added back where they were read), which conv2d's rule shares: max_pool2d selects, passing its
input's error through, and may send the gradient to another element of a window that is as large
within the errors; avg_pool2d sums and divides; flatten is exact."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ...casefile.case import Layer
from .exact import _exact_total, _f64, _fits, _lowest_bit, _power_of_two
from .walk import NONE, Array, Errors, Flow, _Walk


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
