"""Layer kinds: each a forward pass and its backward, the trace between them (SPEC section 8).

A kind is ``(forward, backward)``:

* ``forward(layer, a_prev, trace, activations) -> a`` computes the layer's output from its input
  and keeps in ``trace`` (a :class:`~manualprop.engines.LayerTrace`) what the backward needs and
  what ``explain`` shows;
* ``backward(layer, a_prev, trace, activations) -> dA_prev`` reads ``trace.dA`` (or ``trace.dZ``
  when the loss gave it on the logits), fills the layer's gradients and returns dL/dA_prev.

Images are (batch, height, width, channels), as Keras keeps them; a conv2d kernel is
(kh, kw, in, out). Convolution is written as im2col: every window of the (padded) input becomes
one row of ``patches``, so ``Z = patches @ K`` is the dense layer's product, and the backward is
the dense one's, ``dK = patches.T @ dZ``, with ``dpatches = dZ @ K.T`` added back window by window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from ..casefile.case import Layer
from ..engines import LayerTrace, filled
from .activations import Activation

Array = np.ndarray


class Kind(NamedTuple):
    forward: Callable[[Layer, Array, LayerTrace, Mapping[str, Activation]], Array]
    backward: Callable[[Layer, Array, LayerTrace, Mapping[str, Activation]], Array]


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same": the output has ceil(size / stride) positions; the padding needed is
    split with the odd one at the end (bottom, right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def padding_of(layer: Layer) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) of a conv2d layer's input."""
    if layer.padding != "same":
        return (0, 0), (0, 0)
    height, width = layer.in_shape[:2]
    return (
        same_padding(height, layer.window[0], layer.strides[0]),
        same_padding(width, layer.window[1], layer.strides[1]),
    )


