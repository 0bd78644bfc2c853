"""How far the rounding of a gradient can move the delta of an update normalized by sqrt(v).

Two correct engines compute every gradient with rounding: each sum carries an error of about
``u sqrt(n) (|sum| + sqrt(sum of its terms' squares))`` (u the unit roundoff, n its terms), and
what a layer gets wrong moves everything computed from it. For plain SGD and momentum this moves
the delta by ``lr`` times that error, which the tolerance's relative part covers. An update
normalized by the gradient's own magnitude (Adam, AdamW, RMSprop, Adagrad) has a slope of up to
``lr / epsilon`` near g = 0: a gradient that is nearly zero, because its terms cancel (MAE's
signs over a batch, two symmetric samples) or because a factor of it is (a saturated tanh, whose
``1 - a^2`` keeps only the rounding of ``a``), moves the delta by up to ``lr e / epsilon`` for an
error e of g, and two correct engines can differ by that much. No fixed tolerance covers it, and
no oracle can excuse it: the oracle's g is the true one, each engine's is rounded.

:func:`allowance` is that spread, per delta element. For each step, from an engine's trace (the
NumPy reference's fills what it lacks), :func:`~manualprop.verdict.rounding.gradient_errors`
estimates how far rounding can move each gradient, layer kind by layer kind. The update is then
evaluated at ``g - e`` and ``g + e``, with the optimizer's state as it would be had every earlier
gradient been moved the same way or the other: the largest move is the step's spread, and the
spreads add up; the parameters an engine holds after a step carry it into the next. A moving
statistic's change, ``(1 - momentum)(stat - moving)``, moves with the statistic's error. For an
element whose gradient is far from zero the spread is negligible (Adam's slope there is
``lr epsilon / |g|^2``), so a difference in the update's formula (Keras's epsilon placement) still
shows; for one whose gradient is rounding alone it is up to the step size, and the engines'
values there are not compared beyond it. What the reference computes exactly gets none.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..casefile.case import Case
from ..engines import LayerTrace, StepRecord
from ..reference.losses import LOSSES
from ..reference.optimizers import OPTIMIZERS
from .rounding import OPERATION, StepErrors, gradient_errors, reference_trace, unit, wider

__all__ = ["OPERATION", "StepErrors", "allowance", "gradient_errors"]

Array = np.ndarray


def allowance(case: Case, history: list[StepRecord] | None = None) -> dict[str, np.ndarray]:
    """Per parameter, how far the rounding of its gradients can move its delta, and under
    ``"loss"`` how far it can move the loss before each step (one value for one step, else one a
    step, as the loss is compared). ``history`` is an engine's run of the case with its traces
    (the NumPy reference's when None; it is run here). A field an engine's trace lacks is taken
    from the NumPy reference's at the engine's parameters; a step without a trace ends the
    estimate: what it would have excused is not excused."""
    params = {name: p.astype(np.float64) for name, p in case.parameters().items()}
    nothing = {**{name: np.zeros_like(p) for name, p in params.items()}, "loss": np.zeros(case.steps if case.steps > 1 else ())}
    if case.rtol == 0 and case.atol == 0:  # the case asks for the same bits: nothing is excused
        return nothing
    from ..reference.engine import NumpyEngine

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        history = history if history is not None else NumpyEngine().step(case).history
        update, hyper, wide = OPTIMIZERS[case.optimizer], case.hyper, wider(case)
        trainable = [name for name in params if case.trainable(name)]
        state = {name: update.init(params[name], hyper) for name in trainable}
        # The optimizer's state also as it would be had every gradient been e higher, or e lower,
        # and as the reference's update computed in a wider type, to tell an exact update.
        highs, lows = ({name: _copy(s) for name, s in state.items()} for _ in range(2))
        exact_states = {name: update.init(params[name].astype(wide), hyper) for name in trainable} if wide else {}
        spread = {name: np.zeros_like(p) for name, p in params.items()}
        rounded = {name: np.zeros_like(p) for name, p in params.items()}  # where an engine's p may be rounded otherwise
        loss = np.zeros(len(history))
        for t, record in enumerate(history, start=1):
            trace = _complete(case, record.trace, params)
            if trace is None or any(name not in record.deltas for name in params):
                break
            held = {name: spread[name] + rounded[name] for name in params} if t > 1 else None
            step = gradient_errors(case, trace, params, held)
            loss[t - 1] = step.loss
            for name in trainable:
                p, g, e = params[name], step.grads[name].astype(np.float64), step.errors[name]
                move = lambda at, kept: update.update(p, at, _copy(kept), t, case.lr, hyper) - p  # noqa: B023, E731
                middle = move(g, state[name])
                apart = [move(g + e, highs[name]), move(g - e, lows[name]), move(g - e, highs[name]), move(g + e, lows[name])]
                spread[name] += np.nan_to_num(np.max([np.abs(d - middle) for d in apart], axis=0), nan=np.inf)
                update.update(p, g, state[name], t, case.lr, hyper)  # the state moves on with the reference's g
                update.update(p, g + e, highs[name], t, case.lr, hyper)
                update.update(p, g - e, lows[name], t, case.lr, hyper)
                after = p + record.deltas[name].astype(np.float64)
                exact = np.zeros(p.shape, dtype=bool)
                if wide and name in step.wide_grads:
                    exact_after = update.update(p.astype(wide), step.wide_grads[name], exact_states[name], t, case.lr, hyper)
                    exact = (exact_after == after) & (e == 0) & (spread[name] == 0)
                rounded[name] = np.where(exact, 0.0, unit(case) * np.abs(after))
                if t < len(history):  # a parameter stored between steps carries its rounding to the end: each engine's own
                    spread[name] += OPERATION * rounded[name]
                params[name] = after
            for name, moved in step.moved.items():  # a moving statistic: its change is the forward pass's
                spread[name] += np.nan_to_num(moved, nan=np.inf)
                params[name] = params[name] + record.deltas[name].astype(np.float64)
                rounded[name] = unit(case) * np.abs(params[name])
    return {**spread, "loss": np.nan_to_num(loss if case.steps > 1 else loss.reshape(()), nan=np.inf)}


# What each kind's rule reads of the engine's trace (besides dA, read from every layer but the last).
_READS: dict[str, tuple[str, ...]] = {
    "dense": ("Z", "A", "dZ", "dW"),
    "conv2d": ("Z", "A", "dZ", "dW"),
    "max_pool2d": ("A",),
    "avg_pool2d": ("A",),
    "flatten": ("A",),
    "batch_norm": ("mean", "var", "xhat", "A", "dgamma", "dbeta"),
    "layer_norm": ("mean", "var", "xhat", "A", "dgamma", "dbeta"),
}


def _complete(case: Case, trace: list[LayerTrace] | None, params: dict[str, Array]) -> list[LayerTrace] | None:
    """The engine's trace, each field it left out (a framework keeps no x^) taken from the NumPy
    reference's at the engine's parameters; None without a trace."""
    if not trace or len(trace) != len(case.layers):
        return None
    loss = LOSSES[case.loss]
    wanted = [
        (
            *_READS[layer.kind],
            *(("db",) if layer.bias is not None else ()),
            *(("dA",) if i < len(trace) - 1 or not loss.on_logits else ()),
        )
        for i, layer in enumerate(case.layers)
    ]
    if all(getattr(t, name) is not None for t, names in zip(trace, wanted, strict=True) for name in names):
        return trace
    reference = reference_trace(case, params, case.dtype.type)
    if reference is None:
        return None
    return [
        dataclasses.replace(t, **{name: getattr(r, name) for name in names if getattr(t, name) is None})
        for t, r, names in zip(trace, reference, wanted, strict=True)
    ]


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}
