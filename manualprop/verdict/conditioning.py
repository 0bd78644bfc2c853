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
``g + e``, with the optimizer's state as it would be had every earlier gradient been moved the
same way or the other: the largest move is the step's spread, and the spreads add up. For
an element whose gradient is far from zero it is negligible (Adam's slope there is
``lr epsilon / |g|^2``), so a difference in the update's formula (Keras's epsilon placement)
still shows; for one whose gradient is rounding alone it is up to the step size, and the
engines' values there are not compared beyond it. What the reference computes exactly gets none.
"""

from __future__ import annotations

import numpy as np

from ..casefile.case import Case
from ..engines import LayerTrace, StepRecord, filled
from ..reference import losses
from ..reference.activations import ACTIVATIONS
from ..reference.losses import LOSSES
from ..reference.optimizers import OPTIMIZERS

OPERATION = 2  # an operation's rounding in each of two engines, in units of u times its terms' magnitude


def allowance(case: Case, history: list[StepRecord] | None = None) -> dict[str, np.ndarray]:
    """Per parameter, how far the rounding of its gradients can move its delta, and under
    ``"loss"`` how far it can move the loss before each step (one value for one step, else one a
    step, as the loss is compared). ``history`` is an engine's run of the case with its traces
    (the NumPy reference's when None; it is run here). A step without a trace ends the estimate:
    what it would have excused is not excused."""
    params = {name: p.astype(np.float64) for name, p in case.parameters().items()}
    nothing = {**{name: np.zeros_like(p) for name, p in params.items()}, "loss": np.zeros(case.steps if case.steps > 1 else ())}
    if case.rtol == 0 and case.atol == 0:  # the case asks for the same bits: nothing is excused
        return nothing
    from ..reference.engine import NumpyEngine

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        history = history if history is not None else NumpyEngine().step(case).history
        update, hyper, wide = OPTIMIZERS[case.optimizer], case.hyper, _wider(case)
        state = {name: update.init(p, hyper) for name, p in params.items()}
        # The optimizer's state also as it would be had every gradient been e higher, or e lower,
        # and as the reference's update computed in a wider type, to tell an exact update.
        highs, lows = ({name: _copy(s) for name, s in state.items()} for _ in range(2))
        exact_states = {name: update.init(p.astype(wide), hyper) for name, p in params.items()} if wide else {}
        spread = {name: np.zeros_like(p) for name, p in params.items()}
        rounded = {name: np.zeros_like(p) for name, p in params.items()}  # where an engine's p may be rounded otherwise
        loss = np.zeros(len(history))
        for t, record in enumerate(history, start=1):
            trace = record.trace or []
            if len(trace) != len(case.layers):
                break
            held = {name: spread[name] + rounded[name] for name in params} if t > 1 else None
            grads, errors, loss[t - 1], exact_grads = gradient_errors(case, trace, params, held)
            for name, p in params.items():
                g, e = grads[name].astype(np.float64), errors[name]
                step = lambda at, kept: update.update(p, at, _copy(kept), t, case.lr, hyper) - p  # noqa: B023, E731
                middle = step(g, state[name])
                apart = [step(g + e, highs[name]), step(g - e, lows[name]), step(g - e, highs[name]), step(g + e, lows[name])]
                spread[name] += np.nan_to_num(np.max([np.abs(d - middle) for d in apart], axis=0), nan=np.inf)
                update.update(p, g, state[name], t, case.lr, hyper)  # the state moves on with the reference's g
                update.update(p, g + e, highs[name], t, case.lr, hyper)
                update.update(p, g - e, lows[name], t, case.lr, hyper)
                after = p + record.deltas[name].astype(np.float64)
                exact = np.zeros(p.shape, dtype=bool)
                if wide and name in exact_grads:
                    exact_after = update.update(p.astype(wide), exact_grads[name], exact_states[name], t, case.lr, hyper)
                    exact = (exact_after == after) & (e == 0) & (spread[name] == 0)
                rounded[name] = np.where(exact, 0.0, _unit(case) * np.abs(after))
                params[name] = after
    return {**spread, "loss": np.nan_to_num(loss if case.steps > 1 else loss.reshape(()), nan=np.inf)}


def gradient_errors(
    case: Case, trace: list[LayerTrace], params: dict[str, np.ndarray], held: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, dict[str, np.ndarray]]:
    """dL/dp per parameter, how far an engine's rounding can move it, how far it can move the
    loss, and dL/dp computed in a wider type (to tell an exact update; empty without one): a
    running error estimate through the step's forward and backward pass. ``held`` is how far the
    parameters an engine holds may already differ from the reference's (None: not at all, the
    first step). What the reference computes exactly from exact values (the same in the wider
    type) carries no error: a case built on dyadic numbers, a ReLU's Z exactly at 0, MAE's
    sign(y - t) / N, stay on their value."""
    u = OPERATION * _unit(case)
    wide = _wider(case) or np.float64
    held = held or {}
    kernels = [np.abs(params[f"layers.{i}.kernel"]) for i in range(len(trace))]
    kernel_errors = [held.get(f"layers.{i}.kernel", np.zeros_like(k)) for i, k in enumerate(kernels)]
    signed: list[np.ndarray] = [params[f"layers.{i}.kernel"].astype(wide) for i in range(len(trace))]
    exact = _exact if _wider(case) else (lambda value, wide_value, propagated: np.zeros(np.shape(value), dtype=bool))

    # Forward: the error of Z and A, layer by layer.
    inputs = [np.abs(np.asarray(case.inputs, dtype=np.float64))]
    input_errors = [np.zeros_like(inputs[0])]
    wide_inputs: list[np.ndarray] = [np.asarray(case.inputs).astype(wide)]
    z_errors, a_errors, wide_z = [], [], []
    signed_inputs = [np.asarray(case.inputs, np.float64)] + [_f64(t.A) for t in trace[:-1]]  # each layer's A_prev
    for i, layer in enumerate(case.layers):
        a_prev, e_prev = inputs[i], input_errors[i]
        bias = params.get(f"layers.{i}.bias")
        propagated = e_prev @ kernels[i] + a_prev @ kernel_errors[i] + held.get(f"layers.{i}.bias", 0.0)
        z, a = _f64(trace[i].Z), _f64(trace[i].A)
        z_wide = wide_inputs[i] @ signed[i] + (0 if bias is None else bias.astype(wide))
        sums_exact = _exact_sums(signed_inputs[i], params[f"layers.{i}.kernel"], case, bias)
        rounding = u * (a_prev @ kernels[i] + (0.0 if bias is None else np.abs(bias)))
        e_z = np.where(sums_exact & (propagated == 0), 0.0, rounding + propagated)
        act = ACTIVATIONS[layer.activation]
        moved = [act.forward(z + s * e_z, layer.alpha) for s in (1, -1)]
        a_wide = act.forward(z_wide, layer.alpha)
        e_a = np.where(exact(a, a_wide, e_z), 0.0, np.abs(moved[0] - moved[1]) / 2 + _unit(case) * np.abs(a))  # f within an ulp
        z_errors.append(e_z)
        a_errors.append(e_a)
        wide_z.append(z_wide)
        inputs.append(np.abs(a))
        input_errors.append(e_a)
        wide_inputs.append(a_wide)

    # The loss, and its gradient: both moved by the output's error, each rounded once more.
    loss = LOSSES[case.loss]
    targets = np.asarray(case.targets, dtype=np.float64)
    last = len(trace) - 1
    y, e_y = (_f64(trace[last].Z), z_errors[last]) if loss.on_logits else (_f64(trace[last].A), a_errors[last])
    y_wide = wide_z[last] if loss.on_logits else wide_inputs[-1]
    gradient = lambda at, t: losses.gradient(loss, at, t, case.reduction, case.scale)  # noqa: E731
    d_y, d_y_wide = gradient(y, targets), gradient(y_wide, targets.astype(wide))
    factor = abs(losses.factor(loss, y, case.reduction, case.scale))
    e_loss = float(np.sum(np.abs(d_y) * e_y) + u * np.abs(loss.terms(y, targets)).sum() * factor)
    probed = np.abs(gradient(y + e_y, targets) - gradient(y - e_y, targets)) / 2
    e_dy = probed + u * np.abs(d_y)
    if loss.on_logits:  # softmax(z) sum(t) - t: the probabilities' own rounding, before t is taken away
        e_dy = e_dy + u * np.abs(_f64(trace[last].A)) * np.abs(targets.sum(axis=1, keepdims=True)) * factor
    e_dy = np.where(exact(d_y, d_y_wide, probed), 0.0, e_dy)

    # Backward: the error of dZ, dW, db and dA, layer by layer.
    grads, errors, wide_grads = {}, {}, {}
    d_a, e_da, d_a_wide = d_y, e_dy, d_y_wide
    for i in reversed(range(len(trace))):
        layer = case.layers[i]
        act = ACTIVATIONS[layer.activation]
        if i == last and loss.on_logits:
            d_z, e_dz, d_z_wide = d_y, e_dy, d_y_wide
        else:
            d_z, propagated = _through_activation(act, layer.alpha, trace[i], d_a, e_da, z_errors[i], a_errors[i])
            d_z_wide = act.backward(d_a_wide, wide_z[i], wide_inputs[i + 1], layer.alpha)
            e_dz = np.where(exact(d_z, d_z_wide, propagated), 0.0, propagated + u * np.abs(d_z))
        a_prev, e_prev = inputs[i], input_errors[i]
        kernel = f"layers.{i}.kernel"
        grads[kernel], wide_grads[kernel] = _f64(trace[i].dW), wide_inputs[i].T @ d_z_wide
        propagated = e_prev.T @ np.abs(d_z) + a_prev.T @ e_dz
        sums_exact = _exact_sums(signed_inputs[i].T, d_z, case)
        errors[kernel] = np.where(sums_exact & (propagated == 0), 0.0, u * (a_prev.T @ np.abs(d_z)) + propagated)
        if layer.bias is not None:
            name = f"layers.{i}.bias"
            grads[name], wide_grads[name] = _f64(trace[i].db), d_z_wide.sum(axis=0)
            propagated = e_dz.sum(axis=0)
            sums_exact = _exact_sums(np.ones((1, len(d_z))), d_z, case)[0]
            errors[name] = np.where(sums_exact & (propagated == 0), 0.0, u * np.abs(d_z).sum(axis=0) + propagated)
        if i > 0:
            d_a, d_a_wide = _f64(trace[i - 1].dA), d_z_wide @ signed[i].T
            propagated = e_dz @ kernels[i].T + np.abs(d_z) @ np.transpose(kernel_errors[i])
            sums_exact = _exact_sums(d_z, params[f"layers.{i}.kernel"].T, case)
            e_da = np.where(sums_exact & (propagated == 0), 0.0, u * (np.abs(d_z) @ kernels[i].T) + propagated)
    return grads, errors, e_loss, (wide_grads if _wider(case) else {})


def _exact(value: np.ndarray, wide_value: np.ndarray, propagated: np.ndarray) -> np.ndarray:
    """Where a value the reference computed is exact: the same in the wider type, and nothing it
    was computed from carries an error."""
    return (np.asarray(wide_value) == value) & (np.asarray(propagated) == 0)


def _exact_sums(x: np.ndarray, w: np.ndarray, case: Case, bias: np.ndarray | None = None) -> np.ndarray:
    """Where ``x @ w (+ bias)`` is exact in the case's dtype in whatever order an engine sums it:
    every term is a multiple of the smallest power of two dividing one of them, and the terms'
    magnitudes add up to less than 2^p times it (p the dtype's significand bits), so every product
    and every partial sum is representable. Too large to check (over 4e6 terms): nowhere."""
    rows, inner = x.shape
    cols = w.shape[1]
    if rows * inner * cols > 4_000_000:
        return np.zeros((rows, cols), dtype=bool)
    bits = np.finfo(case.dtype).nmant + 1
    low = _lowest_bit(x)[:, :, None] + _lowest_bit(w)[None, :, :]  # each product's lowest set bit
    quantum = low.min(axis=1)
    if bias is not None:
        quantum = np.minimum(quantum, _lowest_bit(bias)[None, :])
    total = np.abs(x) @ np.abs(w) + (0.0 if bias is None else np.abs(bias))
    return (total == 0) | (total < np.ldexp(1.0, np.clip(bits + quantum, -1074, 1023)))


def _lowest_bit(v: np.ndarray) -> np.ndarray:
    """The exponent of each element's lowest set bit (v = odd * 2^that); a large number for 0, a
    term that adds nothing to a sum."""
    v = np.asarray(v, dtype=np.float64)
    mantissa, exponent = np.frexp(v)
    whole = np.abs(mantissa * 2.0**53).astype(np.int64)  # the 53-bit significand as an integer
    low = np.round(np.log2((whole & -whole).clip(min=1))).astype(np.int64)
    return np.where(v == 0, 10_000, exponent - 53 + low)


def _wider(case: Case) -> type | None:
    """A floating type wider than the case's, to tell an exact result from a rounded one: float64
    for float32, the long double for float64 where it is wider (x86's 80-bit); else None, and no
    result is taken for exact."""
    if np.dtype(case.dtype) == np.float32:
        return np.float64
    return np.longdouble if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps else None


def _through_activation(act, alpha, trace: LayerTrace, d_a, e_da, e_z, e_a) -> tuple[np.ndarray, np.ndarray]:
    """dZ from dA through the activation, and the error it takes from what it is computed from:
    dA's error through the derivative, and the derivative's own, taken at Z and A moved by their
    errors."""
    z, a, d_z = _f64(trace.Z), _f64(trace.A), _f64(trace.dZ)
    moved = [np.abs(act.backward(d_a, z + s * e_z, a + s * e_a, alpha) - d_z) for s in (1, -1)]
    if act.elementwise:
        through = e_da * np.abs(act.backward(np.ones_like(d_a), z, a, alpha))
    else:  # the softmax Jacobian, taken over magnitudes: a (e + sum(e a))
        through = np.abs(a) * (e_da + (e_da * np.abs(a)).sum(axis=1, keepdims=True))
    return d_z, through + np.maximum(*moved)


def _unit(case: Case) -> float:
    return float(np.finfo(case.dtype).eps) / 2


def _f64(value: np.ndarray | None) -> np.ndarray:
    return np.asarray(filled(value), dtype=np.float64)


def _copy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in state.items()}
