"""The oracle: the engine ``numeric``, a second opinion that shares nothing with the NumPy engine.

It reads the loaded case (its arrays, exactly as every engine receives them) and nothing else of
the package's maths: its own forward pass, activations and losses (:mod:`.maths`), evaluated in
128-bit MPFR arithmetic, and no derivative at all: every gradient, of a parameter or of an
intermediate Z or A, is a central difference of the loss (:mod:`.differences`) with its
uncertainty stated per element (about 1e-18 relative where the loss is smooth; the jump of the
slope at a kink). Its trace gives the first step's Z and A (exact to float64 rounding) and dA,
dZ, dW, db, each with its uncertainty, so it can arbitrate float32 and float64 disagreements at
every quantity of the step.

Steps and optimizers. At each step t = 1..N the gradient is taken at the parameters the oracle
has reached (kept in MPFR, never rounded to the case's dtype: the exact trajectory of the SPEC's
formulas), then the case's optimizer updates them as SPEC section 7 writes it (:mod:`.updates`,
its state kept in MPFR too). The stated uncertainty of a delta covers, step after step:

- the gradient's own (the central difference's bend and rounding), an error e_t in [-u, u] of
  its own per step;
- the update over every such error and over the parameters' and the state's, in affine
  arithmetic with an interval beside it (:class:`.updates.Bounded`): what is built from the same
  g keeps its correlation, so Adam's m^/sqrt(v^) is bounded by its true sensitivity to g, not by
  its operands' widths; a quotient near epsilon, a square root near 0, amsgrad's max and a g of
  uncertain sign are bounded by their worst cases, and Adam's, RMSprop's and Adagrad's steps are
  cut at their a priori maxima (|m^|/sqrt(v^) and |g|/sqrt(s~) have closed-form bounds), so an
  uncertain sign costs at most a step of lr;
- the parameters' uncertainty carried into the next gradient: where the parameters lie within r
  of the oracle's, the gradient moves by up to about |H| r, which two probes of the gradient at
  shifted parameters estimate (:func:`.differences.drift`: an estimate with a safety factor, the
  one part that is not a proof).

The uncertainty reported is lr (radius of the summed directions + 2^-52 |their sum|), the last
term for rounding the delta to float64; one plain SGD step gives lr times the gradient's stated
uncertainty, as before. ``history`` has each step's loss, its own deltas and the state after it
(the names of :mod:`manualprop.concepts`: b, m, v, vmax, s, a, acc, the ones the settings use).

It is slow (two loss evaluations per element and step, and from the second step on two probes
that cost as much each), so it runs on request (``--engines numpy,numeric``) and whenever engines disagree; the
intermediates' differences are taken only when a diagnosis reads the trace.
"""

from __future__ import annotations

from collections.abc import Callable

import gmpy2
import numpy as np

from ..casefile.case import Case
from ..concepts import ACTIVATIONS
from ..engines import LayerTrace, StepRecord, StepResult
from .differences import FLOAT64, central, drift, gradient, stated
from .maths import PRECISION, Network, to_float64
from .updates import UPDATES, Bounded


