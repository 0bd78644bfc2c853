"""Central finite differences: the independent reference the engine's derivatives are tested against."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f / d x by (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), element by element, in float64."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (f(up) - f(down)) / (2 * eps)
    return grad
