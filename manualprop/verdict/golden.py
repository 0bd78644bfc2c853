"""Hints for golden values that fail while the engines agree: where did a hand computation go wrong?

When every engine agrees and a value under ``expected:`` does not, the person's own numbers are
what is wrong. :func:`golden_hints` tries the slips a hand computation of one SGD step commonly
makes (a transposed kernel, the wrong section, no update at all, a missing learning rate, a
flipped sign, a constant factor, one wrong element, row or column, too few digits) and returns one
sentence per slip that fits, most likely first, each naming the slip and the numbers. "Fits"
always means: holds under the golden tolerance, judged by :func:`manualprop.verdict.compare.compare`.

Every index printed is in the layout the person wrote: (out, in) for ``weight:``, (in, out) for
``kernel:``. Plain SGD is assumed: ``delta = -lr * g``, so the gradient is ``g = -delta / lr``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .compare import compare

_DIGITS = 17  # a float64 never needs more significant digits than this
_USUAL = "N, 1/N, 2, 1/2, lr, 1/lr, the loss scale or the number of outputs"
_SIGN = {
    "updated": "the sign is flipped (the gradient added, not subtracted)",
    "deltas": "the sign is flipped (the gradient added, not subtracted)",
    "loss": "the sign is flipped",
}
_SUBJECT = {"updated": "the change from before the step", "deltas": "the delta", "loss": "the loss"}


@dataclass(frozen=True)
class _Golden:
    """One failing golden value and what the agreeing engines computed for it; kernels (in, out)."""

    kind: str
    param: str
    given: np.ndarray  # float64
    delta: np.ndarray  # the engines' delta (for "loss": the engines' loss)
    base: np.ndarray  # the value before the step for "updated", zeros otherwise
    other: np.ndarray  # the base of the other section: a swapped section holds other + delta
    lr: float
    rtol: float
    atol: float
    batch: int
    outputs: int
    scale: float
    layout: str

    @property
    def target(self) -> np.ndarray:
        return self.base + self.delta

    def holds(self, a: np.ndarray, b: np.ndarray, rtol: float | None = None, atol: float | None = None) -> bool:
        """a matches b element by element, under the golden tolerance unless told otherwise."""
        rtol, atol = self.rtol if rtol is None else rtol, self.atol if atol is None else atol
        return compare(self.param, "given", a, "engines", b, rtol, atol).ok

    def fits(self, factor: float) -> bool:
        """The given values are base + factor * delta."""
        return self.holds(self.given, self.base + factor * self.delta)

    def near_one(self, factor: float) -> bool:
        return self.holds(np.array(factor), np.array(1.0))

    def name(self, key: str) -> str:
        return re.sub(r"\.(kernel|weight)$", f".{key}", self.param)

    @property
    def shown(self) -> str:
        """The parameter as the person named it."""
        return self.name("weight") if self.layout == "weight" else self.param

    def mine(self, array: np.ndarray) -> np.ndarray:
        """An array in the person's layout."""
        return array.T if self.layout == "weight" and array.ndim == 2 else array

    def at(self, index: tuple) -> str:
        """An element named in the person's layout, from its (in, out) index."""
        index = tuple(index)[::-1] if self.layout == "weight" and len(index) == 2 else tuple(index)
        return f"{self.shown}[{', '.join(str(int(i)) for i in index)}]" if index else self.shown


def golden_hints(
    kind: str,
    param: str,
    given: np.ndarray,
    delta: np.ndarray,
    initial: np.ndarray | None,
    lr: float,
    rtol: float,
    atol: float,
    *,
    batch: int = 1,
    outputs: int = 1,
    scale: float = 1.0,
    layout: str = "kernel",
) -> list[str]:
    """Sentences naming the slips that explain a golden value the agreeing engines do not reach.

    ``kind`` is "updated", "deltas" or "loss"; ``given`` the person's value as loaded (kernels
    (in, out)); ``delta`` the engines' delta (for "loss", their loss as a 0-d array, and
    ``initial`` None); ``initial`` the parameter before the step. ``layout`` is "weight" when the
    person wrote the parameter in the (out, in) layout. Most likely slip first; [] when none fits.
    """
    g = _golden(kind, param, given, delta, initial, lr, rtol, atol, batch, outputs, scale, layout)
    if g is None or g.holds(g.given, g.target):
        return []
    with np.errstate(all="ignore"):
        for tier in _TIERS[kind]:
            hints = [hint for check in tier if (hint := check(g)) is not None]
            if hints:
                return hints
    return []


