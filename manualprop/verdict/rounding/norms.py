"""The rules of batch_norm and layer_norm: the statistics, x^ and A = gamma x^ + beta forward,
dgamma, dbeta and the cancelling dA passed down backward, and a batch_norm's moving statistics.
They divide the errors of x and of the mean by ``sqrt(var + eps)``, large when a feature barely
varies (the ill-conditioned case)."""

from __future__ import annotations

import numpy as np

from ...casefile.case import Layer
from ...engines import filled
from .exact import _exact_total, _f64, _power_of_two
from .walk import NONE, Array, Errors, Flow, _summed, _Walk


def _norm_axes(layer: Layer, x: Array) -> tuple[int, ...]:
    """batch_norm: every axis but the last (per feature over the batch); layer_norm: the last."""
    return tuple(range(x.ndim - 1)) if layer.kind == "batch_norm" else (x.ndim - 1,)


def _statistic(layer: Layer, stat: Array, ndim: int) -> Array:
    """A statistic as the trace keeps it, shaped to broadcast against x."""
    stat = _f64(stat)
    return stat.reshape((1,) * (ndim - 1) + (-1,)) if layer.kind == "batch_norm" else stat[..., None]


def _norm_forward(walk: _Walk, i: int, x: Flow) -> Errors:
    """mean = sum x / n, var = sum (x - mean)^2 / n (n the count normalized together): their
    sums' rounding and x's errors (the mean's error moves var only to second order, as sum(x -
    mean) = 0); x^ = (x - mean) / s with s = sqrt(var + eps): the errors of x and of the mean over
    s, which is large where a feature barely varies, var's through s, and the rounding of what the
    engines subtract: (x - mean), or x/s - mean/s (TensorFlow's), so ``(|x| + |mean|) / s``;
    A = gamma x^ + beta. The statistics' errors move all that is normalized together alike: the
    layer's own sums over it take them with their sign (:func:`_norm_backward`); past the layer,
    passed through other samples' values, they count as independent. A batch_norm's moving
    statistics move by (1 - momentum) times them."""
    layer, trace, case, u = walk.case.layers[i], walk.trace[i], walk.case, walk.u
    axes, batch = _norm_axes(layer, x.value), layer.kind == "batch_norm"
    n = int(np.prod([x.value.shape[k] for k in axes]))
    mean, var = _statistic(layer, filled(trace.mean), x.value.ndim), _statistic(layer, filled(trace.var), x.value.ndim)
    s = np.sqrt(var + layer.epsilon)
    d, xhat, a = x.value - mean, _f64(trace.xhat), _f64(trace.A)
    pure = np.all(x.total == 0, axis=axes, keepdims=True)  # nothing came in with an error
    exact = pure & _exact_total(x.value, 1.0, axes, case) & _power_of_two(n)
    mean_error, mean_shared = _summed(x.error, x.shared, axes, batch)
    mean_error = np.where(exact, 0.0, (mean_error + mean_shared if batch else mean_error) / n)
    mean_error = np.where(exact, 0.0, mean_error + walk.sum_rounding(x.value, axes) / n + u * np.abs(mean))
    mean_shared = np.zeros(mean_error.shape) if batch else mean_shared / n
    var_error, var_shared = _summed(2 * np.abs(d) * x.error, 2 * np.abs(d) * x.shared, axes, batch)
    var_error = (var_error + var_shared if batch else var_error) / n
    var_error = var_error + walk.sum_rounding(d**2, axes) / n + 3 * u * var + mean_error**2  # d's, d^2's, the division's
    exact = exact & _exact_total(d, d, axes, case)
    var_error, var_shared = np.where(exact, 0.0, var_error), np.zeros(var_error.shape) if batch else var_shared / n
    magnitude = (np.abs(x.value) + np.abs(mean)) / s  # of what x^ is computed from
    stats = mean_error / s + np.abs(xhat) * var_error / (2 * s**2)  # alike for all normalized together
    own = x.error / s + u * (magnitude + np.abs(xhat))
    shared = (x.shared + mean_shared) / s + np.abs(xhat) * var_shared / (2 * s**2)
    exact = walk.exact(xhat, walk.wide_of(i, "xhat"), x.total + stats)
    own, stats, shared = (np.where(exact, 0.0, e) for e in (own, stats, shared))
    # Past the layer, a batch_norm's statistics move every sample alike (as an error of its beta
    # and gamma would): shared; a layer_norm's are each sample's own.
    independent, alike = (own, shared + stats) if batch else (own + stats, shared)
    gamma, beta = walk.param(i, "gamma"), walk.param(i, "beta")
    g, g_shared = (gamma.value, gamma.shared) if gamma is not None else (1.0, 0.0)
    a_error = np.abs(g) * independent + u * (np.abs(g) * magnitude + np.abs(a))
    a_shared = np.abs(g) * alike + np.abs(xhat) * g_shared + (beta.shared if beta is not None else 0.0)
    exact = walk.exact(a, walk.wide_of(i, "A"), a_shared + np.abs(g) * (x.total + stats))
    walk.saved[i] = {
        "own": own,
        "stats": (mean_error, var_error),
        "shared": shared,
        "scale": s,
        "magnitude": magnitude,
        "mean": mean,
    }
    if batch:
        _moving(walk, i, {"moving_mean": (mean, mean_error), "moving_variance": (var, var_error)})
    return np.where(exact, 0.0, a_error), np.where(exact, 0.0, a_shared)


