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
"""

from __future__ import annotations

from typing import Callable

import gmpy2
import numpy as np

STEP = gmpy2.mpfr(2) ** -60
ROUNDING = gmpy2.mpfr(2) ** -120
FLOAT64 = 2.0**-52


def central(loss: Callable[[object], object], x: object, base: object) -> tuple[object, float]:
    """dL/dx at ``x`` by a central difference, and its uncertainty; ``base`` is L(x)."""
    h = STEP * (1 + abs(x))
    up, down = loss(x + h), loss(x - h)
    slope = (up - down) / (2 * h)
    bend = abs(up - 2 * base + down) / h
    rounding = ROUNDING * (abs(up) + abs(down) + 2 * abs(base)) / h
    return slope, float(bend + rounding) + FLOAT64 * abs(float(slope))


def gradient(values: np.ndarray, loss_with: Callable[[np.ndarray], object], base: object) -> tuple[np.ndarray, np.ndarray]:
    """dL/d(values) element by element: ``loss_with(values)`` is L with ``values`` in place.

    ``values`` (an object array of MPFR numbers) is changed one element at a time and restored.
    Returns the gradient (MPFR numbers) and its uncertainty (float64).
    """
    grad = np.empty(values.shape, dtype=object)
    uncertainty = np.zeros(values.shape)
    for index in np.ndindex(values.shape):
        x = values[index]

        def loss(moved, index=index):
            values[index] = moved
            return loss_with(values)

        grad[index], uncertainty[index] = central(loss, x, base)
        values[index] = x
    return grad, uncertainty