def _golden(kind, param, given, delta, initial, lr, rtol, atol, batch, outputs, scale, layout) -> _Golden | None:
    """The value and its context in float64; None when it cannot be read as one of these kinds."""
    given, delta = np.asarray(given, dtype=np.float64), np.asarray(delta, dtype=np.float64)
    before = np.zeros_like(delta) if initial is None else np.asarray(initial, dtype=np.float64)
    sizes_ok = lr > 0 and batch >= 1 and outputs >= 1 and scale != 0
    if kind not in _TIERS or not sizes_ok or given.shape != delta.shape or before.shape != delta.shape:
        return None
    zero = np.zeros_like(delta)
    base, other = {"updated": (before, zero), "deltas": (zero, before)}.get(kind, (zero, zero))
    return _Golden(
        kind,
        param,
        given,
        delta,
        base,
        other,
        float(lr),
        float(rtol),
        float(atol),
        int(batch),
        int(outputs),
        float(scale),
        layout,
    )


# -- the slips -----------------------------------------------------------------------------


def _transposed(g: _Golden) -> str | None:
    """A square kernel written in the other layout: the given values are the target transposed."""
    mine, target = g.mine(g.given), g.mine(g.target)
    if mine.ndim != 2 or mine.shape != mine.T.shape or g.holds(target, target.T) or not g.holds(mine, target.T):
        return None
    i, j = compare(g.param, "given", mine, "engines", target, g.rtol, g.atol).worst_index
    a, b = _distinct(mine[i, j], target[i, j])
    wrote, key, takes, other = {
        "kernel": ("(out, in)", "kernel", "(in, out)", "weight"),
        "weight": ("(in, out)", "weight", "(out, in)", "kernel"),
    }[g.layout]
    return (
        f"transposed: the values are written in the {wrote} layout, where `{key}:` takes {takes}; "
        f"give them under `{g.name(other)}:` instead ({g.shown}[{i}, {j}] is {a}, the engines' [{j}, {i}]; "
        f"their [{i}, {j}] is {b})."
    )


def _swapped(g: _Golden) -> str | None:
    """The deltas written under `updated:`, or the updated values under `deltas:`."""
    if not g.holds(g.given, g.other + g.delta):
        return None
    i = _largest(g)
    a, b = _distinct(g.given[i], g.target[i])
    return {
        "updated": f"the deltas written under `updated:`: {g.at(i)} is {a}, the engines' delta, where the value "
        f"after the step is {b}; move it under `deltas:`.",
        "deltas": f"the values after the step written under `deltas:`: {g.at(i)} is {a}, the engines' updated "
        f"value, where the delta is {b}; move it under `updated:`.",
    }[g.kind]


def _unchanged(g: _Golden) -> str | None:
    """No update at all: the values before the step under `updated:`, zeros under `deltas:`."""
    if not g.fits(0.0):
        return None
    i = _largest(g)
    a, b = _distinct(g.given[i], g.target[i])
    return {
        "updated": f"no update applied: the values are those before the step ({g.at(i)} is {a}; the engines move it to {b}).",
        "deltas": f"the deltas are all zero where the engines' are not ({g.at(i)} is {a}, the engines' {b}).",
    }[g.kind]


def _factor(g: _Golden) -> str | None:
    """A constant factor on the step (or on the loss): named when it is a usual slip, else printed."""
    for sign, flipped in ((1.0, []), (-1.0, [_SIGN[g.kind]])):
        named = [(sign * v, why) for v, why in _REASONS[g.kind](g) if not g.near_one(v) and g.fits(sign * v)]
        if named or (flipped and g.fits(-1.0)):
            factor = named[0][0] if named else -1.0
            reasons = flipped + (["; or ".join(why for _, why in named)] if named else [])
            return _factor_sentence(g, factor, reasons)
    ratio = _ratio(g)
    if ratio is None or ratio == 0 or g.near_one(ratio) or not g.fits(ratio):
        return None
    return _factor_sentence(g, ratio, [f"a constant factor, none of the usual slips ({_USUAL})"])


