"""The computation of a step, described once: every quantity in the order it is produced.

:func:`walk` lists the quantities of a case: per layer its forward (Z, A); the loss; the loss
gradient; per layer from the top its backward (dZ, dW, db, and the dA it passes down through its W
to the layer below); last, per parameter, the update (the updated parameter, then its delta). Each
:class:`Quantity` carries its :class:`Step` (label, layer, trace field), the heading and formula a
reader sees, and the meaning a diagnosis names when it differs first. ``diagnose`` searches the
quantities it can compare (:func:`comparable`; ``updated`` is derived from the delta and is not
searched) for the first divergence; ``explain`` prints every quantity of the walk.

Who contributes what:

* a layer kind (:data:`LAYER_KINDS`, keyed by the kind's name) gives its forward quantities and
  its backward ones, including the gradient it passes down, each read from its trace: dense and
  conv2d Z and A, then dZ, dW (a conv kernel's (kh, kw, in, out), or (out, in, kh, kw) when the case
  gives ``weight``), db; the pools and flatten A; batch_norm and layer_norm their mean, var (biased),
  x^ and A, then dx^, dgamma, dbeta. A new kind is one more entry whose ``forward`` and ``backward``
  return its own quantities. Images are (batch, height, width, channels) in every trace; a
  quantity's ``dims`` name its axes, for explain;
* the loss gives the loss and its gradient, which reaches the last layer as dA, or as dZ for a
  loss taken on the logits (the cross-entropies): the last layer then starts its backward at dW;
* the optimizer gives, per parameter, each step's change and its state after the step (m, v,
  the velocity: shown, not searched, as not every engine exposes it), then the updated value and
  the delta over all steps. batch_norm's moving statistics are compared as parameters are; their
  change comes from the forward pass (``moving <- momentum moving + (1 - momentum) stat``), after the
  batch statistic it is made of, so a diagnosis meets a wrong batch variance at ``var`` and a wrong
  moving average of a right one at the delta.

One plain SGD step keeps today's Steps (``Step.step`` None); any other optimizer, or several
steps, repeats the walk per step with the step's index in ``Step.step``, read from each run's
``history``, so diagnose meets the first step that differs first, and within it the first
quantity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .. import concepts
from ..casefile.case import Case, Layer, as_weight
from ..engines import StepResult
from ..reference.layers import padding_of

if TYPE_CHECKING:
    from .results import EngineRun


@dataclass(frozen=True)
class Step:
    """One quantity of the computation: its label, layer (None for the loss) and trace field."""

    label: str
    layer: int | None
    field: str  # a LayerTrace field, "loss" or a parameter name for "delta" and "updated"
    step: int | None = None  # the optimization step, once a case runs several (None: the only one)

    @property
    def culprit_layer(self) -> int | None:
        """The layer whose maths produces the quantity: dA of layer i comes from layer i + 1's W."""
        return self.layer + 1 if self.label == "dA" and self.layer is not None else self.layer


@dataclass(frozen=True, eq=False)
class Quantity:
    """A quantity of the walk: where it is, how a reader sees it, and whether diagnose compares it."""

    at: Step
    heading: str
    formula: str
    phase: str  # forward, loss, backward or update: where a non-finite value first appears
    meaning: str = ""  # what its maths is, as a diagnosis names it when it differs first
    compared: bool = True  # False for a quantity derived from another (``updated``, from the delta)
    expected: np.ndarray | None = None  # the case's golden value, shown beside the engines'
    derive: Callable[[np.ndarray], np.ndarray] | None = None  # from the value of ``source``
    source: Step | None = None
    present: Callable[[np.ndarray], np.ndarray] | None = None  # as the case file lays it out
    before: str | None = None  # what agrees when it differs first, where the label's usual words do not fit
    dims: tuple[str, ...] = ()  # the names of its axes as shown (images, conv kernels), for explain

    def value(self, run: EngineRun | StepResult) -> np.ndarray | None:
        """The quantity from an engine's run, None where the engine has none."""
        if self.derive is None or self.source is None:
            return value(run, self.at)
        base = value(run, self.source)
        return None if base is None else self.derive(base)


def value(run: EngineRun | StepResult, step: Step) -> np.ndarray | None:
    """The quantity ``step`` from an engine's run (or its StepResult), None where it has none.
    A Step of one of several optimization steps reads that step's record of the run's history."""
    result = result_of(run)
    if step.step is not None:
        return _of_step(result, step.step, step)
    if step.field == "loss":
        return np.array(result.loss)
    if step.label == "delta":
        return result.deltas.get(step.field)
    if step.layer is None or len(result.trace) <= step.layer:
        return None
    return getattr(result.trace[step.layer], step.field)


