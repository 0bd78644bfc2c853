"""The oracle: the engine ``numeric``, a second opinion that shares nothing with the NumPy engine.

It reads the loaded case (its arrays, exactly as every engine receives them) and nothing else of
the package's maths: its own forward pass, activations and losses (:mod:`.maths`), evaluated in
128-bit MPFR arithmetic, and no derivative at all: every gradient, of a parameter or of an
intermediate Z or A, is a central difference of the loss (:mod:`.differences`) with its
uncertainty stated per element (about 1e-18 relative where the loss is smooth; the jump of the
slope at a kink). Its deltas are ``-lr * dL/dp``; its trace gives each layer's Z and A (exact
to float64 rounding) and dA, dZ, dW, db, each with its uncertainty, so it can arbitrate
float32 and float64 disagreements at every quantity of the step.

It is slow (two loss evaluations per element), so it runs on request (``--engines
numpy,numeric``) and whenever engines disagree; the intermediates' differences are taken only
when a diagnosis reads the trace.
"""

from __future__ import annotations

import gmpy2
import numpy as np

from ..case import Case
from ..engines import LayerTrace, StepResult
from .differences import FLOAT64, central, gradient
from .maths import PRECISION, Network, to_float64


def _rounded(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact values rounded to float64, and that rounding as their uncertainty."""
    rounded = to_float64(values)
    return rounded, FLOAT64 * np.abs(rounded)


class _Oracle:
    """One case's network and forward pass in MPFR, and the differences taken on it."""

    def __init__(self, case: Case):
        self.case = case
        self.net = Network.of(case)
        self.forward = self.net.forward()
        self.loss = self.net.loss_of(self.forward[-1][1])

    def layer_input(self, i: int) -> np.ndarray:
        return self.net.inputs if i == 0 else self.forward[i - 1][1]

    def parameter_gradients(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """dL/dp for every parameter: L recomputed from the parameter's own layer on."""
        found = {}
        for i, layer in enumerate(self.net.layers):
            a = self.layer_input(i)
            loss_from_here = lambda _values, i=i, a=a: self.net.loss_of(self.net.output_from(i, a))  # noqa: E731
            found[f"layers.{i}.kernel"] = gradient(layer.W, loss_from_here, self.loss)
            if layer.b is not None:
                found[f"layers.{i}.bias"] = gradient(layer.b, loss_from_here, self.loss)
        return found

    def intermediate_gradient(self, i: int, field: str) -> tuple[np.ndarray, np.ndarray]:
        """dL/dZ or dL/dA of layer i, sample by sample: a sample's terms depend on its own row only."""
        z, a = self.forward[i]
        values = z if field == "Z" else a
        layer = self.net.layers[i]
        grad = np.empty(values.shape, dtype=object)
        uncertainty = np.zeros(values.shape)
        for s in range(values.shape[0]):
            row = values[s:s + 1].copy()

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
                    trace.uncertainty[field] = error
            traces.append(trace)
        return traces


class NumericEngine:
    """Gradients by central differences of its own 128-bit forward pass: an engine with no derivatives."""

    name = "numeric"
    default = False  # slow: it runs on request or to arbitrate, not in every run

    def unavailable(self) -> str | None:
        return None

    def step(self, case: Case) -> StepResult:
        with gmpy2.context(precision=PRECISION):
            oracle = _Oracle(case)
            gradients = oracle.parameter_gradients()
            lr = gmpy2.mpfr(case.lr)
            deltas = {name: to_float64(-lr * grad) for name, (grad, _) in gradients.items()}
            uncertainty = {name: case.lr * error for name, (_, error) in gradients.items()}
            loss = float(oracle.loss)

        def trace() -> list[LayerTrace]:
            with gmpy2.context(precision=PRECISION):
                return oracle.trace(gradients)

        return StepResult(loss=loss, deltas=deltas, uncertainty=uncertainty, trace_factory=trace)


__all__ = ["NumericEngine"]
