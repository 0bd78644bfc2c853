"""The computation of a step, described once: every quantity in the order it is produced.

:func:`walk` lists the quantities of a case: per layer its forward (Z, A); the loss; the loss
gradient; per layer from the top its backward (dZ, dW, db, and the dA it passes down through its W
to the layer below); last, per parameter, the update (the updated parameter, then its delta). Each
:class:`Quantity` carries its :class:`Step` (label, layer, trace field), the heading and formula a
reader sees, and the meaning a diagnosis names when it differs first. ``diagnose`` searches the
quantities it can compare (:func:`comparable`; ``updated`` is derived from the delta and is not
searched) for the first divergence; ``explain`` prints every quantity of the walk.

Who contributes what:

* a layer kind (:data:`~manualprop.verdict.layer_kinds.LAYER_KINDS`, keyed by the kind's name) gives its forward quantities and
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

import numpy as np

from .. import concepts
from ..casefile.case import Case
from .layer_kinds import KERNEL, LAYER_KINDS, WEIGHT, Conv2d, Dense, Flatten, LayerKind, Norm, Pool, _dims, describe
from .quantity import Quantity, Step, result_of, value

# Where the walk's pieces used to live, and are still imported from.
__all__ = [
    "LAYER_KINDS",
    "Conv2d",
    "Dense",
    "Flatten",
    "LayerKind",
    "Norm",
    "Pool",
    "Quantity",
    "Step",
    "comparable",
    "describe",
    "plain_sgd",
    "result_of",
    "settings_text",
    "value",
    "walk",
]


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
