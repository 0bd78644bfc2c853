"""How far the rounding of a gradient can move the delta of an update normalized by sqrt(v).

A gradient element is a sum of products (``dW = A_prev.T @ dZ``, ``db`` = dZ summed over the
batch). Computed with unit roundoff u, it carries an error of up to about ``c u S``, where ``S``
is the same sum taken over the terms' magnitudes (``|A_prev|.T @ |dZ|``, the sum of ``|dZ|``)
and ``c`` grows with the depth the error has come through. For plain SGD and momentum this
moves the delta by ``lr c u S``, which the tolerance's relative part covers unless the terms
cancel. An update normalized by the gradient's own magnitude (Adam, AdamW, RMSprop, Adagrad)
has a slope of up to ``lr / epsilon`` near g = 0: a gradient that cancels to nearly zero (MAE's
signs over a batch, two symmetric samples), of which only rounding is left, moves the delta by up
to ``lr c u S / epsilon``, and two correct engines can differ by that much. No fixed tolerance
covers it, and no oracle can excuse it: the oracle's g is the true one, each engine's is rounded.

:func:`allowance` is that spread, per delta element: the update evaluated at ``g - c u S`` and at
``g + c u S``, half the difference, step after step (each step from the NumPy reference's own
gradients, terms and optimizer state) and summed. For an element whose gradient is far from zero
it is negligible (Adam's slope there is ``lr epsilon / |g|^2``), so a difference in the update's
formula (Keras's epsilon placement) still shows; for one whose gradient is rounding alone it is
up to the step size, and the engines' values there are not compared beyond it. Only the
normalized optimizers get it (``Optimizer.normalized`` in :mod:`manualprop.concepts`).
"""

from __future__ import annotations

import numpy as np

from . import concepts
from .case import Case
from .engines import LayerTrace, StepRecord
from .optimizers import OPTIMIZERS


def allowance(case: Case, history: list[StepRecord] | None = None) -> dict[str, np.ndarray]:
    """Per parameter, how far the rounding of its gradients can move its delta (zeros for an
    optimizer that is not normalized). ``history`` is the NumPy reference's run of the case, when
    it ran already; else it is run here."""
    params = {name: p.astype(np.float64) for name, p in case.parameters().items()}
    if not concepts.OPTIMIZERS[case.optimizer].normalized:
        return {name: np.zeros_like(p) for name, p in params.items()}
    from .engine import NumpyEngine

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        history = history if history is not None else NumpyEngine().step(case).history
        rounding = 2 * (len(case.layers) + 1) * np.finfo(case.dtype).eps / 2  # c u
        update = OPTIMIZERS[case.optimizer]
        hyper = case.hyper
        state = {name: update.init(p, hyper) for name, p in params.items()}
        spread = {name: np.zeros_like(p) for name, p in params.items()}
        for t, record in enumerate(history, start=1):
            trace = record.trace or []
            if len(trace) != len(case.layers):
                break
            grads, terms = _gradients_and_terms(case, trace, params)
            moved = _moved(case, params, grads) if t > 1 else {}
            for name, p in params.items():
                g, d = grads[name].astype(np.float64), rounding * terms[name] + moved.get(name, 0.0)
                high = update.update(p, g + d, _copy(state[name]), t, case.lr, hyper)
                low = update.update(p, g - d, _copy(state[name]), t, case.lr, hyper)
                spread[name] += np.nan_to_num(np.abs(high - low) / 2, nan=np.inf)
                update.update(p, g, state[name], t, case.lr, hyper)  # the state moves on with the reference's g
                params[name] = p + record.deltas[name].astype(np.float64)
    return spread


def _gradients_and_terms(
    case: Case, trace: list[LayerTrace], params: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """dL/dp and the magnitude of its terms, per parameter: the backward pass taken over absolute
    values (``|dZ| @ |W|.T``, times ``|f'(Z)|``), so that a cancellation anywhere below the loss
    gradient counts, not only in the last sum."""
    grads, terms = {}, {}
    dz_terms = np.abs(np.asarray(trace[-1].dZ, dtype=np.float64))
    for i in reversed(range(len(trace))):
        layer = trace[i]
        a_prev = np.abs(np.asarray(case.inputs if i == 0 else trace[i - 1].A, dtype=np.float64))
        grads[f"layers.{i}.kernel"], terms[f"layers.{i}.kernel"] = np.asarray(layer.dW), a_prev.T @ dz_terms
        if layer.db is not None:
            grads[f"layers.{i}.bias"], terms[f"layers.{i}.bias"] = np.asarray(layer.db), dz_terms.sum(axis=0)
        if i > 0:
            below = trace[i - 1]
            da_terms = dz_terms @ np.abs(params[f"layers.{i}.kernel"]).T
            da, dz = np.abs(np.asarray(below.dA, dtype=np.float64)), np.abs(np.asarray(below.dZ, dtype=np.float64))
            slope = np.divide(dz, da, out=np.ones_like(dz), where=da > 0)  # |f'(Z)|, as the trace gives it
            dz_terms = da_terms * slope
    return grads, terms


def _moved(case: Case, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """How far the gradients move when the parameters move by their own rounding (after a step,
    each engine holds p rounded to its dtype): two probes, p (1 + 4u) and p (1 +- 4u) in a
    chequered pattern, four times the larger change. An estimate, as the oracle's probes are."""
    from .engine import backward, forward, gradients

    u = np.finfo(case.dtype).eps / 2
    moved: dict[str, np.ndarray] = {name: np.zeros_like(g, dtype=np.float64) for name, g in grads.items()}
    for pattern in (lambda p: np.ones_like(p), lambda p: np.where(np.indices(p.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)):
        probe = case.with_parameters({n: (p * (1 + 4 * u * pattern(p))).astype(case.dtype) for n, p in params.items()})
        traces = forward(probe)
        backward(probe, traces)
        for name, g in gradients(traces).items():
            moved[name] = np.maximum(moved[name], 4 * np.abs(g.astype(np.float64) - grads[name].astype(np.float64)))
    return moved


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}
