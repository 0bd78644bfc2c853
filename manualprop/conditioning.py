"""How far the rounding of a gradient can move the delta of an update normalized by sqrt(v).

Two correct engines compute every gradient with rounding: each sum of products carries an
error of up to about ``u S`` (u the unit roundoff, ``S`` the same sum over the terms'
magnitudes), and what a layer gets wrong moves everything computed from it. For plain SGD and
momentum this moves the delta by ``lr`` times that error, which the tolerance's relative part
covers. An update normalized by the gradient's own magnitude (Adam, AdamW, RMSprop, Adagrad)
has a slope of up to ``lr / epsilon`` near g = 0: a gradient that is nearly zero, because its
terms cancel (MAE's signs over a batch, two symmetric samples) or because a factor of it is
(a saturated tanh, whose ``1 - a^2`` keeps only the rounding of ``a``), moves the delta by up to
``lr e / epsilon`` for an error e of g, and two correct engines can differ by that much. No fixed
tolerance covers it, and no oracle can excuse it: the oracle's g is the true one, each engine's
is rounded.

:func:`allowance` is that spread, per delta element. For each step, from the NumPy reference's
own trace, a running error estimate (first order, as numerical analysis writes it) follows the
computation: forward, the error of Z and A from each product's rounding and from the error of
what came in (the inputs are exact; a parameter carries the spread of the steps before it);
backward, the error of the loss gradient (the loss gradient taken at the output moved by its
error), of each activation's derivative (taken at Z and A moved by theirs, so that ``1 - a^2``
at a = 1 shows its rounding) and of every product. The update is then evaluated at ``g - e`` and
``g + e``, half the difference is the step's spread, and the spreads add up over the steps. For
an element whose gradient is far from zero it is negligible (Adam's slope there is
``lr epsilon / |g|^2``), so a difference in the update's formula (Keras's epsilon placement)
still shows; for one whose gradient is rounding alone it is up to the step size, and the
engines' values there are not compared beyond it. Only the normalized optimizers get it
(``Optimizer.normalized`` in :mod:`manualprop.concepts`).
"""

from __future__ import annotations

import numpy as np

from . import losses
from .activations import ACTIVATIONS
from .case import Case
from .engines import LayerTrace, StepRecord, filled
from .losses import LOSSES
from .optimizers import OPTIMIZERS

OPERATION = 2  # an operation's rounding in each of two engines, in units of u times its terms' magnitude


def allowance(case: Case, history: list[StepRecord] | None = None) -> dict[str, np.ndarray]:
    """Per parameter, how far the rounding of its gradients can move its delta, and under
    ``"loss"`` how far it can move the loss before each step (one value for one step, else one a
    step, as the loss is compared). ``history`` is the NumPy reference's run of the case, when it
    ran already; else it is run here."""
    params = {name: p.astype(np.float64) for name, p in case.parameters().items()}
    if case.rtol == 0 and case.atol == 0:  # the case asks for the same bits: nothing is excused
        return {**{name: np.zeros_like(p) for name, p in params.items()}, "loss": np.zeros(case.steps if case.steps > 1 else ())}
    from .engine import NumpyEngine

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        history = history if history is not None else NumpyEngine().step(case).history
        update = OPTIMIZERS[case.optimizer]
        hyper = case.hyper
        state = {name: update.init(p, hyper) for name, p in params.items()}
        # The optimizer's state also as it would be had every gradient been e higher, or e lower.
        highs, lows = ({name: _copy(s) for name, s in state.items()} for _ in range(2))
        spread = {name: np.zeros_like(p) for name, p in params.items()}
        loss = np.zeros(len(history))
        for t, record in enumerate(history, start=1):
            trace = record.trace or []
            if len(trace) != len(case.layers):
                loss[t - 1 :] = np.inf
                break
            held = {name: spread[name] + _unit(case) * np.abs(p) for name, p in params.items()} if t > 1 else None
            grads, errors, loss[t - 1] = gradient_errors(case, trace, params, held)
            for name, p in params.items():
                g, e = grads[name].astype(np.float64), errors[name]
                step = lambda at, kept: update.update(p, at, _copy(kept), t, case.lr, hyper) - p  # noqa: B023, E731
                middle = step(g, state[name])
                apart = [step(g + e, highs[name]), step(g - e, lows[name]), step(g - e, highs[name]), step(g + e, lows[name])]
                spread[name] += np.nan_to_num(np.max([np.abs(d - middle) for d in apart], axis=0), nan=np.inf)
                update.update(p, g, state[name], t, case.lr, hyper)  # the state moves on with the reference's g
                update.update(p, g + e, highs[name], t, case.lr, hyper)
                update.update(p, g - e, lows[name], t, case.lr, hyper)
                params[name] = p + record.deltas[name].astype(np.float64)
    return {**spread, "loss": np.nan_to_num(loss if case.steps > 1 else loss.reshape(()), nan=np.inf)}


