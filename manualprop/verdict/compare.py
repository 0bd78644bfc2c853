"""How a mismatch is decided: one comparison helper, used for engine pairs and golden values.

The rule, element by element, for values ``a`` and ``b`` of a parameter whose value before the
step is ``p``::

    |a - b| <= atol * (1 + |p|) + rtol * max(|a|, |b|)

The absolute part grows with the parameter's magnitude because a delta computed as
``(p - lr * g) - p`` carries a rounding error of order ``eps * |p|`` whatever the size of the
delta: a purely relative tolerance would fail on small deltas of large weights. For losses and
golden values there is no ``p`` and the rule is ``|a - b| <= atol + rtol * max(|a|, |b|)``.
A NaN or an infinity never passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# (rtol, atol) per dtype. Measured engine-to-engine agreement on the bundled cases: about
# 6e-8 absolute in float32 for |p| <= 1, about 2e-16 in float64. The defaults leave one to two
# orders of magnitude of margin and stay far below what a real slip produces (a wrong
# derivative, a dropped 1/N, a wrong slope all change deltas by tens of per cent).
DEFAULT_TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-6),
    "float64": (1e-9, 1e-13),
}
# Golden values are usually printed to 7 or 8 significant digits.
EXPECTED_TOLERANCE: tuple[float, float] = (1e-6, 1e-7)


@dataclass(frozen=True)
class Comparison:
    """The outcome of comparing two arrays, with what a reader needs to act on a mismatch."""

    param: str
    a: str
    b: str
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    ok: bool
    worst_ratio: float = 0.0  # the largest |a - b| / allowed: 1.0 is the edge of the tolerance
    mismatched: int = 0
    total: int = 0
    worst_index: tuple = ()
    worst_a: float = 0.0
    worst_b: float = 0.0
    message: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "extra"} | self.extra


def tolerated(rtol: float, atol: float, magnitude: ArrayLike, reference: ArrayLike | None = None) -> np.ndarray:
    """What the rule allows element by element: atol (1 + |p|) + rtol |magnitude| (atol alone without p)."""
    scale = 1.0 if reference is None else 1.0 + np.abs(np.asarray(reference, dtype=np.float64))
    return atol * scale + rtol * np.abs(np.asarray(magnitude, dtype=np.float64))


def compare(
    param: str,
    a_name: str,
    a: ArrayLike,
    b_name: str,
    b: ArrayLike,
    rtol: float,
    atol: float,
    reference: ArrayLike | None = None,
    allowance: ArrayLike = 0.0,
    shown_as: str | None = None,
) -> Comparison:
    """Compare ``a`` with ``b`` under the rule above; ``reference`` is ``p``, the value before the step.

    ``allowance`` widens the tolerance element by element by what an engine knows of its own
    uncertainty (the finite-difference oracle's). ``shown_as`` is the name the case file gives
    the parameter: ``layers.0.weight`` for a kernel written (out, in), whose message then gives
    the worst element's index in that layout. The fields keep the (in, out) layout.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    base: dict[str, Any] = {"param": param, "a": a_name, "b": b_name, "atol": atol, "rtol": rtol, "total": int(a.size)}
    if a.shape != b.shape:
        return Comparison(
            **base,
            max_abs_diff=float("inf"),
            max_rel_diff=float("inf"),
            ok=False,
            worst_ratio=float("inf"),
            mismatched=int(max(a.size, b.size)),
            message=f"shape mismatch: {a_name} has shape {a.shape}, {b_name} has shape {b.shape}",
        )
    finite = np.isfinite(a) & np.isfinite(b)
    magnitude = np.maximum(np.abs(a), np.abs(b))
    plain = tolerated(rtol, atol, np.where(finite, magnitude, 0.0), reference)  # the rule without the allowance
    allowed = plain + np.asarray(allowance, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.where(finite, np.abs(a - b), np.inf)
        rel = np.where(diff == 0, 0.0, diff / magnitude)
        ratio = np.where(diff == 0, 0.0, diff / allowed)
    bad = ~finite | ~(diff <= allowed)  # a NaN or an infinity is never within a tolerance, even an unbounded allowance
    if a.size == 0:
        return Comparison(**base, max_abs_diff=0.0, max_rel_diff=0.0, ok=True)
    worst = np.unravel_index(int(np.argmax(ratio)), a.shape) if a.ndim else ()
    result = Comparison(
        **base,
        max_abs_diff=float(diff.max()),
        max_rel_diff=float(np.nan_to_num(rel, nan=np.inf).max()),
        ok=not bad.any(),
        worst_ratio=float(ratio.max()),
        mismatched=int(bad.sum()),
        worst_index=tuple(int(i) for i in worst),
        worst_a=float(a[worst]),
        worst_b=float(b[worst]),
    )
    beyond = finite & (diff > plain) & ~bad
    if beyond.any():  # within the allowance only: say so, and how far past the tolerance
        with np.errstate(divide="ignore"):
            past = float(np.max(np.where(beyond, diff / plain, 0.0)))
        result = replace(result, extra={**result.extra, "excused": {"elements": int(beyond.sum()), "beyond_tolerance": past}})
    if result.ok:
        return result
    before = None if reference is None or np.ndim(reference) != a.ndim else float(np.asarray(reference)[worst])
    return _with_message(
        result, float(np.broadcast_to(allowed, a.shape)[worst]), scaled=reference is not None, shown_as=shown_as, before=before
    )


def missing(param: str, a_name: str, b_name: str, rtol: float, atol: float, absent: str) -> Comparison:
    """A failed comparison for a parameter that engine ``absent`` returned no value for."""
    inf = float("inf")
    return Comparison(
        param=param,
        a=a_name,
        b=b_name,
        max_abs_diff=inf,
        max_rel_diff=inf,
        atol=atol,
        rtol=rtol,
        ok=False,
        worst_ratio=inf,
        message=f"{param}: {absent} returned no delta for it",
    )


def _with_message(
    c: Comparison, allowed_at_worst: float, scaled: bool, shown_as: str | None = None, before: float | None = None
) -> Comparison:
    """A mismatch described like torch.testing.assert_close, in the case's own terms: the name and
    the layout the case file uses, and the parameter's value there before the step."""
    name = shown_as or c.param
    index = c.worst_index[::-1] if name != c.param else c.worst_index
    where = f" at index {index}" if index else ""
    if before is not None:
        where += f" (before the step {before!r})"
    lines = [
        f"{name}: {c.a} and {c.b} disagree" + (" (shown (out, in), as the case file gives it)" if name != c.param else ""),
        f"  mismatched elements: {c.mismatched} / {c.total} ({100 * c.mismatched / max(c.total, 1):.1f}%)",
        f"  worst element{where}: {c.a} = {c.worst_a!r}, {c.b} = {c.worst_b!r}",
        f"  greatest absolute difference: {c.max_abs_diff:.3g} (allowed there: {allowed_at_worst:.3g})",
        f"  greatest relative difference: {c.max_rel_diff:.3g}",
        f"  tolerance: rtol={c.rtol:g}, atol={c.atol:g}" + (" (atol scaled by 1 + |value before the step|)" if scaled else ""),
    ]
    if not (np.isfinite(c.worst_a) and np.isfinite(c.worst_b)):
        lines.insert(1, "  a value is not finite (NaN or infinity): that never passes")
    return Comparison(**{**asdict(c), "message": "\n".join(lines)})
