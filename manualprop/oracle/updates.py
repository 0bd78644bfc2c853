"""The oracle's optimizers: SPEC section 7's updates on bounded MPFR numbers, written from the SPEC.

Every update is written as ``p <- p - lr * d`` and returns the direction ``d`` (adamw's decay is
``p (1 - lr wd) = p - lr (wd p)``), updating the state (a dict of Bounded arrays, by the
formula's names) in place; ``t`` counts from 1::

    sgd      g <- g + wd p; b <- mu b + g; d = g + mu b if nesterov else b   (mu = 0: d = g)
    adam     m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; (amsgrad: vmax <- max(vmax, v));
             d = (m / (1-b1^t)) / (sqrt(v or vmax / (1-b2^t)) + eps)
    adamw    d = wd p + the adam direction, with g taken before the decay
    rmsprop  s <- rho s + (1-rho) g^2; centered: a <- rho a + (1-rho) g, s~ = s - a^2, else s~ = s;
             q = g / (sqrt(s~) + eps); momentum mu: b <- mu b + q, d = b; else d = q
    adagrad  acc <- acc + g^2 (from initial_accumulator); d = g / (sqrt(acc) + eps)

A :class:`Bounded` number is the oracle's value ``x`` (128-bit MPFR) with two enclosures of the
exact value, both rigorous, whichever is tighter read at each use:

- affine: ``x + sum_k terms[k] e_k + rest * e``, every e in [-1, 1]; symbol k is the error of the
  gradient taken at step k (one per element: the updates work element by element), so what is
  built from the same gradient keeps its correlation (Adam's m and v, the parameter in a weight
  decay) and m^/sqrt(v^) is bounded by its true sensitivity, not by its operands' widths. The
  rest holds the products of two deviations and the curvature of sqrt and 1/z over the operand's
  whole range (bounded at its ends, where a concave or convex gap is largest);
- an interval [low, high] computed end to end: a square is >= 0, a square root's argument has
  no exact value below 0, a divisor sqrt(v) + eps stays >= eps, amsgrad's max is monotone, and
  Adam's, RMSprop's and Adagrad's steps have a priori bounds (``within``), which keep a gradient
  of unknown sign (its interval holds 0) to at most one step of lr.

Each operation grows both by 2^-120 of the magnitudes involved, for its 128-bit roundings.
"""

from __future__ import annotations

from collections.abc import Callable

import gmpy2
import numpy as np

SLACK = gmpy2.mpfr(2) ** -120  # relative: the roundings of one 128-bit operation, with room


def mpfr(value: float | bool) -> gmpy2.mpfr:
    """A hyperparameter as the case states it: the binary64 number converts exactly."""
    return gmpy2.mpfr(float(value))


def _zeros(x):
    return np.full(x.shape, gmpy2.mpfr(0), dtype=object) if isinstance(x, np.ndarray) else gmpy2.mpfr(0)


def _root(x, lower, upper):
    """sqrt near x >= 0 over [lower, upper], the part below 0 left out (no exact value lies there):
    sqrt(x), the slope s at x and max |sqrt(z) - sqrt(x) - s (z - x)|, at an end as the gap is concave."""
    root = gmpy2.sqrt(x)
    if not x > 0:  # 0 (or nan): sqrt(z) lies in [0, sqrt(upper)]
        return root, 0 * root, gmpy2.sqrt(max(upper, 0 * upper))
    slope = 1 / (2 * root)

    def gap(z):
        z = max(z, 0 * z)
        return abs(gmpy2.sqrt(z) - root - slope * (z - x))

    return root, slope, max(gap(lower), gap(upper))


def _inverse(y, lower, upper):
    """1/z near y over [lower, upper]: 1/y, the slope -1/y^2 and max |1/z - 1/y + (z - y)/y^2|,
    at an end as the gap is convex (concave below 0); unbounded where z may reach 0."""
    if not (lower > 0 or upper < 0):
        return 1 / y, 0 * y, gmpy2.inf()
    slope = -1 / (y * y)
    return 1 / y, slope, max(abs(1 / z - 1 / y - slope * (z - y)) for z in (lower, upper))


def _reciprocal_ends(lower, upper):
    """1/z over [lower, upper]: [1/upper, 1/lower] when 0 is outside, else everything."""
    if lower > 0 or upper < 0:
        return 1 / upper, 1 / lower
    return -gmpy2.inf(), gmpy2.inf()