def _one_element(g: _Golden) -> str | None:
    """Every element holds but one."""
    c = compare(g.param, "given", g.given, "engines", g.target, g.rtol, g.atol)
    if c.mismatched != 1 or g.given.size < 2:
        return None
    return f"one element is wrong: {_example(g, c.worst_index, before=True)}; every other element holds."


def _one_line(g: _Golden) -> str | None:
    """Every row (or every column) of the person's layout holds but one, with several elements off."""
    mine, target = g.mine(g.given), g.mine(g.target)
    if mine.ndim != 2:
        return None
    for axis, word in ((0, "row"), (1, "column")):
        wrong = [r for r in range(mine.shape[axis]) if not g.holds(mine.take(r, axis), target.take(r, axis))]
        if (
            len(wrong) == 1
            and mine.shape[axis] > 1
            and _mismatched(g, mine.take(wrong[0], axis), target.take(wrong[0], axis)) > 1
        ):
            a, b = _rows(g, mine.take(wrong[0], axis), target.take(wrong[0], axis))
            return (
                f"one {word} is wrong: {word} {wrong[0]} of {g.shown} ({_LINE_MEANING[(g.layout, axis)]} {wrong[0]}) "
                f"is {a}, the engines' {b}; every other {word} holds."
            )
    return None


def _rounded(g: _Golden) -> str | None:
    """Every value right to the digits written, but fewer digits than the tolerance asks for."""
    failing, needed, written = _failing(g), _needed(g.rtol), _written(g)
    held = _agreement(g, failing)
    if not 2 <= held < needed or not all(_holds_to(g, w, failing & (written == w)) for w in set(written[failing].tolist())):
        return None
    values, hold = ("values", "hold") if g.given.size > 1 else ("value", "holds")
    return (
        f"too few digits: the {values} {hold} to {held} significant digits ({_example(g, _worst(g))}); "
        f"the tolerance ({_tolerance(g)}) asks for about {needed}: print more digits."
    )


def _short(g: _Golden) -> str | None:
    """Written with many digits, right to only a few of them: rounded along the way."""
    failing, needed = _failing(g), _needed(g.rtol)
    held = _agreement(g, failing)
    if not 3 <= held < needed:
        return None
    values, agree, up_to = ("values", "agree", "up to ") if g.given.size > 1 else ("value", "agrees", "")
    return (
        f"too few digits carried: the {values} {agree} with the engines to {held} significant digits only, though "
        f"written with {up_to}{int(_written(g)[failing].max())} ({_example(g, _worst(g))}); the tolerance "
        f"({_tolerance(g)}) asks for about {needed}: carry more digits through the intermediate results."
    )


# -- the named factors ---------------------------------------------------------------------


def _step_reasons(g: _Golden) -> list[tuple[float, str]]:
    """(factor on the engines' delta, the slip that makes it) for updated values and deltas."""
    n, k, s, lr = g.batch, g.outputs, g.scale, g.lr
    both = [(n * k, f"the mean over all N x {k} = {n * k} values is missing (a sum where the loss averages)")]
    return [
        (1 / lr, f"the learning rate {lr:g} is left out"),
        (lr, f"the learning rate {lr:g} is applied twice"),
        (n, f"the 1/N of the mean is missing (N = {n}; the gradient summed over the samples, not averaged)"),
        (1 / n, f"the gradient is divided by the batch size N = {n} once too often"),
        (
            2.0,
            "a factor 2 too many (the 2 of d/dy (y - t)^2 = 2(y - t) counted twice, or kept where a 1/2 in the loss cancels it)",
        ),
        (0.5, "the 2 of d/dy (y - t)^2 = 2(y - t) is missing (the derivative of 1/2 (y - t)^2 used)"),
        (k, f"the 1/{k} for the {k} outputs is missing (mse and mae average every element, not only over samples)"),
        (1 / k, f"divided by the {k} outputs as well, where the loss averages over samples only"),
        *(both if n > 1 and k > 1 else []),
        (s, f"the loss scale {s:g} is applied twice"),
        (1 / s, f"the loss scale {s:g} is left out"),
    ]


