"""Gradients by central differences of the oracle's loss, each with its stated uncertainty.

For a number x (a parameter element, or one element of an intermediate Z or A) and the loss as
a function of it alone, in 128-bit MPFR arithmetic::

    dL/dx  ~  D = (L(x + h) - L(x - h)) / 2h          h = 2^-60 (1 + |x|), about 8.7e-19 (1 + |x|)

    uncertainty  =  |L(x + h) - 2 L(x) + L(x - h)| / h      the bend
                  + 2^-120 (|L(x + h)| + |L(x - h)| + 2 |L(x)|) / h   rounding of the evaluations
                  + 2^-52 |D|                                  rounding D to float64

Where the loss is smooth the bend is |f''| h, about 1e-18 |f''|: the central difference's own
error, |f'''| h^2 / 6, lies far below it. Where the loss has a kink within h of x (relu or
leaky_relu at exactly 0, mae where y = t) the bend is the jump of the slope there, so every
one-sided convention an engine may follow lies within the uncertainty. The rounding term holds
for 128-bit evaluations good to 2^-120 relative (eight bits spare): about 1e-20 |L| in all.

From the second step on, the parameters the oracle has reached are themselves uncertain (within
r of the exact trajectory's), and so is the gradient taken there: :func:`drift` estimates how far
it may move, |H| r with H the Hessian, from the gradient at two shifted points.
"""

from __future__ import annotations

from collections.abc import Callable

import gmpy2
import numpy as np

from .maths import to_float64

STEP = gmpy2.mpfr(2) ** -60
ROUNDING = gmpy2.mpfr(2) ** -120
FLOAT64 = 2.0**-52


def central_bound(loss: Callable[[gmpy2.mpfr], gmpy2.mpfr], x: gmpy2.mpfr, base: gmpy2.mpfr) -> tuple[gmpy2.mpfr, gmpy2.mpfr]:
    """dL/dx at ``x`` by a central difference, and its uncertainty in MPFR (the bend and the
    rounding of the evaluations, without rounding to float64); ``base`` is L(x)."""
    h = STEP * (1 + abs(x))
    up, down = loss(x + h), loss(x - h)
    slope = (up - down) / (2 * h)
    bend = abs(up - 2 * base + down) / h
    rounding = ROUNDING * (abs(up) + abs(down) + 2 * abs(base)) / h
    return slope, bend + rounding


def central(loss: Callable[[gmpy2.mpfr], gmpy2.mpfr], x: gmpy2.mpfr, base: gmpy2.mpfr) -> tuple[gmpy2.mpfr, float]:
    """dL/dx at ``x`` by a central difference, and its uncertainty as a float64 value is stated."""
    slope, error = central_bound(loss, x, base)
    return slope, float(error) + FLOAT64 * abs(float(slope))


def stated(grad: np.ndarray, error: np.ndarray) -> np.ndarray:
    """The uncertainty of a gradient rounded to float64: its own (MPFR) plus that rounding."""
    return to_float64(error) + FLOAT64 * np.abs(to_float64(grad))


def gradient(values: np.ndarray, loss_at: Callable[[tuple], gmpy2.mpfr], base: gmpy2.mpfr) -> tuple[np.ndarray, np.ndarray]:
    """dL/d(values) element by element: ``loss_at(index)`` is L with ``values`` as they stand,
    their element ``index`` moved.

    ``values`` (an object array of MPFR numbers) is changed one element at a time and restored.
    Returns the gradient and its uncertainty (:func:`central_bound`), both MPFR object arrays.
    """
    grad = np.empty(values.shape, dtype=object)
    uncertainty = np.empty(values.shape, dtype=object)
    for index in np.ndindex(values.shape):
        x = values[index]

        def loss(moved, index=index):
            values[index] = moved
            return loss_at(index)

        grad[index], uncertainty[index] = central_bound(loss, x, base)
        values[index] = x
    return grad, uncertainty


PROBE = 2.0**-30  # how far a probe moves the widest-bounded parameter, relative to 1 + |p|
SPREAD = 2  # the safety factor on the probes' largest change, before sqrt(n_eff)


def drift(
    gradient_at: Callable[[dict[str, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray]]],
    params: dict[str, np.ndarray],
    radius: dict[str, np.ndarray],
    here: dict[str, tuple[np.ndarray, np.ndarray]],
    seed: int,
) -> dict[str, np.ndarray]:
    """How far dL/dp may move when the parameters move anywhere within ``radius`` of ``params``.

    ``gradient_at(params)`` gives (gradient, uncertainty) per parameter, ``here`` is its value at
    ``params`` (it may hold other functions of the parameters too, as batch_norm's batch
    statistics: each is bounded the same way, by its name). Two probes move every parameter by K * radius, one with every sign +, one with
    seeded random signs, K a power of two that brings the widest move to ``PROBE`` (1 + |p|) (at
    least 1); the change of the gradient over K estimates H (radius * signs), H the Hessian. The
    bound is ``SPREAD sqrt(n_eff)`` times the larger change, n_eff = (sum r)^2 / sum r^2 the
    number of parameters the radii effectively spread over (a sum of n signed terms is about
    sqrt(n) times smaller than the sum of their sizes), plus the probes' own uncertainty over K.
    An estimate, not a proof: a row of the Hessian whose terms cancel in both probes would be
    underestimated.
    """
    widest = max((float(np.max(r / (1 + np.abs(params[name])))) for name, r in radius.items()), default=0.0)
    if not np.isfinite(widest):  # parameters that may lie anywhere: so may the gradient
        return {name: 0 * value + gmpy2.inf() for name, (value, _) in here.items()}
    if not widest > 0:
        return {name: 0 * value for name, (value, _) in here.items()}
    scale = gmpy2.mpfr(2) ** max(0, int(np.floor(np.log2(PROBE / widest))))
    sizes = np.concatenate([to_float64(r).ravel() for r in radius.values()])
    sizes = sizes / sizes.max() if sizes.max() > 0 else np.ones_like(sizes)
    spread = SPREAD * float(np.sqrt(sizes.sum() ** 2 / np.square(sizes).sum()))
    rng = np.random.default_rng(seed)
    change = {name: 0 * value for name, (value, _) in here.items()}
    noise = dict(change)
    for random_signs in (False, True):
        signs = {
            name: rng.choice([-1, 1], size=r.shape) if random_signs else np.ones(r.shape, dtype=int) for name, r in radius.items()
        }
        moved = gradient_at({name: params[name] + scale * signs[name] * radius[name] for name in radius})
        for name, (grad, error) in here.items():
            other, other_error = moved[name]
            change[name] = np.maximum(change[name], np.abs(other - grad) / scale)
            noise[name] = np.maximum(noise[name], (error + other_error) / scale)
    return {name: spread * change[name] + noise[name] for name in here}