def _root_ends(lower, upper):
    """sqrt over [lower, upper], the part below 0 left out."""
    return gmpy2.sqrt(max(lower, 0 * lower)), gmpy2.sqrt(max(upper, 0 * upper))


def _square_ends(lower, upper):
    """z^2 over [lower, upper]: 0 at the bottom when the interval holds 0."""
    low, high = lower * lower, upper * upper
    return (min(low, high) if lower > 0 or upper < 0 else 0 * low), max(low, high)


def _product_ends(a, b, c, d):
    """z w over z in [a, b], w in [c, d]: the least and the largest of the four corners (an
    infinite end times 0 counts as unbounded)."""
    corners = [a * c, a * d, b * c, b * d]
    if any(gmpy2.is_nan(v) for v in corners):
        return -gmpy2.inf(), gmpy2.inf()
    return min(corners), max(corners)


_ROOT = np.frompyfunc(_root, 3, 3)
_INVERSE = np.frompyfunc(_inverse, 3, 3)
_ROOT_ENDS = np.frompyfunc(_root_ends, 2, 2)
_RECIPROCAL_ENDS = np.frompyfunc(_reciprocal_ends, 2, 2)
_SQUARE_ENDS = np.frompyfunc(_square_ends, 2, 2)
_PRODUCT_ENDS = np.frompyfunc(_product_ends, 4, 2)
_UNBOUNDED_IF_NAN = np.frompyfunc(lambda r: gmpy2.inf() if gmpy2.is_nan(r) else r, 1, 1)


def _outwards(low, high):
    """Interval ends moved outwards by the rounding of the operation that gave them."""
    return low - SLACK * np.abs(low), high + SLACK * np.abs(high)


