"""Deliberately faulty engines, each the NumPy engine with one classic slip.

tests/test_diagnose.py registers them through the ``manualprop.engines`` entry point, as a
third-party package would, and checks that the harness blames each one, at the right layer and
quantity, with the help of the finite-difference oracle.
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from manualprop.engines import StepResult
from manualprop.reference import (
    activations,
    engine as reference_engine,
    layers,
    losses,
)
from manualprop.reference.activations import Activation
from manualprop.reference.engine import NumpyEngine
from manualprop.reference.losses import Loss


class WrongTanhDerivative(NumpyEngine):
    """tanh'(z) written as 1 - a instead of 1 - a^2."""

    name = "wrong-derivative"
    tanh = activations.ACTIVATIONS["tanh"]
    activations: Mapping[str, Activation] = {
        **activations.ACTIVATIONS,
        "tanh": activations.elementwise(tanh.forward, lambda z, a, alpha: 1 - a),
    }


class DroppedOneOverN(NumpyEngine):
    """The MSE gradient without its 1/N: a per-sample mean slip."""

    name = "dropped-1/N"
    mse = losses.LOSSES["mse"]
    losses: Mapping[str, Loss] = {**losses.LOSSES, "mse": losses.Loss(mse.terms, lambda y, t: 2 * (y - t) * y.shape[0], False)}


class TransposedKernel(NumpyEngine):
    """Loads the first kernel transposed, (out, in) where (in, out) belongs."""

    name = "transposed-kernel"

    def step(self, case):
        first = dataclasses.replace(case.layers[0], kernel=np.ascontiguousarray(case.layers[0].kernel.T))
        return super().step(dataclasses.replace(case, layers=(first, *case.layers[1:])))


class SummedLoss(NumpyEngine):
    """Sums the loss where the case averages it."""

    name = "summed-loss"

    def step(self, case):
        return super().step(dataclasses.replace(case, reduction="sum"))


class FlippedUpdate(NumpyEngine):
    """p + lr * g instead of p - lr * g."""

    name = "flipped-update"

    def step(self, case):
        result = super().step(case)
        return StepResult(result.loss, {k: -v for k, v in result.deltas.items()}, result.trace)


class WrongLeakySlope(NumpyEngine):
    """Uses PyTorch's default slope 0.01 whatever the case says."""

    name = "wrong-leaky-slope"

    def step(self, case):
        layers = tuple(
            dataclasses.replace(layer, alpha=0.01) if layer.activation == "leaky_relu" else layer for layer in case.layers
        )
        return super().step(dataclasses.replace(case, layers=layers))


ALL = [WrongTanhDerivative, DroppedOneOverN, TransposedKernel, SummedLoss, FlippedUpdate, WrongLeakySlope]


class TransposedDeltas(NumpyEngine):
    """Computes right, but reports its kernels' deltas in the (out, in) layout."""

    name = "transposed-deltas"

    def step(self, case):
        result = super().step(case)
        deltas = {k: (v.T.copy() if k.endswith("kernel") else v) for k, v in result.deltas.items()}
        return StepResult(result.loss, deltas, result.trace)


# -- the classic slips of porting conv and norm layers between frameworks (SPEC section 8) ---------


def _replaced(case, kind, **changes):
    """The case with every layer of ``kind`` changed by ``changes`` (each a function of the layer)."""
    changed = tuple(
        dataclasses.replace(layer, **{k: f(layer) for k, f in changes.items()}) if layer.kind == kind else layer
        for layer in case.layers
    )
    return dataclasses.replace(case, layers=changed)


class _SwapsLayerKind(NumpyEngine):
    """The NumPy engine with one layer kind's forward and backward swapped while it runs."""

    kind = ""
    swapped: layers.Kind

    def step(self, case):
        original = layers.KINDS[self.kind]
        layers.KINDS[self.kind] = self.swapped
        try:
            return super().step(case)
        finally:
            layers.KINDS[self.kind] = original


class ReshapedConvKernel(NumpyEngine):
    """Holds each conv kernel as PyTorch's (out, in, kh, kw) and reshapes it to (kh, kw, in, out)."""

    name = "reshaped-conv-kernel"

    def step(self, case):
        return super().step(
            _replaced(case, "conv2d", kernel=lambda layer: np.transpose(layer.kernel, (3, 2, 0, 1)).reshape(layer.kernel.shape))
        )


