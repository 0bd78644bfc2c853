"""The rules of dense and conv2d, sums of products: Z = rows @ K + b, the activation and its
derivative, dK, db and the dA passed down; conv2d is the dense rule on the im2col windows."""

from __future__ import annotations

import numpy as np

from ...casefile.case import Layer
from ...reference.activations import ACTIVATIONS
from ...reference.layers import padding_of
from ...reference.losses import LOSSES
from .exact import _exact_sums, _f64, _fits, _lowest_bit, unit
from .pooling import _gather, _windows
from .walk import NONE, Array, Errors, Flow, _softmax_moved, _split, _summed, _through, _Walk


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
