"""The oracle: the engine ``numeric``, a second opinion that shares nothing with the NumPy engine.

It reads the loaded case (its arrays, exactly as every engine receives them) and nothing else of
the package's maths: its own forward pass, layer kinds, activations and losses (:mod:`.maths`,
:mod:`.layers`: dense, conv2d, the pools, flatten, batch_norm and layer_norm; every loss of
SPEC sections 3 and 9), evaluated in 128-bit MPFR arithmetic, and no derivative at all: every
gradient, of a parameter or of an intermediate Z or A, is a central difference of the loss
(:mod:`.differences`) with its uncertainty stated per element (about 1e-18 relative where the
loss is smooth; the jump of the slope at a kink: relu at exactly 0, a tie of a max pool's window,
mae where y = t). Its trace gives the first step's forward fields (Z and A; a norm's mean, var and
xhat; exact to float64 rounding) and dA, dZ, dW, db, dgamma, dbeta (dxhat = dA gamma), each with
its uncertainty, so it can arbitrate float32 and float64 disagreements at every quantity of the step.

How a gradient is differenced. A parameter element moves one output column of its layer (a
unit, a filter, a normalized feature): that column is recomputed (the same sums as the whole
layer) and the loss from the layer above on. dZ and dA are differenced sample by sample, each
sample's own terms, since a sample's loss depends on its own row only; below a batch_norm that
is false (the batch statistics couple the samples), and there the whole batch's loss is.

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

batch_norm's moving statistics are state, not trained (the optimizer never sees them): at each
step ``moving <- momentum moving + (1 - momentum) stat``, exact in MPFR, stat the batch mean or
biased variance at the parameters the oracle has reached; reported as the deltas of
``layers.<i>.moving_mean`` and ``moving_variance``. Their uncertainty covers the statistics'
128-bit rounding (a proven bound), the rounding of the delta to float64, and from the second
step on how far the parameters' own uncertainty may move the statistics, by the same two probes
as the gradient's (an estimate, as above); at the first step the parameters are the case's own,
exact, and the statistics' error is their rounding alone.

It is slow (two loss evaluations per element and step, and from the second step on two probes
that cost as much each), so it runs on request (``--engines numpy,numeric``) and whenever engines
disagree; the intermediates' differences are taken only when a diagnosis reads the trace. A case
whose step (or trace) is estimated to take over 30 s is refused before any work, with the
reason (:mod:`.cost`): the harness reports it as the engine's error and goes on. Measured on one
core: a conv network (inputs [2, 5, 5, 1], 2 filters 3x3, max pool, flatten, dense 3, scce) in
about 0.01 s, a dense-batch_norm-dense network with 3 Adam steps in about 0.1 s.
"""

from __future__ import annotations

from collections.abc import Callable

import gmpy2
import numpy as np

from ..casefile.case import Case
from ..concepts import GRADIENT_FIELD
from ..engines import LayerTrace, StepRecord, StepResult
from . import cost
from .differences import FLOAT64, ROUNDING, central, drift, gradient, stated
from .layers import Dense, Norm
from .maths import PRECISION, Network, to_float64
from .updates import UPDATES, Bounded

Gradients = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (value, its uncertainty), MPFR


