"""What is exact and how large a rounding is: the reference's trace in a wider type (to tell an
exact result from a rounded one), where a sum is exact in any order (from its terms' lowest set
bits), the repeats and the dropped low bits of a sum added term by term, and the unit roundoff."""

from __future__ import annotations

import dataclasses

import numpy as np

from ...casefile.case import Case
from ...engines import LayerTrace, filled

Array = np.ndarray


def reference_trace(case: Case, params: dict[str, Array], dtype: type | None) -> list[LayerTrace] | None:
    """The NumPy reference's trace at ``params`` computed in ``dtype`` (None: none)."""
    if dtype is None:
        return None
    from ...reference import engine as reference

    targets = case.targets if np.issubdtype(case.targets.dtype, np.integer) else case.targets.astype(dtype)
    at = dataclasses.replace(
        case.with_parameters({name: p.astype(dtype) for name, p in params.items()}),
        dtype=np.dtype(dtype),
        inputs=case.inputs.astype(dtype),
        targets=targets,
    )
    try:
        traces = reference.forward(at)
        reference.backward(at, traces)
    except (ValueError, FloatingPointError):  # an input the reference cannot take: no estimate
        return None
    return traces


def _gradients(traces: list[LayerTrace]) -> dict[str, Array]:
    from ...reference import engine as reference

    return reference.gradients(traces)


def _exact_sums(x: np.ndarray, w: np.ndarray, case: Case, bias: np.ndarray | None = None) -> np.ndarray:
    """Where ``x @ w (+ bias)`` is exact in the case's dtype in whatever order an engine sums it:
    every term is a multiple of the smallest power of two dividing one of them, and the terms'
    magnitudes add up to less than 2^p times it (p the dtype's significand bits), so every product
    and every partial sum is representable. Too large to check (over 4e6 terms): nowhere."""
    rows, inner = x.shape
    cols = w.shape[1]
    if rows * inner * cols > 4_000_000:
        return np.zeros((rows, cols), dtype=bool)
    low = _lowest_bit(x)[:, :, None] + _lowest_bit(w)[None, :, :]  # each product's lowest set bit
    quantum = low.min(axis=1)
    if bias is not None:
        quantum = np.minimum(quantum, _lowest_bit(bias)[None, :])
    total = np.abs(x) @ np.abs(w) + (0.0 if bias is None else np.abs(bias))
    return _fits(total, quantum, case)


def _exact_total(a: Array, b: Array | float, axes: int | tuple[int, ...], case: Case) -> Array:
    """Where ``sum(a * b)`` over ``axes`` (kept, as size 1) is exact in any order, as :func:`_exact_sums`."""
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), np.shape(a))
    quantum = (_lowest_bit(a) + _lowest_bit(b)).min(axis=axes, keepdims=True)
    return _fits(np.abs(a * b).sum(axis=axes, keepdims=True), quantum, case)


def _fits(total: Array, quantum: Array, case: Case) -> Array:
    """Whether terms that are multiples of 2^quantum, adding up to ``total`` in magnitude, add exactly."""
    bits = np.finfo(case.dtype).nmant + 1
    limit = np.ldexp(1.0, np.clip(bits + np.nan_to_num(quantum, posinf=1023), -1074, 1023).astype(np.int64))
    return (total == 0) | (total < limit)


def _lowest_bit(v: np.ndarray) -> np.ndarray:
    """The exponent of each element's lowest set bit (v = odd * 2^that); a large number for 0, a
    term that adds nothing to a sum."""
    v = np.asarray(v, dtype=np.float64)
    mantissa, exponent = np.frexp(v)
    whole = np.abs(mantissa * 2.0**53).astype(np.int64)  # the 53-bit significand as an integer
    low = np.round(np.log2((whole & -whole).clip(min=1))).astype(np.int64)
    return np.where(v == 0, 10_000, exponent - 53 + low)


def _repeats(terms: Array, axes: tuple[int, ...]) -> Array:
    """Over the terms summed over ``axes`` (kept, as size 1), sqrt(sum of m^2) for each nonzero
    value that m > 1 of them share (adding 0 is exact)."""
    kept = [k for k in range(terms.ndim) if k not in axes]
    moved = np.moveaxis(terms, list(axes), list(range(len(kept), terms.ndim)))
    shape = moved.shape[: len(kept)]
    ordered = np.sort(moved.reshape(-1, int(np.prod(moved.shape[len(kept) :]))), axis=-1)
    groups, n = ordered.shape
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    runs = np.cumsum(starts, axis=1) - 1 + (n * np.arange(groups))[:, None]  # one id per run of equal values
    counts = np.bincount(runs.ravel(), weights=(ordered != 0).ravel().astype(np.float64), minlength=groups * n).reshape(groups, n)
    shared = np.sqrt(np.where(counts > 1, counts**2, 0.0).sum(axis=1))
    return np.expand_dims(shared.reshape(shape), tuple(axes))


def _truncated(terms: Array, axes: tuple[int, ...], unit: float) -> Array:
    """The rounding that adding terms one by one repeats alike: once the partial sum s_k = k
    mean is so large that the terms' spread is below its ulp (k > k0 = std / (unit |mean|)), the
    low bits of every term are dropped the same way, so the sum's error is up to unit sum(|s_k|)
    over k > k0: unit |mean| (n^2 - k0^2) / 2 (kept, as size 1). Measured: nearly equal float32
    values (1 + 1e-5 U(0, 1)) lose 25% of their spread in a mean over 256 of them."""
    n = int(np.prod([terms.shape[k] for k in axes]))
    mean = terms.mean(axis=axes, keepdims=True)
    spread = np.sqrt(((terms - mean) ** 2).mean(axis=axes, keepdims=True))
    start = np.clip(np.divide(spread, unit * np.abs(mean), out=np.full(mean.shape, float(n)), where=mean != 0), 0, n)
    return np.abs(mean) * (n**2 - start**2) / 2


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def wider(case: Case) -> type | None:
    """A floating type wider than the case's, to tell an exact result from a rounded one: float64
    for float32, the long double for float64 where it is wider (x86's 80-bit); else None, and no
    result is taken for exact."""
    if np.dtype(case.dtype) == np.float32:
        return np.float64
    return np.longdouble if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps else None


def unit(case: Case) -> float:
    return float(np.finfo(case.dtype).eps) / 2


def _f64(value: np.ndarray | None) -> np.ndarray:
    return np.asarray(filled(value), dtype=np.float64)
