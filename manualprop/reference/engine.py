"""The NumPy reference engine: the steps of a network, written as the maths reads.

Each layer kind's forward and backward is in :mod:`manualprop.reference.layers`; a dense layer's,
forward::

    Z = A_prev @ W + b          A = f(Z)

Backward, from the loss down::

    dZ = f'(Z) applied to dA    (or dZ = dL/dZ directly for cross-entropy on the logits)
    dW = A_prev.T @ dZ          db = dZ summed over the batch
    dA_prev = dZ @ W.T

A batch_norm layer's moving statistics change in the forward pass of each step (SPEC section 8).
Update: the case's optimizer (:mod:`manualprop.reference.optimizers`; plain SGD is ``p <- p - lr * dL/dp``),
once per step, each step on the same batch. Every intermediate is kept in a LayerTrace per layer.

The functions take the activation and loss registries as arguments (the shipped ones by
default), so a variant engine, a student's or a deliberately faulty one, swaps one function in
without touching the registries everyone else uses.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..casefile.case import Case
from ..concepts import GRADIENT_FIELD
from ..engines import LayerTrace, StepRecord, StepResult, filled
from . import losses
from .activations import ACTIVATIONS, Activation
from .layers import KINDS, moving_statistics
from .losses import LOSSES, Loss
from .optimizers import OPTIMIZERS, Optimizer


def forward(case: Case, acts: Mapping[str, Activation] = ACTIVATIONS) -> list[LayerTrace]:
    """Every layer's forward quantities (dense: Z and A), input side first."""
    traces = []
    a = case.inputs
    for layer in case.layers:
        trace = LayerTrace()
        a = KINDS[layer.kind].forward(layer, a, trace, acts)
        traces.append(trace)
    return traces


def loss_value(case: Case, traces: list[LayerTrace], loss_fns: Mapping[str, Loss] = LOSSES) -> float:
    """L = scale * reduce(terms(y, t)), y the output A (or Z for cross-entropy on logits)."""
    loss = loss_fns[case.loss]
    y = filled(traces[-1].Z if loss.on_logits else traces[-1].A)
    return float(losses.reduce(loss.terms(y, case.targets, **case.loss_params), case.reduction, case.scale))


def backward(
    case: Case, traces: list[LayerTrace], acts: Mapping[str, Activation] = ACTIVATIONS, loss_fns: Mapping[str, Loss] = LOSSES
) -> None:
    """Fill every trace's gradients, from the last layer to the first."""
    loss = loss_fns[case.loss]
    last = traces[-1]
    y = filled(last.Z if loss.on_logits else last.A)
    grad = losses.gradient(loss, y, case.targets, case.reduction, case.scale, **case.loss_params)
    if loss.on_logits:
        last.dZ = grad
    else:
        last.dA = grad
    for i in reversed(range(len(case.layers))):
        layer = case.layers[i]
        a_prev = filled(traces[i - 1].A) if i > 0 else case.inputs
        d_prev = KINDS[layer.kind].backward(layer, a_prev, traces[i], acts)
        if i > 0:
            traces[i - 1].dA = d_prev


def gradients(traces: list[LayerTrace]) -> dict[str, np.ndarray]:
    """dL/dp for every trainable parameter, by name, kernels (in, out)."""
    grads = {}
    for i, trace in enumerate(traces):
        for name, field in GRADIENT_FIELD.items():
            value = getattr(trace, field)
            if value is not None:
                grads[f"layers.{i}.{name}"] = value
    return grads


def run_steps(
    case: Case,
    acts: Mapping[str, Activation] = ACTIVATIONS,
    loss_fns: Mapping[str, Loss] = LOSSES,
    optimizers: Mapping[str, Optimizer] = OPTIMIZERS,
) -> StepResult:
    """The case's steps: forward, loss, backward and the update, ``case.steps`` times on the same batch."""
    optimizer = optimizers[case.optimizer]
    initial = case.parameters()
    params = dict(initial)
    state = {name: optimizer.init(p, case.hyper) for name, p in params.items() if case.trainable(name)}
    history = []
    for t in range(1, case.steps + 1):
        current = case.with_parameters(params) if t > 1 else case
        traces = forward(current, acts)
        loss = loss_value(current, traces, loss_fns)
        backward(current, traces, acts, loss_fns)
        grads = gradients(traces)
        updated = {name: optimizer.update(params[name], grads[name], state[name], t, case.lr, case.hyper) for name in state}
        for i, (layer, trace) in enumerate(zip(current.layers, traces, strict=True)):
            updated.update({f"layers.{i}.{name}": value for name, value in moving_statistics(layer, trace).items()})
        history.append(
            StepRecord(
                loss,
                {n: updated[n] - params[n] for n in params},
                {n: {k: v.copy() for k, v in s.items()} for n, s in state.items()},
                traces,
            )
        )
        params = updated
    deltas = {name: params[name] - initial[name] for name in initial}
    return StepResult(loss=history[0].loss, deltas=deltas, trace=history[0].trace, history=history)


class NumpyEngine:
    """The reference engine; it needs nothing beyond NumPy. A subclass may swap the registries."""

    name = "numpy"
    activations: Mapping[str, Activation] = ACTIVATIONS
    losses: Mapping[str, Loss] = LOSSES
    optimizers: Mapping[str, Optimizer] = OPTIMIZERS

    def unavailable(self) -> str | None:
        return None

    def step(self, case: Case) -> StepResult:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return run_steps(case, self.activations, self.losses, self.optimizers)