class SwappedKernelHeightWidth(NumpyEngine):
    """Reads each square conv kernel with its height and width swapped, K[j, i] for K[i, j]."""

    name = "swapped-kernel-hw"

    def step(self, case):
        return super().step(_replaced(case, "conv2d", kernel=_swap_height_width))


def _swap_height_width(layer):
    square = layer.window[0] == layer.window[1]
    return np.ascontiguousarray(np.swapaxes(layer.kernel, 0, 1)) if square else layer.kernel


def _flatten_chw(layer, a_prev, trace, acts):
    trace.A = np.transpose(a_prev, (0, 3, 1, 2)).reshape(a_prev.shape[0], -1)
    return trace.A


def _unflatten_chw(layer, a_prev, trace, acts):
    b, h, w, c = a_prev.shape
    return np.transpose(trace.dA.reshape(b, c, h, w), (0, 2, 3, 1))


class FlattenChannelsFirst(_SwapsLayerKind):
    """Flattens in (c, h, w) order, as an NCHW tensor does, where (h, w, c) belongs."""

    name = "flatten-chw"
    kind = "flatten"
    swapped = layers.Kind(_flatten_chw, _unflatten_chw)


def _top_left(layer):
    """The padding of "same" with the odd row or column at the top or left: ((top, bottom), (left, right))."""
    pads = []
    for size, window, stride in zip(layer.in_shape[:2], layer.window, layer.strides, strict=True):
        out = -(-size // stride)
        total = max((out - 1) * stride + window - size, 0)
        pads.append((total - total // 2, total // 2))
    return tuple(pads) if layer.padding == "same" else ((0, 0), (0, 0))


def _padded_conv(layer, a_prev):
    padded = np.pad(a_prev, ((0, 0), *_top_left(layer), (0, 0)))
    return dataclasses.replace(layer, padding="valid", in_shape=padded.shape[1:]), padded


def _conv_top_left_forward(layer, a_prev, trace, acts):
    return layers.conv_forward(*_padded_conv(layer, a_prev), trace, acts)


def _conv_top_left_backward(layer, a_prev, trace, acts):
    (top, _), (left, _) = _top_left(layer)
    d_padded = layers.conv_backward(*_padded_conv(layer, a_prev), trace, acts)
    return d_padded[:, top : top + a_prev.shape[1], left : left + a_prev.shape[2], :]


class PaddingTopLeft(_SwapsLayerKind):
    """Pads "same" with the extra row and column at the top and left (TensorFlow puts them at the bottom and right)."""

    name = "padding-top-left"
    kind = "conv2d"
    swapped = layers.Kind(_conv_top_left_forward, _conv_top_left_backward)


class MomentumSwapped(NumpyEngine):
    """Writes batch norm's momentum in PyTorch's convention: moving <- (1 - m) moving + m stat."""

    name = "momentum-swapped"

    def step(self, case):
        return super().step(_replaced(case, "batch_norm", momentum=lambda layer: 1 - layer.momentum))


def _unbiased_moving_statistics(layer, trace):
    """PyTorch's running_var: the unbiased batch variance n / (n - 1) var in the moving variance."""
    found = layers.moving_statistics(layer, trace)
    if found:
        n = trace.xhat.size // trace.xhat.shape[-1]
        m = layer.momentum
        found["moving_variance"] = m * layer.moving_variance + (1 - m) * trace.var * (n / (n - 1))
    return found


class UnbiasedRunningVariance(NumpyEngine):
    """Keeps the unbiased batch variance in batch norm's moving variance, as PyTorch does."""

    name = "unbiased-running-var"

    def step(self, case):
        original = reference_engine.moving_statistics
        reference_engine.moving_statistics = _unbiased_moving_statistics
        try:
            return super().step(case)
        finally:
            reference_engine.moving_statistics = original


class TorchEpsilon(NumpyEngine):
    """Normalizes with PyTorch's default eps 1e-5 whatever the case says."""

    name = "torch-epsilon"

    def step(self, case):
        case = _replaced(case, "batch_norm", epsilon=lambda layer: 1e-5)
        return super().step(_replaced(case, "layer_norm", epsilon=lambda layer: 1e-5))


LAYER_SLIPS = [
    ReshapedConvKernel,
    SwappedKernelHeightWidth,
    FlattenChannelsFirst,
    PaddingTopLeft,
    MomentumSwapped,
    UnbiasedRunningVariance,
    TorchEpsilon,
]