def _loss_reasons(g: _Golden) -> list[tuple[float, str]]:
    """(factor on the engines' loss, the slip that makes it)."""
    n, k, s = g.batch, g.outputs, g.scale
    both = [(n * k, f"the sum of all N x {k} = {n * k} values where the case takes their mean")]
    return [
        (2.0, "a factor 2 too many"),
        (0.5, "a 1/2 in front of the loss that the case does not have (it would say scale: 0.5)"),
        (n, f"the sum over the N = {n} samples where the case takes the mean"),
        (1 / n, f"the mean over the N = {n} samples where the case takes the sum"),
        (k, f"the mean over samples only, where mse and mae average all N x {k} values"),
        (1 / k, f"divided by the {k} outputs as well, where the case averages over samples only"),
        *(both if n > 1 and k > 1 else []),
        (s, f"the loss scale {s:g} applied twice"),
        (1 / s, f"the loss scale {s:g} left out"),
    ]


def _factor_sentence(g: _Golden, factor: float, reasons: list[str]) -> str:
    """'<slips>: <subject> is <factor> times the engines' (<formula>); <an element>.'"""
    relation = "has the opposite sign to the engines'" if factor == -1.0 else f"is {_times(factor)} times the engines'"
    return (
        f"{' and '.join(reasons)}: {_SUBJECT[g.kind]} {relation}{_formula(g, factor)}; {_example(g, _largest(g), before=True)}."
    )


def _formula(g: _Golden, factor: float) -> str:
    """The person's step against SGD's, when the factor is a matter of lr and sign: ' (p - g instead of p - lr*g)'."""
    coefficient = next((c for v, c in ((1.0, "lr*"), (1 / g.lr, ""), (g.lr, "lr^2*")) if math.isclose(abs(factor), v)), None)
    if coefficient is None or g.kind == "loss":
        return ""
    sign = "+" if factor < 0 else "-"
    return {"updated": f" (p {sign} {coefficient}g instead of p - lr*g)", "deltas": f" ({sign}{coefficient}g instead of -lr*g)"}[
        g.kind
    ]


def _ratio(g: _Golden) -> float | None:
    """The median of (given - base) / delta over the elements whose delta is not negligible."""
    seen = np.abs(g.delta) > 1e-3 * np.abs(g.delta).max(initial=0.0)
    if seen.sum() < 2:  # a single number always has "a factor": that says nothing
        return None
    return float(np.median((g.given - g.base)[seen] / g.delta[seen]))


# -- digits --------------------------------------------------------------------------------


def _failing(g: _Golden) -> np.ndarray:
    """Which values (raveled) miss the golden tolerance: the ones whose digits are in question."""
    pairs = zip(np.ravel(g.given), np.ravel(g.target), strict=True)
    return np.array([not g.holds(np.array(a), np.array(b)) for a, b in pairs], dtype=bool)


def _holds_to(g: _Golden, digits: int, mask: np.ndarray) -> bool:
    """The given values in ``mask`` match the target to ``digits`` significant digits: within half
    a unit of that digit, counted from the target's first significant digit."""
    given, target = np.ravel(g.given)[mask], np.ravel(g.target)[mask]
    decade = 10.0 ** np.floor(np.log10(np.maximum(np.abs(target), np.finfo(np.float64).tiny)))
    return g.holds(given / decade, target / decade, rtol=0.0, atol=0.5 * 10.0 ** (1 - digits) * (1 + 1e-9))


def _agreement(g: _Golden, mask: np.ndarray) -> int:
    """How many significant digits every given value in ``mask`` shares with the target (0: none)."""
    return max((k for k in range(1, _DIGITS + 1) if _holds_to(g, k, mask)), default=0)


def _needed(rtol: float) -> int:
    """The significant digits the golden rtol asks for: half a unit of the last one within rtol."""
    return _DIGITS if rtol <= 0 else min(_DIGITS, max(1, math.ceil(round(1 + math.log10(0.5 / rtol), 9))))


def _written(g: _Golden) -> np.ndarray:
    """The significant digits the person wrote for each value (a float32 value counted as float32)."""
    return np.array([_significant(float(v)) for v in np.ravel(g.given)], dtype=int)