def result_of(run: EngineRun | StepResult) -> StepResult:
    """What an engine's run returned (a StepResult is its own)."""
    return run if isinstance(run, StepResult) else run.output


def _of_step(result: StepResult, index: int, step: Step) -> np.ndarray | None:
    if index >= len(result.history):
        return None
    record = result.history[index]
    if step.field == "loss":
        return np.array(record.loss)
    if step.label == "delta":
        return record.deltas.get(step.field)
    if step.layer is None:  # the optimizer's state: Step(state name, None, parameter)
        return record.state.get(step.field, {}).get(step.label)
    trace = record.trace if record.trace else (result.trace if index == 0 else None)  # step 1's: the run's own trace
    if not trace or len(trace) <= step.layer:
        return None
    return getattr(trace[step.layer], step.field)


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


def _kind(case: Case, i: int) -> LayerKind:
    return LAYER_KINDS[getattr(case.layers[i], "kind", "dense")]


def _loss(case: Case) -> list[Quantity]:
    """The loss, then its gradient at the last layer: dA, or dZ for a loss on the logits."""
    last = len(case.layers) - 1
    declared = concepts.loss(case.loss)
    expected = case.expected.loss if case.expected is not None else None
    settings = "".join(f", {k} {v:g}" for k, v in case.loss_params.items())
    loss = Quantity(
        Step("loss", None, "loss"),
        "loss",
        f"{case.loss} ({case.reduction}, scale {case.scale:g}{settings}) of the last "
        f"{'Z (the logits)' if declared.on_logits else 'A'} against the targets",
        "loss",
        "the loss value (its formula, reduction or scale)",
        expected=None if expected is None else np.array(expected),
    )
    batch = case.inputs.shape[0]
    if case.reduction == "mean":
        over = f", divided by N = {batch}" if declared.per == "sample" else ", divided by every element's count (N x outputs)"
    else:
        over = ", summed"
    over += f", times the scale {case.scale:g}" if case.scale != 1 else ""
    if declared.on_logits:
        grad = declared.formula.split("d/dz = ")[-1]
        gradient = Quantity(
            Step("loss gradient", last, "dZ"),
            f"layer {last} backward: the error gradient at the output layer",
            f"dZ = dL/dZ = {grad} ({declared.name} on the logits through {declared.last_activation}){over}",
            "backward",
            f"the loss gradient on the logits, dL/dZ = {grad} ({declared.name} through {declared.last_activation})",
            dims=_dims(case.layers[last].out_shape),
        )
    else:
        grad = declared.formula.split("d/dy = ")[-1] + settings
        gradient = Quantity(
            Step("loss gradient", last, "dA"),
            f"layer {last} backward: dA",
            f"dA = dL/dA, the loss gradient: {grad}{over}",
            "backward",
            f"the loss gradient dL/dy = {grad} (its derivative, reduction or scale)",
            dims=_dims(case.layers[last].out_shape),
        )
    return [loss, gradient]


def _title(case: Case, name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray] | None, tuple[str, ...]]:
    """A parameter's heading, how it is laid out as the case file gives it, and the names of its axes."""
    shown, conv = case.shown_as(name), case.parameters()[name].ndim == 4
    if shown == name:
        return name, None, KERNEL if conv else ()
    return (
        f"{shown} {'(out, in, kh, kw)' if conv else '(out, in)'}",
        lambda v, name=name: case.in_file_layout(name, v),
        WEIGHT if conv else (),
    )


def _moving(case: Case, name: str) -> tuple[str, str]:
    """A moving statistic's update, as a formula and as a diagnosis names it."""
    layer = case.layers[int(name.split(".")[1])]
    stat = "mean" if name.endswith("moving_mean") else "var"
    m = layer.momentum
    formula = (
        f"moving <- momentum moving + (1 - momentum) {stat}, momentum {m:g}: {m:g} moving + {1 - m:g} {stat} "
        f"({stat}: this step's batch {'mean' if stat == 'mean' else 'variance, biased'}); not trained, no optimizer"
    )
    meaning = f"the moving statistic's update, moving <- {m:g} moving + {1 - m:g} batch {stat} (Keras's momentum convention" + (
        ", the biased batch variance)" if stat == "var" else ")"
    )
    return formula, meaning