def _moving(walk: _Walk, i: int, stats: dict[str, tuple[Array, Array]]) -> None:
    """moving <- m moving + (1 - m) stat changes by (1 - m)(stat - moving): the statistic's error
    and the moving value's own (held) times (1 - m), the rounding of the two products and their
    sum, and m's own in the case's dtype (0.99 is not a float32: 1 - m moves by u m / (1 - m))."""
    layer, u = walk.case.layers[i], walk.u
    m = layer.momentum
    for name, (stat, e_stat) in stats.items():
        moving = walk.param(i, name)
        if moving is None:
            continue
        stat, e_stat = stat.reshape(moving.value.shape), e_stat.reshape(moving.value.shape)
        new = m * moving.value + (1 - m) * stat
        rounding = u * (np.abs(m * moving.value) + np.abs((1 - m) * stat) + np.abs(new) + abs(m) * np.abs(stat - moving.value))
        walk.moved[f"layers.{i}.{name}"] = (1 - m) * (e_stat + moving.shared) + rounding


def _centred_rounding(walk: _Walk, a: Array, x: Array, saved: dict[str, Array], axes: tuple[int, ...]) -> Array:
    """The rounding of sum(a x^) over ``axes``, however an engine forms it: from x^, or as
    TensorFlow's gradients do, (sum(a x) - sum(a mean)) / s, whose two sums cancel where the
    mean is large against s."""
    mean, s = np.broadcast_to(saved["mean"], x.shape), saved["scale"]
    total = lambda v: np.abs(v.sum(axis=axes, keepdims=True))  # noqa: E731
    raw = (
        walk.sum_rounding(a * x / s, axes)
        + walk.sum_rounding(a * mean / s, axes)
        + walk.u * (total(a * x / s) + total(a * mean / s))
    )
    return walk.sum_rounding(a * (x - mean) / s, axes) + raw


def _with_x_hat(walk: _Walk, i: int, a: Flow, xhat: Array, axes: tuple[int, ...], normalized: bool) -> Errors:
    """The errors of sum(a x^) over ``axes``: a's and x^'s own; the statistics', which move
    every x^ normalized together alike, taken with their sign where the sum runs over those
    (``normalized``: x^ moves by -dmean / s - x^ dvar / (2 s^2), so the sum by dmean / s sum(a)
    and dvar / (2 s^2) sum(a x^)), else as independent; and the sum's rounding."""
    saved = walk.saved[i]
    (mean_error, var_error), s = saved["stats"], saved["scale"]
    own = saved["own"] if normalized else saved["own"] + mean_error / s + np.abs(xhat) * var_error / (2 * s**2)
    batch = normalized == (walk.case.layers[i].kind == "batch_norm")
    error, shared = _summed(
        a.error * np.abs(xhat) + np.abs(a.value) * own, a.shared * np.abs(xhat) + np.abs(a.value) * saved["shared"], axes, batch
    )
    if normalized:
        total = lambda v: np.abs(v.sum(axis=axes, keepdims=True))  # noqa: E731
        moved = mean_error / s * total(a.value) + var_error / (2 * s**2) * total(a.value * xhat)
        error, shared = (error, shared + moved) if batch else (error + moved, shared)
    return error, shared


