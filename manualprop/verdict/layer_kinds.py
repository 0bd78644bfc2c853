"""What each layer kind contributes to the walk of a step (:data:`LAYER_KINDS`, keyed by the
kind's name): its forward quantities and its backward ones, ending with the dA it passes down,
each with its heading, formula and meaning; and a layer in a few words (:func:`describe`). The
walk that strings them together is :func:`manualprop.verdict.computation.walk`."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from ..casefile.case import Case, Layer, as_weight
from ..reference.layers import padding_of
from .quantity import Quantity, Step


class LayerKind(Protocol):
    """What a layer kind contributes to the walk."""

    def forward(self, case: Case, i: int) -> list[Quantity]: ...

    def backward(self, case: Case, i: int, given: str | None) -> list[Quantity]:
        """Layer ``i``'s backward quantities from the top, ``given`` the field the loss gradient
        already fills (the last layer's dA or dZ; None below it), ending with the dA it passes down."""
        ...


IMAGE = ("sample", "h", "w", "channel")  # images are (batch, height, width, channels) in every trace
KERNEL = ("kh", "kw", "in", "out")  # a conv2d kernel as reports give it
WEIGHT = ("out", "in", "kh", "kw")  # a conv2d kernel as PyTorch keeps it (a case's ``weight``)


def _dims(one_sample: tuple[int, ...]) -> tuple[str, ...]:
    """The axes of a batch of a layer's output, for explain: an image's (sample, h, w, channel), else unnamed."""
    return IMAGE if len(one_sample) == 3 else ()


def describe(layer: Layer) -> str:
    """A layer in a few words: ``tanh``, ``conv2d 3x3, relu, strides 2x2, same``, ``max_pool2d 2x2``, ``batch_norm``."""
    act = layer.activation if layer.activation != "leaky_relu" else f"leaky_relu, alpha {layer.alpha:g}"
    if layer.kind == "dense":
        return act
    if layer.kind in ("conv2d", "max_pool2d", "avg_pool2d"):
        (h, w), (sh, sw) = layer.window, layer.strides
        words = [f"{layer.kind} {h}x{w}"] + ([act] if layer.kind == "conv2d" else [])
        if layer.strides != (1, 1) and (layer.kind == "conv2d" or layer.strides != layer.window):
            words.append(f"strides {sh}x{sw}")
        if layer.kind == "conv2d" and layer.padding == "same":
            words.append("same")
        return ", ".join(words)
    if layer.kind == "batch_norm":
        return f"batch_norm, epsilon {layer.epsilon:g}, momentum {layer.momentum:g}"
    if layer.kind == "layer_norm":
        return f"layer_norm, epsilon {layer.epsilon:g}"
    return layer.kind


def _passed_down(case: Case, i: int, formula: str, meaning: str) -> list[Quantity]:
    """The dA layer ``i`` passes down to layer ``i - 1`` (none from the first layer)."""
    if i == 0:
        return []
    return [
        Quantity(
            Step("dA", i - 1, "dA"),
            f"layer {i - 1} backward: dA",
            f"dA = dL/dA: from the layer above, {formula}",
            "backward",
            meaning,
            dims=_dims(case.layers[i].in_shape),
        )
    ]


class Dense:
    """``Z = A_prev @ W + b``, ``A = f(Z)``; backward dZ, dW, db and ``dA_prev = dZ @ W.T``."""

    Z = ("Z = A_prev @ W + b", "the linear step Z = A_prev @ W + b (the weights, their layout, the bias)")
    dW = ("dW = A_prev.T @ dZ", "the kernel gradient dW = A_prev.T @ dZ")
    dW_as_weight = ("dW = dZ.T @ A_prev", "(out, in)")  # the formula and the axes when the case gives ``weight``
    db = ("db = dZ summed over the batch", "the bias gradient db = dZ summed over the batch")
    dA = ("dA = dZ_next @ W_next.T", "backpropagation through this layer's weights, dA_prev = dZ @ W.T (W, its layout)")

    def z_formula(self, layer: Layer) -> str:
        return self.Z[0]

    def forward(self, case: Case, i: int) -> list[Quantity]:
        layer = case.layers[i]
        name, dims = describe(layer), _dims(layer.out_shape)
        return [
            Quantity(Step("Z", i, "Z"), f"layer {i} ({name}) forward: Z", self.z_formula(layer), "forward", self.Z[1], dims=dims),
            Quantity(
                Step("A", i, "A"),
                f"layer {i} ({name}) forward: A",
                f"A = {layer.activation}(Z)",
                "forward",
                "the activation (forward)",
                dims=dims,
            ),
        ]

    def backward(self, case: Case, i: int, given: str | None) -> list[Quantity]:
        layer, top = case.layers[i], i == len(case.layers) - 1
        dims = _dims(layer.out_shape)
        kernel_dims = KERNEL if layer.kernel is not None and layer.kernel.ndim == 4 else ()
        out = []
        if given != "dZ":
            gradient = "the error gradient at the output layer" if top else "the aggregated error gradient"
            out.append(
                Quantity(
                    Step("dZ", i, "dZ"),
                    f"layer {i} backward: dZ, {gradient}",
                    "dZ = dL/dZ = dA * f'(Z)",
                    "backward",
                    "the activation derivative",
                    dims=dims,
                )
            )
        dW = Quantity(Step("dW", i, "dW"), f"layer {i} backward: dW", self.dW[0], "backward", self.dW[1], dims=kernel_dims)
        if layer.layout == "weight":  # the case file's own layout, as nn.Linear.weight.grad
            formula, axes = self.dW_as_weight
            dW = dataclasses.replace(
                dW,
                heading=f"layer {i} backward: dW, {axes} as the case gives weight",
                formula=formula,
                present=as_weight,
                dims=WEIGHT if kernel_dims else (),
            )
        out.append(dW)
        if layer.bias is not None:  # every engine leaves db empty for a layer without bias
            out.append(Quantity(Step("db", i, "db"), f"layer {i} backward: db", self.db[0], "backward", self.db[1]))
        return out + _passed_down(case, i, *self.dA)


class Conv2d(Dense):
    """A convolution: ``Z = A_prev_padded * K + b`` window by window, ``A = f(Z)``; backward as Dense
    with every window of the input as a row (``dK = patches.T @ dZ``, ``dA_prev = dZ @ K.T`` added back)."""

    Z = (
        "Z[b, y, x, o] = sum_(i, j, c) A_prev_padded[b, y s + i, x s + j, c] K[i, j, c, o] + b[o]",
        "the convolution Z = each window of A_prev against K, plus b (the kernel and its layout (kh, kw, in, out), "
        "the padding, the strides, the bias)",
    )
    dW = (
        "dK[i, j, c, o] = sum_(b, y, x) A_prev_padded[b, y s + i, x s + j, c] dZ[b, y, x, o] (patches.T @ dZ), (kh, kw, in, out)",
        "the kernel gradient dK = patches.T @ dZ (each window of the input against dZ)",
    )
    dW_as_weight = ("dW = dK transposed to (out, in, kh, kw), as nn.Conv2d.weight.grad", "(out, in, kh, kw)")
    db = ("db = dZ summed over the batch, height and width", "the bias gradient db = dZ summed over batch, height and width")
    dA = (
        "dA_prev = dZ_next @ K_next.T, each window's share added back where it was read, the padding cut off",
        "backpropagation through this convolution, dA_prev = dZ @ K.T added back over each window (the kernel, its "
        "layout, the padding and the strides)",
    )

    def z_formula(self, layer: Layer) -> str:
        (top, bottom), (left, right) = padding_of(layer)
        padded = f"padding {layer.padding}: rows (top, bottom) ({top}, {bottom}), columns (left, right) ({left}, {right})"
        return f"{self.Z[0]}; strides s = {layer.strides}, {padded}"


class Pool:
    """``A`` = each window's largest value (max_pool2d) or mean (avg_pool2d); backward the dA passed down."""

    def forward(self, case: Case, i: int) -> list[Quantity]:
        layer, how = case.layers[i], "largest value" if case.layers[i].kind == "max_pool2d" else "mean"
        return [
            Quantity(
                Step("A", i, "A"),
                f"layer {i} ({describe(layer)}) forward: A",
                f"A[b, y, x, c] = the {how} of A_prev over the {layer.window} window at (y sh, x sw), "
                f"strides {layer.strides}, per channel",
                "forward",
                f"the {'max' if layer.kind == 'max_pool2d' else 'average'} pooling (its windows and strides)",
                before="its input agrees; ",
                dims=_dims(layer.out_shape),
            )
        ]

    def backward(self, case: Case, i: int, given: str | None) -> list[Quantity]:
        if case.layers[i].kind == "max_pool2d":
            formula = "through the max pooling, dA_next to the first largest element of each window (row-major), 0 elsewhere"
            meaning = "backpropagation through the max pooling (dA to the first largest element of each window)"
        else:
            formula = "through the average pooling, dA_next / (window size) to every element of its window"
            meaning = "backpropagation through the average pooling (dA shared evenly over each window)"
        return _passed_down(case, i, formula, meaning)


class Flatten:
    """``A`` = A_prev reshaped to (batch, h w c) in (h, w, c) order; backward dA reshaped back."""

    def forward(self, case: Case, i: int) -> list[Quantity]:
        layer = case.layers[i]
        return [
            Quantity(
                Step("A", i, "A"),
                f"layer {i} (flatten) forward: A",
                f"A = A_prev {tuple(layer.in_shape)} reshaped to ({layer.out_shape[0]},) per sample, in (h, w, c) order",
                "forward",
                "the flatten's order: (h, w, c), channels last (an engine that keeps channels first permutes to "
                "(h, w, c) before flattening)",
                before="its input agrees; ",
            )
        ]

    def backward(self, case: Case, i: int, given: str | None) -> list[Quantity]:
        return _passed_down(
            case,
            i,
            "through the flatten, dA_next reshaped back to (batch, h, w, c)",
            "backpropagation through the flatten (dA reshaped back, in the same (h, w, c) order)",
        )


class Norm:
    """batch_norm and layer_norm: mean, var (biased), ``x^ = (x - mean) / sqrt(var + eps)``,
    ``A = gamma x^ + beta``; backward dx^ = dA gamma, dgamma, dbeta and the dA passed down."""

    def over(self, case: Case, i: int) -> tuple[str, int]:
        """The axes normalized together, in words, and how many values n each statistic counts."""
        layer = case.layers[i]
        if layer.kind == "layer_norm":
            each = "each sample and position" if len(layer.in_shape) == 3 else "each sample"
            return f"its last axis ({each} on its own)", int(layer.in_shape[-1])
        axes = "the batch, height and width" if len(layer.in_shape) == 3 else "the batch"
        return f"{axes} (every axis but the last)", int(case.inputs.shape[0] * np.prod(layer.in_shape[:-1]))

    def forward(self, case: Case, i: int) -> list[Quantity]:
        layer = case.layers[i]
        over, n = self.over(case, i)
        head, dims = f"layer {i} ({describe(layer)})", _dims(layer.out_shape)
        stat_dims = ("sample", "h", "w") if layer.kind == "layer_norm" and dims else ()
        return [
            Quantity(
                Step("mean", i, "mean"),
                f"{head} forward: mean",
                f"mean = the mean of A_prev over {over}",
                "forward",
                f"the {layer.kind} mean, over {over}",
                dims=stat_dims,
            ),
            Quantity(
                Step("var", i, "var"),
                f"{head} forward: var",
                f"var = mean((A_prev - mean)^2) over {over}: biased, divided by n = {n}",
                "forward",
                f"the {layer.kind} variance, biased (divided by n, not n - 1), over {over}",
                before="the mean agrees; ",
                dims=stat_dims,
            ),
            Quantity(
                Step("xhat", i, "xhat"),
                f"{head} forward: x^, the normalized input",
                f"x^ = (A_prev - mean) / sqrt(var + eps), eps {layer.epsilon:g}",
                "forward",
                f"the normalization x^ = (x - mean) / sqrt(var + eps) (epsilon {layer.epsilon:g}, inside the square root)",
                before="the mean and the variance agree; ",
                dims=dims,
            ),
            Quantity(
                Step("A", i, "A"),
                f"{head} forward: A",
                "A = gamma x^ + beta",
                "forward",
                "the scale and shift A = gamma x^ + beta",
                before="x^ agrees; ",
                dims=dims,
            ),
        ]

    def backward(self, case: Case, i: int, given: str | None) -> list[Quantity]:
        layer = case.layers[i]
        every = "every axis but the last"
        return [
            Quantity(
                Step("dxhat", i, "dxhat"),
                f"layer {i} backward: dx^",
                "dx^ = dA * gamma",
                "backward",
                "the gradient through the scale, dx^ = dA gamma",
                dims=_dims(layer.out_shape),
            ),
            Quantity(
                Step("dgamma", i, "dgamma"),
                f"layer {i} backward: dgamma",
                f"dgamma = dA * x^ summed over {every}",
                "backward",
                f"the gamma gradient, dA x^ summed over {every}",
            ),
            Quantity(
                Step("dbeta", i, "dbeta"),
                f"layer {i} backward: dbeta",
                f"dbeta = dA summed over {every}",
                "backward",
                f"the beta gradient, dA summed over {every}",
            ),
            *_passed_down(
                case,
                i,
                f"through the {layer.kind}, with n = {self.over(case, i)[1]}: "
                "dA_prev = (n dx^ - sum dx^ - x^ sum(dx^ x^)) / (n sqrt(var + eps))",
                f"backpropagation through the {layer.kind}: the shares of the mean and the variance, "
                "dA_prev = (n dx^ - sum dx^ - x^ sum(dx^ x^)) / (n sqrt(var + eps))",
            ),
        ]


LAYER_KINDS: dict[str, LayerKind] = {
    "dense": Dense(),
    "conv2d": Conv2d(),
    "max_pool2d": Pool(),
    "avg_pool2d": Pool(),
    "flatten": Flatten(),
    "batch_norm": Norm(),
    "layer_norm": Norm(),
}