class Bounded:
    """The oracle's value ``x`` (MPFR, a scalar or an object array), and where the exact value
    lies: ``x + sum_k terms[k] e_k + rest e`` (every e in [-1, 1]) and within [low, high]."""

    __slots__ = ("high", "low", "rest", "terms", "x")

    def __init__(self, x, terms: dict | None = None, rest=None, ends: tuple | None = None):
        self.x = x
        self.terms = terms or {}
        self.rest = _zeros(x) if rest is None else rest
        self.low, self.high = ends if ends is not None else (None, None)

    @staticmethod
    def of(value) -> Bounded:
        return value if isinstance(value, Bounded) else Bounded(value)

    @staticmethod
    def uncertain(x, radius, symbol: int) -> Bounded:
        """x with the exact value within ``radius``, an error of its own named ``symbol``."""
        return Bounded(x, {symbol: radius})

    @property
    def spread(self):
        """The affine enclosure's half width: the sizes of every term and the rest."""
        total = self.rest
        for coefficient in self.terms.values():
            total = total + np.abs(coefficient)
        return total

    @property
    def lower(self):
        """The lowest the exact value may be, by either enclosure."""
        affine = self.x - self.spread
        return affine if self.low is None else np.maximum(affine, self.low)

    @property
    def upper(self):
        affine = self.x + self.spread
        return affine if self.high is None else np.minimum(affine, self.high)

    @property
    def radius(self):
        """|x - exact| at most: the affine spread, or the distance to the interval's far end."""
        spread = self.spread
        if self.low is None:
            return spread
        interval = np.maximum(np.maximum(self.x - self.low, self.high - self.x), _zeros(self.x)) + SLACK * np.abs(self.x)
        return np.minimum(spread, _UNBOUNDED_IF_NAN(interval))

    def _made(self, x, terms: dict, rest, ends: tuple) -> Bounded:
        """A result: its rest grown by the rounding of x and of the terms, its ends outwards."""
        size = np.abs(x) + rest
        for coefficient in terms.values():
            size = size + np.abs(coefficient)
        return Bounded(x, terms, _UNBOUNDED_IF_NAN(rest + SLACK * size), _outwards(*ends))

    def __neg__(self) -> Bounded:
        ends = None if self.low is None else (-self.high, -self.low)
        return Bounded(-self.x, {k: -c for k, c in self.terms.items()}, self.rest, ends)

    def __add__(self, other) -> Bounded:
        other = Bounded.of(other)
        terms = dict(self.terms)
        for k, c in other.terms.items():
            terms[k] = terms[k] + c if k in terms else c
        ends = (self.lower + other.lower, self.upper + other.upper)
        return self._made(self.x + other.x, terms, self.rest + other.rest, ends)

    __radd__ = __add__

    def __sub__(self, other) -> Bounded:
        return self + -Bounded.of(other)

    def __rsub__(self, other) -> Bounded:
        return Bounded.of(other) - self

    def _linear(self, other: Bounded, mine, theirs) -> dict:
        """The terms mine * self's + theirs * other's."""
        terms = {k: mine * c for k, c in self.terms.items()}
        for k, c in other.terms.items():
            terms[k] = terms[k] + theirs * c if k in terms else theirs * c
        return terms

    def __mul__(self, other) -> Bounded:
        """(x + dx)(y + dy) = xy + y dx + x dy + dx dy."""
        other = Bounded.of(other)
        terms = self._linear(other, other.x, self.x)
        rest = np.abs(other.x) * self.rest + np.abs(self.x) * other.rest + self.spread * other.spread
        ends = _PRODUCT_ENDS(self.lower, self.upper, other.lower, other.upper)
        return self._made(self.x * other.x, terms, rest, ends)

    __rmul__ = __mul__

    def __truediv__(self, other) -> Bounded:
        """(x + dx) (1/y + s dy + h): x/y + dx/y + x s dy, and dx s dy + (x + dx) h in the rest."""
        other = Bounded.of(other)
        lower, upper = other.lower, other.upper
        inverse, slope, curve = _INVERSE(other.x, lower, upper)
        terms = self._linear(other, inverse, self.x * slope)
        rest = (
            np.abs(inverse) * self.rest
            + np.abs(self.x * slope) * other.rest
            + self.spread * np.abs(slope) * other.spread
            + (np.abs(self.x) + self.spread) * curve
        )
        ends = _PRODUCT_ENDS(self.lower, self.upper, *_RECIPROCAL_ENDS(lower, upper))
        return self._made(self.x / other.x, terms, rest, ends)

    def square(self) -> Bounded:
        terms = {k: 2 * self.x * c for k, c in self.terms.items()}
        rest = 2 * np.abs(self.x) * self.rest + self.spread * self.spread
        return self._made(self.x * self.x, terms, rest, _SQUARE_ENDS(self.lower, self.upper))

    def sqrt(self) -> Bounded:
        """sqrt(x) + s dx + h."""
        lower, upper = self.lower, self.upper
        root, slope, curve = _ROOT(self.x, lower, upper)
        terms = {k: slope * c for k, c in self.terms.items()}
        return self._made(root, terms, slope * self.rest + curve, _ROOT_ENDS(lower, upper))

    def maximum(self, other: Bounded) -> Bounded:
        """Elementwise max: the affine form of the one surely larger where one is (else the
        interval as the rest); the interval [max of the lower ends, max of the upper ends]."""
        mine, theirs = self.lower >= other.upper, other.lower >= self.upper
        x = np.maximum(self.x, other.x)
        ends = (np.maximum(self.lower, other.lower), np.maximum(self.upper, other.upper))
        tangled = np.maximum(np.maximum(x - ends[0], ends[1] - x), _zeros(x))
        zero = _zeros(x)
        terms = {
            k: np.where(mine, self.terms.get(k, zero), np.where(theirs, other.terms.get(k, zero), zero))
            for k in set(self.terms) | set(other.terms)
        }
        rest = np.where(mine, self.rest, np.where(theirs, other.rest, tangled))
        return self._made(x, terms, rest, ends)

    def within(self, limit) -> Bounded:
        """The same value, known to lie in [-limit, limit] (an a priori bound): the interval cut there."""
        limit = limit * (1 + SLACK)
        ends = (np.maximum(self.lower, -limit), np.minimum(self.upper, limit))
        return Bounded(self.x, self.terms, self.rest, ends)

    def power(self, t: int) -> Bounded:
        out = self
        for _ in range(t - 1):
            out = out * self
        return out


State = dict[str, Bounded]
Hyper = dict[str, float | bool]
Update = Callable[[Bounded, Bounded, State, int, Hyper], Bounded]


def _start(like: Bounded) -> Bounded:
    """A state at zero, exactly."""
    return Bounded(_zeros(like.x))


def sgd(p: Bounded, g: Bounded, state: State, t: int, hp: Hyper) -> Bounded:
    """g <- g + wd p; b <- mu b + g; d = g + mu b if nesterov else b (no momentum: d = g)."""
    if hp["weight_decay"]:
        g = g + mpfr(hp["weight_decay"]) * p
    if not hp["momentum"]:
        return g
    mu = mpfr(hp["momentum"])
    state["b"] = mu * state.get("b", _start(g)) + g
    return g + mu * state["b"] if hp["nesterov"] else state["b"]