def _windows(x: Array, layer: Layer, out_hw: tuple[int, int]) -> Array:
    """Every window of x (batch, H, W, c): (batch, out_h, out_w, kh, kw, c)."""
    (kh, kw), (sh, sw), (oh, ow) = layer.window, layer.strides, out_hw
    found = np.empty((x.shape[0], oh, ow, kh, kw, x.shape[3]), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            found[:, :, :, i, j, :] = x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
    return found


def _unwindows(d_windows: Array, layer: Layer, shape: tuple[int, ...]) -> Array:
    """The adjoint of :func:`_windows`: each window's gradient added back where it was read."""
    (kh, kw), (sh, sw) = layer.window, layer.strides
    oh, ow = d_windows.shape[1:3]
    dx = np.zeros(shape, dtype=d_windows.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :] += d_windows[:, :, :, i, j, :]
    return dx


def _activate(layer: Layer, z: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    trace.Z = z
    trace.A = acts[layer.activation].forward(z, layer.alpha)
    return trace.A


def _d_z(layer: Layer, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    if trace.dZ is None:
        trace.dZ = acts[layer.activation].backward(filled(trace.dA), filled(trace.Z), filled(trace.A), layer.alpha)
    return trace.dZ


# -- dense ---------------------------------------------------------------------------------


def dense_forward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """Z = A_prev @ W + b, A = f(Z)."""
    z = a_prev @ filled(layer.kernel)
    if layer.bias is not None:
        z = z + layer.bias
    return _activate(layer, z, trace, acts)


def dense_backward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """dZ = f'(Z) applied to dA; dW = A_prev.T @ dZ; db = dZ summed over the batch; dA_prev = dZ @ W.T."""
    dz = _d_z(layer, trace, acts)
    trace.dW = a_prev.T @ dz
    trace.db = dz.sum(axis=0) if layer.bias is not None else None
    return dz @ filled(layer.kernel).T


# -- conv2d --------------------------------------------------------------------------------


def conv_forward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """Z = patches @ K (as (kh kw in, out)) + b, each patch a window of the padded input; A = f(Z)."""
    kernel = filled(layer.kernel)
    padded = np.pad(a_prev, ((0, 0), *padding_of(layer), (0, 0)))
    out_h, out_w = layer.out_shape[:2]
    patches = _windows(padded, layer, (out_h, out_w)).reshape(-1, kernel[..., 0].size)
    z = (patches @ kernel.reshape(-1, kernel.shape[-1])).reshape(a_prev.shape[0], out_h, out_w, kernel.shape[-1])
    if layer.bias is not None:
        z = z + layer.bias
    return _activate(layer, z, trace, acts)


def conv_backward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """dK = patches.T @ dZ; db = dZ summed over batch, height and width; dA_prev = dZ @ K.T, each
    patch's share added back over its window, the padding cut off."""
    kernel = filled(layer.kernel)
    dz = _d_z(layer, trace, acts)
    (top, bottom), (left, right) = padding_of(layer)
    padded = np.pad(a_prev, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows = _windows(padded, layer, dz.shape[1:3])
    dz_rows = dz.reshape(-1, dz.shape[-1])
    trace.dW = (windows.reshape(dz_rows.shape[0], -1).T @ dz_rows).reshape(kernel.shape)
    trace.db = dz.sum(axis=(0, 1, 2)) if layer.bias is not None else None
    d_windows = (dz_rows @ kernel.reshape(-1, kernel.shape[-1]).T).reshape(windows.shape)
    d_padded = _unwindows(d_windows, layer, padded.shape)
    return d_padded[:, top : top + a_prev.shape[1], left : left + a_prev.shape[2], :]


# -- pooling and flatten -------------------------------------------------------------------


def _pool_windows(layer: Layer, a_prev: Array) -> Array:
    """(batch, out_h, out_w, kh kw, c): each window's values, in row-major order within the window."""
    windows = _windows(a_prev, layer, (layer.out_shape[0], layer.out_shape[1]))
    return windows.reshape(*windows.shape[:3], -1, windows.shape[-1])


def max_pool_forward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """A = the largest value of each window, per channel."""
    trace.A = _pool_windows(layer, a_prev).max(axis=3)
    return trace.A


def max_pool_backward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """dA goes to the first largest value of each window (row-major), as PyTorch and TensorFlow do."""
    windows = _pool_windows(layer, a_prev)
    first = windows.argmax(axis=3)
    d_windows = np.zeros_like(windows)
    np.put_along_axis(d_windows, first[:, :, :, None, :], filled(trace.dA)[:, :, :, None, :], axis=3)
    shaped = d_windows.reshape(*windows.shape[:3], *layer.window, windows.shape[-1])
    return _unwindows(shaped, layer, a_prev.shape)


def avg_pool_forward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """A = the mean of each window, per channel."""
    trace.A = _pool_windows(layer, a_prev).mean(axis=3)
    return trace.A


def avg_pool_backward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """Each element of a window gets dA / (window size)."""
    size = layer.window[0] * layer.window[1]
    share = filled(trace.dA) / a_prev.dtype.type(size)
    d_windows = np.broadcast_to(share[:, :, :, None, None, :], (*share.shape[:3], *layer.window, share.shape[-1]))
    return _unwindows(d_windows, layer, a_prev.shape)


def flatten_forward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """(batch, h, w, c) -> (batch, h w c), in (h, w, c) order: NumPy's row-major reshape."""
    trace.A = a_prev.reshape(a_prev.shape[0], -1)
    return trace.A


def flatten_backward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    return filled(trace.dA).reshape(a_prev.shape)


# -- normalization -------------------------------------------------------------------------


def _axes(layer: Layer, x: Array) -> tuple[int, ...]:
    """batch_norm: every axis but the last (per feature over the batch); layer_norm: the last."""
    return tuple(range(x.ndim - 1)) if layer.kind == "batch_norm" else (x.ndim - 1,)


def _squeezed(stat: Array, axes: tuple[int, ...]) -> Array:
    """A statistic as the trace keeps it: batch_norm's (features,), layer_norm's one per sample (batch, ...)."""
    return stat.reshape(-1) if len(axes) > 1 or axes == (0,) else stat[..., 0]


def norm_forward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """mean and var (biased) over the layer's axes; x^ = (x - mean) / sqrt(var + eps); A = gamma x^ + beta."""
    axes = _axes(layer, a_prev)
    eps = a_prev.dtype.type(layer.epsilon)
    mean = a_prev.mean(axis=axes, keepdims=True)
    var = ((a_prev - mean) ** 2).mean(axis=axes, keepdims=True)
    trace.mean, trace.var = _squeezed(mean, axes), _squeezed(var, axes)
    trace.xhat = (a_prev - mean) / np.sqrt(var + eps)
    trace.A = filled(layer.gamma) * trace.xhat + filled(layer.beta)
    return trace.A


def norm_backward(layer: Layer, a_prev: Array, trace: LayerTrace, acts: Mapping[str, Activation]) -> Array:
    """dgamma = sum dA x^, dbeta = sum dA over every axis but the last; dx^ = dA gamma; then with
    n the count normalized together, dA_prev = (n dx^ - sum dx^ - x^ sum(dx^ x^)) / (n sqrt(var + eps))."""
    d_a, xhat = filled(trace.dA), filled(trace.xhat)
    every_but_last = tuple(range(d_a.ndim - 1))
    trace.dgamma = (d_a * xhat).sum(axis=every_but_last)
    trace.dbeta = d_a.sum(axis=every_but_last)
    trace.dxhat = d_a * filled(layer.gamma)
    axes = _axes(layer, a_prev)
    n = a_prev.dtype.type(np.prod([a_prev.shape[k] for k in axes]))
    var = np.expand_dims(filled(trace.var), axes) if layer.kind == "batch_norm" else filled(trace.var)[..., None]
    inv_std = 1 / np.sqrt(var + a_prev.dtype.type(layer.epsilon))
    sum_d = trace.dxhat.sum(axis=axes, keepdims=True)
    sum_dx = (trace.dxhat * xhat).sum(axis=axes, keepdims=True)
    return (n * trace.dxhat - sum_d - xhat * sum_dx) * inv_std / n


def moving_statistics(layer: Layer, trace: LayerTrace) -> dict[str, Array]:
    """batch_norm's state after a training step: moving <- momentum moving + (1 - momentum) stat,
    with the batch's biased variance (Keras's convention)."""
    if layer.kind != "batch_norm":
        return {}
    m = filled(layer.moving_mean).dtype.type(layer.momentum)
    one = m.dtype.type(1)
    return {
        "moving_mean": filled(layer.moving_mean) * m + filled(trace.mean) * (one - m),
        "moving_variance": filled(layer.moving_variance) * m + filled(trace.var) * (one - m),
    }


KINDS: dict[str, Kind] = {
    "dense": Kind(dense_forward, dense_backward),
    "conv2d": Kind(conv_forward, conv_backward),
    "max_pool2d": Kind(max_pool_forward, max_pool_backward),
    "avg_pool2d": Kind(avg_pool_forward, avg_pool_backward),
    "flatten": Kind(flatten_forward, flatten_backward),
    "batch_norm": Kind(norm_forward, norm_backward),
    "layer_norm": Kind(norm_forward, norm_backward),
}
