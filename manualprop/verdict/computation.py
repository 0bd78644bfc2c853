"""The computation of a step, described once: every quantity in the order it is produced.

:func:`walk` lists the quantities of a case: per layer its forward (Z, A); the loss; the loss
gradient; per layer from the top its backward (dZ, dW, db, and the dA it passes down through its W
to the layer below); last, per parameter, the update (the updated parameter, then its delta). Each
:class:`Quantity` carries its :class:`Step` (label, layer, trace field), the heading and formula a
reader sees, and the meaning a diagnosis names when it differs first. ``diagnose`` searches the
quantities it can compare (:func:`comparable`; ``updated`` is derived from the delta and is not
searched) for the first divergence; ``explain`` prints every quantity of the walk.

Who contributes what:

* a layer kind (:data:`LAYER_KINDS`, keyed by the kind's name; every layer is ``dense`` today)
  gives its forward quantities and its backward ones, including the gradient it passes down;
  a new kind (conv, batch norm) is one more entry whose ``forward`` and ``backward`` return its
  own quantities (batch norm's mean and variance, its dgamma, dbeta), read from its trace;
* the loss gives the loss and its gradient, which reaches the last layer as dA, or as dZ for a
  loss taken on the logits (cross-entropy): the last layer then starts its backward at dW;
* the optimizer gives, per parameter, each step's change and its state after the step (m, v,
  the velocity: shown, not searched, as not every engine exposes it), then the updated value and
  the delta over all steps.

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
from ..casefile.case import Case
from ..engines import StepResult

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


class Dense:
    """``Z = A_prev @ W + b``, ``A = f(Z)``; backward dZ, dW, db and ``dA_prev = dZ @ W.T``."""

    def forward(self, case: Case, i: int) -> list[Quantity]:
        layer = case.layers[i]
        name = layer.activation if layer.activation != "leaky_relu" else f"leaky_relu, alpha {layer.alpha:g}"
        return [
            Quantity(
                Step("Z", i, "Z"),
                f"layer {i} ({name}) forward: Z",
                "Z = A_prev @ W + b",
                "forward",
                "the linear step Z = A_prev @ W + b (the weights, their layout, the bias)",
            ),
            Quantity(
                Step("A", i, "A"),
                f"layer {i} ({name}) forward: A",
                f"A = {layer.activation}(Z)",
                "forward",
                "the activation (forward)",
            ),
        ]

    def backward(self, case: Case, i: int, given: str | None) -> list[Quantity]:
        layer, top = case.layers[i], i == len(case.layers) - 1
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
                )
            )
        dW = Quantity(
            Step("dW", i, "dW"),
            f"layer {i} backward: dW",
            "dW = A_prev.T @ dZ",
            "backward",
            "the kernel gradient dW = A_prev.T @ dZ",
        )
        if layer.layout == "weight":  # the case file's own layout, as nn.Linear.weight.grad
            dW = Quantity(
                dW.at,
                f"layer {i} backward: dW, (out, in) as the case gives weight",
                "dW = dZ.T @ A_prev",
                dW.phase,
                dW.meaning,
                present=np.transpose,
            )
        out.append(dW)
        if layer.bias is not None:  # every engine leaves db empty for a layer without bias
            out.append(
                Quantity(
                    Step("db", i, "db"),
                    f"layer {i} backward: db",
                    "db = dZ summed over the batch",
                    "backward",
                    "the bias gradient db = dZ summed over the batch",
                )
            )
        if i > 0:
            out.append(
                Quantity(
                    Step("dA", i - 1, "dA"),
                    f"layer {i - 1} backward: dA",
                    "dA = dL/dA: from the layer above, dA = dZ_next @ W_next.T",
                    "backward",
                    "backpropagation through this layer's weights, dA_prev = dZ @ W.T (W, its layout)",
                )
            )
        return out


LAYER_KINDS: dict[str, LayerKind] = {"dense": Dense()}


def _kind(case: Case, i: int) -> LayerKind:
    return LAYER_KINDS[getattr(case.layers[i], "kind", "dense")]


def _loss(case: Case) -> list[Quantity]:
    """The loss, then its gradient at the last layer: dA, or dZ for a loss on the logits."""
    last = len(case.layers) - 1
    expected = case.expected.loss if case.expected is not None else None
    loss = Quantity(
        Step("loss", None, "loss"),
        "loss",
        f"{case.loss} ({case.reduction}, scale {case.scale:g}) of the last A against the targets",
        "loss",
        "the loss value (its formula, reduction or scale)",
        expected=None if expected is None else np.array(expected),
    )
    if concepts.loss(case.loss).on_logits:
        gradient = Quantity(
            Step("loss gradient", last, "dZ"),
            f"layer {last} backward: the error gradient at the output layer",
            "dZ = dL/dZ = p * sum(t) - t (softmax with cross-entropy, on the logits), over N for a mean",
            "backward",
            "the loss gradient on the logits, dL/dZ = p * sum(t) - t (cross-entropy through softmax)",
        )
    else:
        gradient = Quantity(
            Step("loss gradient", last, "dA"),
            f"layer {last} backward: dA",
            "dA = dL/dA, the loss gradient",
            "backward",
            "the loss gradient dL/dy (its derivative, reduction or scale)",
        )
    return [loss, gradient]


def _update(case: Case) -> list[Quantity]:
    """Per parameter, the updated value (derived from the delta) and the delta over every step,
    each named and laid out as the case file gives it (a ``weight`` is shown (out, in))."""
    golden = case.expected
    plain, optimizer = plain_sgd(case) and case.steps == 1, concepts.OPTIMIZERS[case.optimizer]
    after = "" if case.steps == 1 else f" after {case.steps} steps"
    out = []
    for name, initial in case.parameters().items():
        shown = case.shown_as(name)
        title = name if shown == name else f"{shown} (out, in)"
        present = None if shown == name else (lambda v, name=name: case.in_file_layout(name, v))
        delta = Step("delta", None, name)
        out += [
            Quantity(
                Step("updated", None, name),
                f"{title}: updated" + after,
                "p - lr * dL/dp" if plain else optimizer.formula,
                "update",
                compared=False,
                expected=golden.updated.get(name) if golden is not None else None,
                derive=_plus(initial),
                source=delta,
                present=present,
            ),
            Quantity(
                delta,
                f"{title}: delta" + after,
                f"delta = -lr * dL/dp (lr {case.lr:g})"
                if plain
                else f"delta = p after minus p before (lr {case.lr:g}, {settings_text(case)})",
                "update",
                "the update p <- p - lr * dL/dp" if plain else f"the {optimizer.name} update",
                expected=golden.deltas.get(name) if golden is not None else None,
                present=present,
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
    """One step's change of every parameter, and the optimizer's state after it."""
    out = []
    for name in case.parameters():
        shown = case.shown_as(name)
        title = name if shown == name else f"{shown} (out, in)"
        present = None if shown == name else (lambda v, name=name: case.in_file_layout(name, v))
        out.append(
            Quantity(
                Step("delta", None, name),
                f"{title}: this step's change",
                f"{optimizer.formula} (lr {case.lr:g}, {settings_text(case)})",
                "update",
                f"the {optimizer.name} update",
                present=present,
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
            )
            for state in optimizer.active_state(case.hyper)
        ]
    return out


def comparable(case: Case) -> list[Quantity]:
    """The quantities diagnose compares between engines, in the order of the walk."""
    return [q for q in walk(case) if q.compared]