def adam(p: Bounded, g: Bounded, state: State, t: int, hp: Hyper) -> Bounded:
    """d = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps), v the running max with amsgrad."""
    b1, b2 = Bounded(mpfr(hp["beta1"])), Bounded(mpfr(hp["beta2"]))
    state["m"] = b1 * state.get("m", _start(g)) + (1 - b1) * g
    state["v"] = b2 * state.get("v", _start(g)) + (1 - b2) * g.square()
    v = state["v"]
    if hp["amsgrad"]:
        v = state["vmax"] = state.get("vmax", _start(g)).maximum(v)
    m_hat = state["m"] / (1 - b1.power(t))
    v_hat = v / (1 - b2.power(t))
    return (m_hat / (v_hat.sqrt() + mpfr(hp["epsilon"]))).within(_adam_limit(b1.x, b2.x, t))


def _adam_limit(b1: gmpy2.mpfr, b2: gmpy2.mpfr, t: int) -> gmpy2.mpfr:
    """|m^| / sqrt(v^) <= (1-b1)/(1-b1^t) sqrt(sum_k<t (b1^2/b2)^k) sqrt((1-b2^t)/(1-b2)), by
    Cauchy-Schwarz on m = (1-b1) sum b1^(t-s) g_s against v = (1-b2) sum b2^(t-s) g_s^2
    (vmax >= v only lowers the ratio); 1 at t = 1."""
    if t == 1:
        return gmpy2.mpfr(1)
    if not b2 > 0 or not b1 < 1 or not b2 < 1:
        return gmpy2.inf()
    ratio = b1 * b1 / b2
    return (1 - b1) / (1 - b1**t) * gmpy2.sqrt(sum(ratio**k for k in range(t))) * gmpy2.sqrt((1 - b2**t) / (1 - b2))


def adamw(p: Bounded, g: Bounded, state: State, t: int, hp: Hyper) -> Bounded:
    """p <- p (1 - lr wd), then adam with g taken before the decay: d = wd p + the adam direction."""
    return mpfr(hp["weight_decay"]) * p + adam(p, g, state, t, hp)


def rmsprop(p: Bounded, g: Bounded, state: State, t: int, hp: Hyper) -> Bounded:
    """q = g / (sqrt(s~) + eps), s~ = s (centered: s - a^2); with momentum mu: b <- mu b + q, d = b."""
    rho = Bounded(mpfr(hp["rho"]))
    state["s"] = rho * state.get("s", _start(g)) + (1 - rho) * g.square()
    mean_square = state["s"]
    if hp["centered"]:
        state["a"] = rho * state.get("a", _start(g)) + (1 - rho) * g
        mean_square = mean_square - state["a"].square()
    q = (g / (mean_square.sqrt() + mpfr(hp["epsilon"]))).within(_rmsprop_limit(rho.x, t, bool(hp["centered"])))
    if not hp["momentum"]:
        return q
    state["b"] = mpfr(hp["momentum"]) * state.get("b", _start(g)) + q
    return state["b"]


def adagrad(p: Bounded, g: Bounded, state: State, t: int, hp: Hyper) -> Bounded:
    """acc <- acc + g^2, acc starting at initial_accumulator; d = g / (sqrt(acc) + eps)."""
    start = state.get("acc", Bounded(_zeros(g.x) + mpfr(hp["initial_accumulator"])))
    state["acc"] = start + g.square()
    q = g / (state["acc"].sqrt() + mpfr(hp["epsilon"]))
    return q.within(gmpy2.mpfr(1)) if hp["initial_accumulator"] >= 0 else q  # acc >= g^2


def _rmsprop_limit(rho: gmpy2.mpfr, t: int, centered: bool) -> gmpy2.mpfr:
    """|g| / sqrt(s~) at most: s >= (1-rho) g^2; centered, s - a^2 = g^T (W - w w^T) g over the
    steps' gradients (w_s = (1-rho) rho^(t-s), W = diag w) is least, for a given g_t, at
    g_t^2 / (1/(1-rho) + 1/rho^t) (Sherman-Morrison: the t-th diagonal of (W - w w^T)^-1)."""
    if not 0 < rho < 1:
        return gmpy2.inf()
    return gmpy2.sqrt(1 / (1 - rho) + 1 / rho**t) if centered else 1 / gmpy2.sqrt(1 - rho)


UPDATES: dict[str, Update] = {"sgd": sgd, "adam": adam, "adamw": adamw, "rmsprop": rmsprop, "adagrad": adagrad}
