"""A quantity of the step's computation (:class:`Quantity`: where it is, its :class:`Step`, how a
reader sees it, whether diagnose compares it) and how to read it from an engine's run
(:func:`value`). The walk that lists them is :func:`manualprop.verdict.computation.walk`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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