def _rounded(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact values rounded to float64, and that rounding as their uncertainty."""
    rounded = to_float64(values)
    return rounded, FLOAT64 * np.abs(rounded)


def _by_column(loss: Callable[[int], gmpy2.mpfr]) -> Callable[[tuple], gmpy2.mpfr]:
    """L as a function of a parameter element's index: its column (the last coordinate) decides."""
    return lambda index: loss(index[-1])


class _Oracle:
    """One case's network and forward pass in MPFR, and the differences taken on it."""

    def __init__(self, net: Network):
        self.net = net
        self.forward = self.net.forward()
        self.loss = self.net.loss_of(self.net.loss_input(self.forward[-1]))

    def layer_input(self, i: int) -> np.ndarray:
        return self.net.inputs if i == 0 else self.forward[i - 1]["A"]

    def parameter_gradients(self) -> Gradients:
        """dL/dp for every trainable parameter and its uncertainty (MPFR)."""
        found = {}
        for i, layer in enumerate(self.net.layers):
            values = layer.parameters()
            if values:
                loss_at = _by_column(self.column_loss(i))
                for name, array in values.items():
                    found[f"layers.{i}.{name}"] = gradient(array, loss_at, self.loss)
        return found

    def column_loss(self, i: int) -> Callable[[int], gmpy2.mpfr]:
        """L as a function of output ``column`` of layer i (a unit, a filter, a normalized feature),
        after one of its parameter elements moved: that column recomputed, L from there on."""
        layer = self.net.layers[i]
        return self._linear_column(i, layer) if isinstance(layer, Dense) else self._norm_column(i, layer)

    def _linear_column(self, i: int, layer: Dense) -> Callable[[int], gmpy2.mpfr]:
        """Dense or conv2d: the column's sums ``rows @ W[:, column] + b[column]`` (the same sums as
        the whole product), its activation, and L from there on."""
        rows, fields = layer.rows(self.layer_input(i)), self.forward[i]
        z, activated = fields["Z"], fields["A"]
        logits = i == len(self.net.layers) - 1 and self.net.on_logits

        def loss(column: int) -> gmpy2.mpfr:
            moved = (rows @ layer.W.reshape(-1, layer.W.shape[-1])[:, column]).reshape(z.shape[:-1])
            if layer.b is not None:
                moved = moved + layer.b[column]
            if layer.elementwise and not logits:
                out = activated.copy()
                out[..., column] = layer.activate(moved)
                return self.net.loss_of(self.net.output_from(i + 1, out))
            whole = z.copy()
            whole[..., column] = moved
            return self.net.loss_of(self.net.from_z(i, whole))

        return loss

    def _norm_column(self, i: int, layer) -> Callable[[int], gmpy2.mpfr]:
        """A norm: ``A[..., column] = gamma[column] xhat[..., column] + beta[column]``, L from there on."""
        fields = self.forward[i]
        xhat, out = fields["xhat"], fields["A"]

        def loss(column: int) -> gmpy2.mpfr:
            moved = out.copy()
            moved[..., column] = layer.gamma[column] * xhat[..., column] + layer.beta[column]
            return self.net.loss_of(self.net.output_from(i + 1, moved))

        return loss

    def statistics(self) -> Gradients:
        """batch_norm's batch mean and biased variance at this step, by the name of the state
        they move, each with the bound of its 128-bit rounding: the mean's n additions and a
        division within (n + 1) u mean|x|, the variance's within (n + 2) u var plus the square
        of the mean's error (the centred squares' sum is flat in the mean), u = 2^-120 (the unit
        roundoff 2^-128 with room)."""
        found = {}
        for i, layer in enumerate(self.net.layers):
            if isinstance(layer, Norm) and layer.over_batch:
                a, fields = self.layer_input(i), self.forward[i]
                count = a.size // a.shape[-1]
                mean_error = ROUNDING * (count + 1) * np.abs(a).reshape(-1, a.shape[-1]).sum(axis=0) / count
                found[f"layers.{i}.moving_mean"] = (fields["mean"], mean_error)
                found[f"layers.{i}.moving_variance"] = (
                    fields["var"],
                    ROUNDING * (count + 2) * fields["var"] + mean_error * mean_error,
                )
        return found

    def probe(self) -> Gradients:
        """What moves with the parameters: their gradients and the batch statistics."""
        return {**self.parameter_gradients(), **self.statistics()}

    def intermediate_gradient(self, i: int, field: str) -> tuple[np.ndarray, np.ndarray]:
        """dL/dZ or dL/dA of layer i. Where no batch_norm lies above, a sample's terms depend on its
        own sample only, so each sample's loss alone is differenced; above a batch_norm (whose
        statistics couple the samples) the whole batch's."""
        values = self.forward[i][field]
        net = self.net

        def after(moved: np.ndarray) -> np.ndarray:
            return net.from_z(i, moved) if field == "Z" else net.output_from(i + 1, moved)

        grad = np.empty(values.shape, dtype=object)
        uncertainty = np.zeros(values.shape)
        coupled = any(isinstance(above, Norm) and above.over_batch for above in net.layers[i + 1 :])
        # (first sample, count): the whole batch at once, or one sample at a time with its own terms
        groups = [(0, values.shape[0])] if coupled else [(s, 1) for s in range(values.shape[0])]
        for first, count in groups:
            rows = slice(first, first + count)
            part = values[rows].copy()

            def part_loss(part: np.ndarray = part, rows: slice = rows) -> gmpy2.mpfr:
                return net.sample_losses(after(part), rows).sum()

            base = part_loss()
            for index in np.ndindex(part.shape):
                x = part[index]

                def loss(moved, index=index, part=part, part_loss=part_loss):
                    part[index] = moved
                    return part_loss()

                at = (index[0] + first, *index[1:])
                grad[at], uncertainty[at] = central(loss, x, base)
                part[index] = x
        return grad, uncertainty

    def trace(self, gradients: Gradients) -> list[LayerTrace]:
        traces = []
        last = len(self.net.layers) - 1
        for i, (layer, fields) in enumerate(zip(self.net.layers, self.forward, strict=True)):
            trace = LayerTrace()
            for field, exact in fields.items():
                rounded, error = _rounded(exact)
                setattr(trace, field, rounded)
                trace.uncertainty[field] = error
            sources = ("Z", "A") if isinstance(layer, Dense) else ("A",)
            for source in sources:
                if source == "A" and i == last and self.net.on_logits:
                    continue  # the loss reads the logits: dL/dA of the last layer is no quantity of the step
                grad, error = self.intermediate_gradient(i, source)
                setattr(trace, f"d{source}", to_float64(grad))
                trace.uncertainty[f"d{source}"] = error
                if source == "A" and isinstance(layer, Norm):  # dxhat = dA gamma, its error scaled alike
                    dxhat = grad * layer.gamma
                    trace.dxhat = to_float64(dxhat)
                    trace.uncertainty["dxhat"] = error * to_float64(np.abs(layer.gamma)) + FLOAT64 * np.abs(trace.dxhat)
            for short in layer.parameters():
                grad, error = gradients[f"layers.{i}.{short}"]
                setattr(trace, GRADIENT_FIELD[short], to_float64(grad))
                trace.uncertainty[GRADIENT_FIELD[short]] = stated(grad, error)
            traces.append(trace)
        return traces


def _steps(case: Case) -> tuple[dict, list[StepRecord], _Oracle, Gradients]:
    """The case's steps in MPFR: the deltas and their uncertainty (StepResult's keywords), the
    history, and the first step's oracle and gradients, for its trace."""
    cost.check(cost.step_seconds(case), "step" if case.steps == 1 else f"{case.steps} steps")
    net = Network.of(case)
    update, lr = UPDATES[case.optimizer], gmpy2.mpfr(case.lr)
    initial = {name: np.array(values, dtype=object) for name, values in net.parameters().items()}
    params = {name: Bounded(values) for name, values in initial.items()}
    state: dict[str, dict[str, Bounded]] = {name: {} for name in initial}
    total: dict[str, Bounded] = {}  # the sum of the steps' directions: p = p0 - lr * total
    moving = _Moving(net)
    history: list[StepRecord] = []
    first: tuple[_Oracle, Gradients] | None = None
    for t in range(1, case.steps + 1):
        here = {name: p.x for name, p in params.items()}
        oracle = _Oracle(net.with_parameters(here) if t > 1 else net)
        gradients, statistics = oracle.parameter_gradients(), oracle.statistics()
        first = first or (oracle, gradients)
        moved = None
        if t > 1:  # the parameters reached are uncertain: so are the gradient and the statistics taken there
            moved = drift(
                lambda shifted: _Oracle(net.with_parameters(shifted)).probe(),
                here,
                {name: p.radius for name, p in params.items()},
                {**gradients, **statistics},
                seed=t,
            )
        directions = {}
        for name, (grad, error) in gradients.items():
            g = Bounded.uncertain(grad, error if moved is None else error + moved[name], symbol=t)
            directions[name] = update(params[name], g, state[name], t, case.hyper)
        total = {name: total[name] + d if name in total else d for name, d in directions.items()}
        params = {name: Bounded(initial[name]) - lr * total[name] for name in initial}
        changes = moving.step(statistics, moved)
        history.append(
            StepRecord(
                float(oracle.loss),
                {**{name: to_float64(-lr * d.x) for name, d in directions.items()}, **changes},
                {name: {k: to_float64(v.x) for k, v in kept.items()} for name, kept in state.items()},
            )
        )
    if first is None:
        raise ValueError(f"a case runs at least one step; found steps={case.steps}")
    deltas = {name: to_float64(-lr * d.x) for name, d in total.items()}
    uncertainty = {name: case.lr * (to_float64(d.radius) + FLOAT64 * np.abs(to_float64(d.x))) for name, d in total.items()}
    for name, (delta, error) in moving.deltas().items():
        deltas[name], uncertainty[name] = delta, error
    order = list(case.parameters())
    found = {"deltas": _ordered(deltas, order), "uncertainty": _ordered(uncertainty, order)}
    return found, history, *first


def _ordered(values: dict, order: list[str]) -> dict:
    return {name: values[name] for name in order if name in values}


class _Moving:
    """batch_norm's moving statistics through the steps, exact in MPFR:
    ``moving <- momentum moving + (1 - momentum) stat``, stat the batch's at the parameters the
    oracle has reached. Their error e (from 0) follows ``e <- |m| e + |1 - m| (the stat's
    error) + the update's rounding``, the stat's error its rounding plus, from the second step on,
    how far the parameters' uncertainty may move it (:func:`.differences.drift`'s estimate)."""

    def __init__(self, net: Network):
        held = net.moving()
        self.start = {name: value for name, (value, _) in held.items()}
        self.value = dict(self.start)
        self.momentum = {name: momentum for name, (_, momentum) in held.items()}
        self.error = {name: 0 * value for name, value in self.start.items()}

    def step(self, statistics: Gradients, moved: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Move every state by this step's statistics; its change in the step, by name (float64)."""
        changes = {}
        for name, before in self.value.items():
            stat, rounding = statistics[name]
            m = self.momentum[name]
            kept, added = m * before, (1 - m) * stat
            self.value[name] = kept + added
            stat_error = rounding if moved is None else rounding + moved[name]
            self.error[name] = abs(m) * self.error[name] + abs(1 - m) * stat_error + ROUNDING * (np.abs(kept) + np.abs(added))
            changes[name] = to_float64(self.value[name] - before)
        return changes

    def deltas(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each state's change over the steps and its uncertainty: its error and the rounding to float64."""
        found = {}
        for name, value in self.value.items():
            delta = to_float64(value - self.start[name])
            found[name] = (delta, to_float64(self.error[name]) + FLOAT64 * np.abs(delta))
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
            cost.check(cost.trace_seconds(case), "trace (dZ and dA by differences)")
            with gmpy2.context(precision=PRECISION):
                return oracle.trace(gradients)

        return StepResult(loss=history[0].loss, **found, history=history, trace_factory=trace)


__all__ = ["NumericEngine"]