def _update(case: Case) -> list[Quantity]:
    """Per parameter, the updated value (derived from the delta) and the delta over every step,
    each named and laid out as the case file gives it (a ``weight`` is shown (out, in)). A moving
    statistic is updated by the forward pass, not the optimizer, and compared the same way."""
    golden = case.expected
    plain, optimizer = plain_sgd(case) and case.steps == 1, concepts.OPTIMIZERS[case.optimizer]
    after = "" if case.steps == 1 else f" after {case.steps} steps"
    out = []
    for name, initial in case.parameters().items():
        title, present, dims = _title(case, name)
        delta = Step("delta", None, name)
        if case.trainable(name):
            updated_formula = "p - lr * dL/dp" if plain else optimizer.formula
            formula = (
                f"delta = -lr * dL/dp (lr {case.lr:g})"
                if plain
                else f"delta = p after minus p before (lr {case.lr:g}, {settings_text(case)})"
            )
            meaning = "the update p <- p - lr * dL/dp" if plain else f"the {optimizer.name} update"
        else:
            updated_formula, meaning = _moving(case, name)
            formula = "delta = moving after minus moving before"
        out += [
            Quantity(
                Step("updated", None, name),
                f"{title}: updated" + after,
                updated_formula,
                "update",
                compared=False,
                expected=golden.updated.get(name) if golden is not None else None,
                derive=_plus(initial),
                source=delta,
                present=present,
                dims=dims,
            ),
            Quantity(
                delta,
                f"{title}: delta" + after,
                formula,
                "update",
                meaning,
                expected=golden.deltas.get(name) if golden is not None else None,
                present=present,
                dims=dims,
            ),
        ]
    return out


def settings_text(case: Case) -> str:
    """The optimizer and its settings in words: ``adam, beta1 0.9, ..., amsgrad false``."""
    return ", ".join(
        [case.optimizer, *(f"{k} {v:g}" if not isinstance(v, bool) else f"{k} {str(v).lower()}" for k, v in case.hyper.items())]
    )


def _plus(initial: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The updated parameter from its delta: the initial value (in float64) plus the delta."""
    start = initial.astype(np.float64)
    return lambda delta: start + delta


def _one_step(case: Case) -> list[Quantity]:
    quantities: list[Quantity] = []
    for i in range(len(case.layers)):
        quantities += _kind(case, i).forward(case, i)
    loss = _loss(case)
    quantities += loss
    given: str | None = loss[-1].at.field
    for i in reversed(range(len(case.layers))):
        quantities += _kind(case, i).backward(case, i, given)
        given = None
    return quantities


def walk(case: Case) -> list[Quantity]:
    """Every quantity of the steps, in the order the computation produces them. One step: forward,
    loss, backward, update. Several: each step's forward, loss, backward, its change of every
    parameter and the optimizer's state after it (shown, not searched: not every engine exposes
    it), then the change over all steps; diagnose meets the first step that differs first."""
    if case.steps == 1 and plain_sgd(case):
        return _one_step(case) + _update(case)
    quantities: list[Quantity] = []
    optimizer = concepts.OPTIMIZERS[case.optimizer]
    golden_losses = case.expected.loss if case.expected is not None and isinstance(case.expected.loss, list) else None
    for k in range(case.steps):
        for q in _one_step(case) + _step_update(case, optimizer):
            expected = q.expected
            if q.at.field == "loss":
                expected = None if golden_losses is None else np.array(golden_losses[k])
            quantities.append(
                dataclasses.replace(
                    q,
                    at=dataclasses.replace(q.at, step=k),
                    heading=f"step {k + 1} of {case.steps}, {q.heading}",
                    expected=expected,
                    source=None if q.source is None else dataclasses.replace(q.source, step=k),
                )
            )
    return quantities + _update(case)


def plain_sgd(case: Case) -> bool:
    """One plain SGD update, p <- p - lr * dL/dp: no state to show."""
    return case.optimizer == "sgd" and not case.hyper.get("momentum") and not case.hyper.get("weight_decay")


def _step_update(case: Case, optimizer: concepts.Optimizer) -> list[Quantity]:
    """One step's change of every parameter, and the optimizer's state after it (a moving
    statistic has none: the forward pass changes it)."""
    out = []
    for name in case.parameters():
        title, present, dims = _title(case, name)
        if not case.trainable(name):
            formula, meaning = _moving(case, name)
            out.append(
                Quantity(
                    Step("delta", None, name),
                    f"{title}: this step's change",
                    formula,
                    "update",
                    meaning,
                    present=present,
                    dims=dims,
                )
            )
            continue
        out.append(
            Quantity(
                Step("delta", None, name),
                f"{title}: this step's change",
                f"{optimizer.formula} (lr {case.lr:g}, {settings_text(case)})",
                "update",
                f"the {optimizer.name} update",
                present=present,
                dims=dims,
            )
        )
        out += [
            Quantity(
                Step(state, None, name),
                f"{title}: {optimizer.name}'s {state} after the step",
                "",
                "update",
                compared=False,
                present=present,
                dims=dims,
            )
            for state in optimizer.active_state(case.hyper)
        ]
    return out


def comparable(case: Case) -> list[Quantity]:
    """The quantities diagnose compares between engines, in the order of the walk."""
    return [q for q in walk(case) if q.compared]
