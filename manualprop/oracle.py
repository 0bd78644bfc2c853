"""The finite-difference oracle: the engine ``numeric``, for arbitrating between engines.

It knows no derivative at all. Every gradient comes from central differences of the loss,
computed in float64 with nothing but the forward pass, refined by Richardson extrapolation::

    D(h)  = (L(p + h) - L(p - h)) / 2h
    dL/dp ~ (4 D(h/2) - D(h)) / 3            error O(h^4), rounding ~ eps |L| / h

with ``h = 1e-6 * (1 + |p|)``. Its deltas are ``-lr * dL/dp`` in float64, so they are more
precise than any float32 engine. It is slow (four forward passes per parameter element), so it
runs on request (``--engines numpy,numeric``) and automatically when two engines disagree. Near a
kink (relu or leaky_relu at 0, mae where y = t) a difference quotient straddles the kink: the
oracle then reports its uncertainty there as the size of the jump, and comparisons with it
allow for that uncertainty.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .case import Case
from .engine import forward, loss_value
from .engines import StepResult

STEP = 1e-6


def as_float64(case: Case) -> Case:
    """The same case in float64: the oracle's arithmetic."""
    to64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    layers = tuple(dataclasses.replace(l, kernel=to64(l.kernel), bias=to64(l.bias)) for l in case.layers)
    return dataclasses.replace(case, dtype=np.dtype(np.float64), inputs=to64(case.inputs), targets=to64(case.targets), layers=layers)


def _loss_with(case: Case, name: str, value: np.ndarray) -> float:
    index, kind = int(name.split(".")[1]), name.split(".")[2]
    layers = list(case.layers)
    layers[index] = dataclasses.replace(layers[index], **{kind: value})
    changed = dataclasses.replace(case, layers=tuple(layers))
    return loss_value(changed, forward(changed))


def gradient(case: Case, name: str) -> tuple[np.ndarray, np.ndarray]:
    """dL/dp for parameter ``name`` by Richardson-refined central differences, and its uncertainty.

    The uncertainty is the gap between the two central quotients, plus rounding, plus, where the
    loss has a kink within the step (the second difference does not shrink with the step), the
    size of the kink's jump: there the engines' one-sided conventions are all within reach.
    """
    value = case.parameters()[name]
    base = _loss_with(case, name, value)
    grad = np.zeros_like(value)
    uncertainty = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        h = STEP * (1.0 + abs(value[index]))

        def loss_at(step: float) -> float:
            moved = value.copy()
            moved[index] += step
            return _loss_with(case, name, moved)

        up, down, up_half, down_half = loss_at(h), loss_at(-h), loss_at(h / 2), loss_at(-h / 2)
        coarse, fine = (up - down) / (2 * h), (up_half - down_half) / h
        grad[index] = (4 * fine - coarse) / 3
        bend, bend_half = (up - 2 * base + down) / h, (up_half - 2 * base + down_half) / (h / 2)
        kink = abs(bend) if abs(bend_half) > 0.75 * abs(bend) else 0.0  # smooth: bend halves with h
        uncertainty[index] = abs(fine - coarse) + kink + 1e-15 * abs(base) / h
    return grad, uncertainty


class NumericEngine:
    """Gradients by finite differences of the float64 forward pass: an engine with no derivatives."""

    name = "numeric"
    default = False  # slow: it runs on request or to arbitrate, not in every run

    def unavailable(self) -> str | None:
        return None

    def step(self, case: Case) -> StepResult:
        case64 = as_float64(case)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            traces = forward(case64)
            loss = loss_value(case64, traces)
            deltas, uncertainty = {}, {}
            for name in case64.parameters():
                grad, error = gradient(case64, name)
                deltas[name] = -case.lr * grad
                uncertainty[name] = case.lr * error
        for i, trace in enumerate(traces):
            trace.dW = -deltas[f"layers.{i}.kernel"] / case.lr
            trace.db = -deltas[f"layers.{i}.bias"] / case.lr if f"layers.{i}.bias" in deltas else None
        return StepResult(loss=loss, deltas=deltas, trace=traces, uncertainty=uncertainty)


__all__ = ["NumericEngine", "gradient", "as_float64"]