def gradient_errors(
    case: Case, trace: list[LayerTrace], params: dict[str, np.ndarray], held: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """dL/dp per parameter, how far an engine's rounding can move it, and how far it can move
    the loss: a running error estimate through the step's forward and backward pass. ``held`` is
    how far the parameters an engine holds may already differ from the reference's (None: not at
    all, the first step)."""
    u = OPERATION * _unit(case)
    held = held or {}
    kernels = [np.abs(params[f"layers.{i}.kernel"]) for i in range(len(trace))]
    kernel_errors = [held.get(f"layers.{i}.kernel", np.zeros_like(k)) for i, k in enumerate(kernels)]

    # Forward: the error of Z and A, layer by layer. What the reference computes exactly from
    # exact values (the same in extended precision) carries none: a case built on dyadic numbers,
    # a ReLU's Z exactly at 0, stay on their convention.
    inputs = [np.abs(np.asarray(case.inputs, dtype=np.float64))]
    input_errors = [np.zeros_like(inputs[0])]
    z_errors, a_errors = [], []
    a_long = np.asarray(case.inputs).astype(np.longdouble)
    for i, layer in enumerate(case.layers):
        a_prev, e_prev = inputs[i], input_errors[i]
        bias = np.abs(params.get(f"layers.{i}.bias", 0.0))
        e_z = u * (a_prev @ kernels[i] + bias) + e_prev @ kernels[i] + a_prev @ kernel_errors[i]
        e_z = e_z + held.get(f"layers.{i}.bias", 0.0)
        z, a = _f64(trace[i].Z), _f64(trace[i].A)
        z_long = a_long @ params[f"layers.{i}.kernel"].astype(np.longdouble) + params.get(f"layers.{i}.bias", 0.0)
        e_z = np.where((z_long == z) & (e_prev @ kernels[i] == 0) & (a_prev @ kernel_errors[i] == 0), 0.0, e_z)
        act = ACTIVATIONS[layer.activation]
        moved = [act.forward(z + s * e_z, layer.alpha) for s in (1, -1)]
        a_long = act.forward(z_long, layer.alpha)
        exact = (e_z == 0) & (a_long == a)
        e_a = np.where(exact, 0.0, np.abs(moved[0] - moved[1]) / 2 + _unit(case) * np.abs(a))  # f within an ulp, as a library's
        z_errors.append(e_z)
        a_errors.append(e_a)
        inputs.append(np.abs(a))
        input_errors.append(e_a)

    # The loss, and its gradient: both moved by the output's error, each rounded once more.
    loss = LOSSES[case.loss]
    targets = np.asarray(case.targets, dtype=np.float64)
    last = len(trace) - 1
    y, e_y = (_f64(trace[last].Z), z_errors[last]) if loss.on_logits else (_f64(trace[last].A), a_errors[last])
    gradient = lambda at: losses.gradient(loss, at, targets, case.reduction, case.scale)  # noqa: E731
    d_y = gradient(y)
    terms = np.abs(loss.terms(y, targets)).sum() * abs(losses.factor(loss, y, case.reduction, case.scale))
    e_loss = float(np.sum(np.abs(d_y) * e_y) + u * terms)
    e_dy = np.abs(gradient(y + e_y) - gradient(y - e_y)) / 2 + u * np.abs(d_y)
    if loss.on_logits:  # softmax(z) sum(t) - t: the probabilities' own rounding, before t is taken away
        p = np.abs(_f64(trace[last].A)) * np.abs(targets.sum(axis=1, keepdims=True))
        e_dy = e_dy + u * p * abs(losses.factor(loss, y, case.reduction, case.scale))

    # Backward: the error of dZ, dW, db and dA, layer by layer.
    grads, errors = {}, {}
    d_a, e_da = d_y, e_dy
    for i in reversed(range(len(trace))):
        layer = case.layers[i]
        if i == last and loss.on_logits:
            d_z, e_dz = d_y, e_dy
        else:
            d_z, e_dz = _through_activation(
                ACTIVATIONS[layer.activation], layer.alpha, trace[i], d_a, e_da, z_errors[i], a_errors[i], u
            )
        a_prev, e_prev = inputs[i], input_errors[i]
        grads[f"layers.{i}.kernel"] = _f64(trace[i].dW)
        errors[f"layers.{i}.kernel"] = u * (a_prev.T @ np.abs(d_z)) + e_prev.T @ np.abs(d_z) + a_prev.T @ e_dz
        if layer.bias is not None:
            grads[f"layers.{i}.bias"] = _f64(trace[i].db)
            errors[f"layers.{i}.bias"] = u * np.abs(d_z).sum(axis=0) + e_dz.sum(axis=0)
        if i > 0:
            d_a = _f64(trace[i - 1].dA)
            e_da = u * (np.abs(d_z) @ kernels[i].T) + e_dz @ kernels[i].T + np.abs(d_z) @ np.transpose(kernel_errors[i])
    return grads, errors, e_loss


def _through_activation(act, alpha, trace: LayerTrace, d_a, e_da, e_z, e_a, u) -> tuple[np.ndarray, np.ndarray]:
    """dZ from dA through the activation, and its error: dA's error through the derivative, and
    the derivative's own, taken at Z and A moved by their errors (and rounded once more)."""
    z, a, d_z = _f64(trace.Z), _f64(trace.A), _f64(trace.dZ)
    moved = [np.abs(act.backward(d_a, z + s * e_z, a + s * e_a, alpha) - d_z) for s in (1, -1)]
    if act.elementwise:
        through = e_da * np.abs(act.backward(np.ones_like(d_a), z, a, alpha))
    else:  # the softmax Jacobian, taken over magnitudes: a (e + sum(e a))
        through = np.abs(a) * (e_da + (e_da * np.abs(a)).sum(axis=1, keepdims=True))
    return d_z, through + np.maximum(*moved) + u * np.abs(d_z)


def _unit(case: Case) -> float:
    return float(np.finfo(case.dtype).eps) / 2


def _f64(value: np.ndarray | None) -> np.ndarray:
    return np.asarray(filled(value), dtype=np.float64)


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}