def _rounded(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact values rounded to float64, and that rounding as their uncertainty."""
    rounded = to_float64(values)
    return rounded, FLOAT64 * np.abs(rounded)


def _by_column(loss: Callable[[int], gmpy2.mpfr]) -> Callable[[tuple], gmpy2.mpfr]:
    """L as a function of a kernel or bias element's index: its column (the last coordinate) decides."""
    return lambda index: loss(index[-1])


class _Oracle:
    """One case's network and forward pass in MPFR, and the differences taken on it."""

    def __init__(self, net: Network):
        self.net = net
        self.forward = self.net.forward()
        self.loss = self.net.loss_of(self.forward[-1][1])

    def layer_input(self, i: int) -> np.ndarray:
        return self.net.inputs if i == 0 else self.forward[i - 1][1]

    def parameter_gradients(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """dL/dp for every parameter and its uncertainty (MPFR)."""
        found = {}
        for i, layer in enumerate(self.net.layers):
            column_loss = self.column_loss(i)
            found[f"layers.{i}.kernel"] = gradient(layer.W, _by_column(column_loss), self.loss)
            if layer.b is not None:
                found[f"layers.{i}.bias"] = gradient(layer.b, _by_column(column_loss), self.loss)
        return found

    def column_loss(self, i: int) -> Callable[[int], gmpy2.mpfr]:
        """L as a function of output ``column`` of layer i, after one of its kernel or bias elements
        moved: that column of Z recomputed (the same sums as the whole product), L from there on."""
        layer, a = self.net.layers[i], self.layer_input(i)
        z, activated = self.forward[i]
        elementwise = ACTIVATIONS[layer.activation].elementwise

        def loss(column: int) -> gmpy2.mpfr:
            moved = a @ layer.W[:, column]
            if layer.b is not None:
                moved = moved + layer.b[column]
            if elementwise:
                out = activated.copy()
                out[:, column] = layer.activate(moved)
            else:
                whole = z.copy()
                whole[:, column] = moved
                out = layer.activate(whole)
            return self.net.loss_of(self.net.output_from(i + 1, out))

        return loss

    def intermediate_gradient(self, i: int, field: str) -> tuple[np.ndarray, np.ndarray]:
        """dL/dZ or dL/dA of layer i, sample by sample: a sample's terms depend on its own row only."""
        z, a = self.forward[i]
        values = z if field == "Z" else a
        layer = self.net.layers[i]
        grad = np.empty(values.shape, dtype=object)
        uncertainty = np.zeros(values.shape)
        for s in range(values.shape[0]):
            row = values[s : s + 1].copy()

            def sample_loss(moved_row, s=s):
                out = self.net.output_from(i + 1, layer.activate(moved_row) if field == "Z" else moved_row)
                return self.net.sample_losses(out, slice(s, s + 1))[0]

            base = sample_loss(row)
            for j in range(row.shape[1]):
                x = row[0, j]

                def loss(moved, j=j, row=row):
                    row[0, j] = moved
                    return sample_loss(row)

                grad[s, j], uncertainty[s, j] = central(loss, x, base)
                row[0, j] = x
        return grad, uncertainty

    def trace(self, gradients: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[LayerTrace]:
        traces = []
        for i, (z, a) in enumerate(self.forward):
            trace = LayerTrace()
            for field, exact in (("Z", z), ("A", a)):
                rounded, error = _rounded(exact)
                setattr(trace, field, rounded)
                trace.uncertainty[field] = error
            for field, source in (("dZ", "Z"), ("dA", "A")):
                grad, error = self.intermediate_gradient(i, source)
                setattr(trace, field, to_float64(grad))
                trace.uncertainty[field] = error
            for field, name in (("dW", f"layers.{i}.kernel"), ("db", f"layers.{i}.bias")):
                if name in gradients:
                    grad, error = gradients[name]
                    setattr(trace, field, to_float64(grad))
                    trace.uncertainty[field] = stated(grad, error)
            traces.append(trace)
        return traces


def _steps(case: Case) -> tuple[dict, list[StepRecord], _Oracle, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The case's steps in MPFR: the deltas and their uncertainty (StepResult's keywords), the
    history, and the first step's oracle and gradients, for its trace."""
    net = Network.of(case)
    update, lr = UPDATES[case.optimizer], gmpy2.mpfr(case.lr)
    initial = {name: np.array(values, dtype=object) for name, values in _parameters(net).items()}
    params = {name: Bounded(values) for name, values in initial.items()}
    state: dict[str, dict[str, Bounded]] = {name: {} for name in initial}
    total: dict[str, Bounded] = {}  # the sum of the steps' directions: p = p0 - lr * total
    history: list[StepRecord] = []
    first: tuple[_Oracle, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None
    for t in range(1, case.steps + 1):
        here = {name: p.x for name, p in params.items()}
        oracle = _Oracle(net.with_parameters(here) if t > 1 else net)
        gradients = oracle.parameter_gradients()
        first = first or (oracle, gradients)
        moved = None
        if t > 1:  # the parameters reached are uncertain: so is the gradient taken there
            moved = drift(
                lambda shifted: _Oracle(net.with_parameters(shifted)).parameter_gradients(),
                here,
                {name: p.radius for name, p in params.items()},
                gradients,
                seed=t,
            )
        directions = {}
        for name, (grad, error) in gradients.items():
            g = Bounded.uncertain(grad, error if moved is None else error + moved[name], symbol=t)
            directions[name] = update(params[name], g, state[name], t, case.hyper)
        total = {name: total[name] + d if name in total else d for name, d in directions.items()}
        params = {name: Bounded(initial[name]) - lr * total[name] for name in initial}
        history.append(
            StepRecord(
                float(oracle.loss),
                {name: to_float64(-lr * d.x) for name, d in directions.items()},
                {name: {k: to_float64(v.x) for k, v in kept.items()} for name, kept in state.items()},
            )
        )
    deltas = {name: to_float64(-lr * d.x) for name, d in total.items()}
    uncertainty = {name: case.lr * (to_float64(d.radius) + FLOAT64 * np.abs(to_float64(d.x))) for name, d in total.items()}
    if first is None:
        raise ValueError(f"a case runs at least one step; found steps={case.steps}")
    return {"deltas": deltas, "uncertainty": uncertainty}, history, *first


def _parameters(net: Network) -> dict[str, np.ndarray]:
    found = {}
    for i, layer in enumerate(net.layers):
        found[f"layers.{i}.kernel"] = layer.W
        if layer.b is not None:
            found[f"layers.{i}.bias"] = layer.b
    return found


class NumericEngine:
    """Gradients by central differences of its own 128-bit forward pass, and the case's optimizer
    on bounded MPFR numbers: an engine with no derivatives."""

    name = "numeric"
    default = False  # slow: it runs on request or to arbitrate, not in every run

    def unavailable(self) -> str | None:
        return None

    def step(self, case: Case) -> StepResult:
        with gmpy2.context(precision=PRECISION):
            found, history, oracle, gradients = _steps(case)

        def trace() -> list[LayerTrace]:
            with gmpy2.context(precision=PRECISION):
                return oracle.trace(gradients)

        return StepResult(loss=history[0].loss, **found, history=history, trace_factory=trace)


__all__ = ["NumericEngine"]