def _norm_backward(walk: _Walk, i: int, x: Flow, d: Flow) -> Errors:
    """dbeta = sum dA, dgamma = sum dA x^ (over every axis but the last), dx^ = dA gamma; then
    dx = (n dx^ - S1 - x^ S2) / (n s), S1 = sum dx^, S2 = sum dx^ x^ (over the axes normalized
    together): its numerator cancels, so its rounding is taken from the terms' magnitudes, and
    all of it is divided by s."""
    layer, trace, case, u = walk.case.layers[i], walk.trace[i], walk.case, walk.u
    saved = walk.saved[i]
    s, magnitude = saved["scale"], saved["magnitude"]
    xhat = _f64(trace.xhat)
    every = tuple(range(d.value.ndim - 1))
    batch = layer.kind == "batch_norm"
    flat = lambda a: a.reshape(a.shape[-1])  # noqa: E731  (a sum over the batch, kept as size 1)
    if walk.param(i, "beta") is not None:
        propagated = flat(sum(_summed(d.error, d.shared, every, batch=True)))
        exact = flat(_exact_total(d.value, 1.0, every, case)) & (propagated == 0)
        walk.gradient(i, "beta", "dbeta", np.where(exact, 0.0, propagated + flat(walk.sum_rounding(d.value, every))))
    gamma = walk.param(i, "gamma")
    if gamma is not None:
        propagated = flat(sum(_with_x_hat(walk, i, d, xhat, every, normalized=batch)))
        exact = flat(_exact_total(d.value, xhat, every, case)) & (propagated == 0)
        rounding = flat(_centred_rounding(walk, np.broadcast_to(d.value, x.value.shape), x.value, saved, every))
        walk.gradient(i, "gamma", "dgamma", np.where(exact, 0.0, propagated + rounding))
    if i == 0:
        return NONE
    g, g_shared = (gamma.value, gamma.shared) if gamma is not None else (1.0, 0.0)
    d_xhat = d.value * g
    abs_dxhat = np.abs(d_xhat)
    exact = walk.exact(d_xhat, walk.wide_of(i, "dxhat"), d.total * np.abs(g) + np.abs(d.value) * g_shared)
    dxhat = Flow(
        d_xhat,
        np.where(exact, 0.0, d.error * np.abs(g) + u * abs_dxhat),
        np.where(exact, 0.0, d.shared * np.abs(g) + np.abs(d.value) * g_shared),
    )
    axes = _norm_axes(layer, x.value)
    n = int(np.prod([x.value.shape[k] for k in axes]))
    s1, s2 = d_xhat.sum(axis=axes, keepdims=True), (d_xhat * xhat).sum(axis=axes, keepdims=True)
    s1_error, s1_shared = _summed(dxhat.error, dxhat.shared, axes, batch)
    s2_error, s2_shared = _with_x_hat(walk, i, dxhat, xhat, axes, normalized=True)
    s1_rounding = np.where(_exact_total(d_xhat, 1.0, axes, case), 0.0, walk.sum_rounding(d_xhat, axes))
    s2_rounding = _centred_rounding(walk, d_xhat, x.value, saved, axes)
    if batch:  # one value for every sample
        s1_shared, s2_shared = s1_shared + s1_rounding, s2_shared + s2_rounding
    else:
        s1_error, s2_error = s1_error + s1_rounding, s2_error + s2_rounding
    (mean_error, var_error), own, shared = saved["stats"], saved["own"], saved["shared"]
    stats = mean_error / s + np.abs(xhat) * var_error / (2 * s**2)
    xhat_error, xhat_shared = (own, shared + stats) if batch else (own + stats, shared)
    error = n * dxhat.error + s1_error + np.abs(xhat) * s2_error + np.abs(s2) * xhat_error
    error = error + 2 * u * (n * abs_dxhat + np.abs(s1) + magnitude * np.abs(s2))  # the numerator's own rounding
    shared = n * dxhat.shared + s1_shared + np.abs(xhat) * s2_shared + np.abs(s2) * xhat_shared
    d_x = np.abs(_f64(walk.trace[i - 1].dA))
    moved = var_error / (2 * s**2)  # s's relative error from var's: alike for all normalized together
    s_error, s_shared = (0.0, moved) if batch else (moved, 0.0)
    return error / (n * s) + d_x * (s_error + 2 * u), shared / (n * s) + d_x * s_shared