def _significant(value: float) -> int:
    """Significant digits of the shortest repr; of the float32 one when the value is a float32."""
    reprs = [value] + ([np.float32(value)] if math.isfinite(value) and float(np.float32(value)) == value else [])
    digits = [np.format_float_scientific(v, unique=True).split("e")[0].lstrip("-").replace(".", "").rstrip("0") for v in reprs]
    return max(1, min(len(d) for d in digits))


# -- numbers in sentences ------------------------------------------------------------------


def _precision(*values: float) -> int | None:
    """The fewest significant digits (at least 4) that keep different numbers apart; None: repr."""
    values = tuple(float(v) for v in values)
    return next((d for d in range(4, _DIGITS + 1) if len({f"{v:.{d}g}" for v in values}) == len(set(values))), None)


def _distinct(*values: float) -> list[str]:
    """The numbers, printed so that no two different ones look alike."""
    digits = _precision(*values)
    return [repr(float(v)) if digits is None else f"{float(v):.{digits}g}" for v in values]


def _rows(g: _Golden, a: np.ndarray, b: np.ndarray, most: int = 8) -> tuple[str, str]:
    """Two rows at one precision, enough to tell apart every pair of elements that mismatch."""
    wrong = [_precision(x, y) for x, y in zip(a, b, strict=True) if not g.holds(np.array(x), np.array(y))]
    digits = max((_DIGITS if d is None else d for d in wrong), default=4)

    def shown(row: np.ndarray) -> str:
        return "[" + ", ".join(f"{v:.{digits}g}" for v in row[:most]) + (", ...]" if len(row) > most else "]")

    return shown(a), shown(b)


def _example(g: _Golden, index: tuple, before: bool = False) -> str:
    """'layers.0.kernel[1, 0] is 0.25, the engines' 0.2498' (and, if asked, the value before the step)."""
    a, b, p = _distinct(g.given[index], g.target[index], g.base[index])
    head = f"{g.at(index)} is {a}" if index else f"given {a}"
    return f"{head}, the engines' {b}" + (f", from {p} before the step" if before and g.kind == "updated" else "")


def _largest(g: _Golden) -> tuple:
    """The index of the engines' largest change: the element where a slip shows most."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(g.delta))), g.delta.shape))


def _worst(g: _Golden) -> tuple:
    return compare(g.param, "given", g.given, "engines", g.target, g.rtol, g.atol).worst_index


def _mismatched(g: _Golden, a: np.ndarray, b: np.ndarray) -> int:
    return compare(g.param, "given", a, "engines", b, g.rtol, g.atol).mismatched


def _times(factor: float) -> str:
    """A factor as a person writes it: 4, -10, 1/4, or as many digits as tell it from 1."""
    whole = round(factor)
    if whole != 0 and math.isclose(factor, whole, rel_tol=1e-9):
        return str(whole)
    inverse = round(1 / factor) if factor else 0
    if abs(inverse) >= 2 and math.isclose(1 / factor, inverse, rel_tol=1e-9):
        return f"{'-' if inverse < 0 else ''}1/{abs(inverse)}"
    return _distinct(factor, 1.0)[0]


def _tolerance(g: _Golden) -> str:
    """'rtol 1e-6, atol 1e-7', as a case file writes it."""
    return f"rtol {_short_float(g.rtol)}, atol {_short_float(g.atol)}"


def _short_float(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-").replace("e+0", "e+")


_LINE_MEANING = {
    ("weight", 0): "the weights into unit",
    ("weight", 1): "the weights from input",
    ("kernel", 0): "the weights from input",
    ("kernel", 1): "the weights into unit",
}
_REASONS: dict[str, Callable[[_Golden], list[tuple[float, str]]]] = {
    "updated": _step_reasons,
    "deltas": _step_reasons,
    "loss": _loss_reasons,
}
_STEP_TIERS = ((_transposed, _swapped, _unchanged, _factor), (_rounded,), (_one_element, _one_line), (_short,))
# Tried tier by tier, most likely first: the first tier with a slip that fits gives the hints.
_TIERS: dict[str, tuple[tuple[Callable[[_Golden], str | None], ...], ...]] = {
    "updated": _STEP_TIERS,
    "deltas": _STEP_TIERS,
    "loss": ((_factor,), (_rounded,), (_short,)),
}

__all__ = ["golden_hints"]
