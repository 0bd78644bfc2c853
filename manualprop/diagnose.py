"""When engines disagree: the first quantity that diverges, the engine to blame, and hints.

The computation is walked in the order it runs: each layer's Z and A (forward), the loss, the
loss gradient, then backward from the last layer (dZ, dW, db, and dA of the layer below), and
last the update of each parameter. The first quantity on which the engines disagree under the
case's tolerance is where the fault starts. With three or more engines the one that disagrees
with all the others, which agree among themselves, is blamed (a majority vote). Otherwise the
finite-difference oracle arbitrates, like PyTorch's OpInfo reference: the engine farther from the
oracle is blamed, and the distance of each engine from the oracle is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np

from .case import Case
from .compare import compare
from .engines import StepResult

if TYPE_CHECKING:
    from .harness import EngineRun

MEANING = {
    "Z": "the linear step Z = A_prev @ W + b (the weights, their layout, the bias)",
    "A": "the activation (forward)",
    "loss": "the loss value (its formula, reduction or scale)",
    "loss gradient": "the loss gradient dL/dy (its derivative, reduction or scale)",
    "dZ": "the activation derivative",
    "dW": "the kernel gradient dW = A_prev.T @ dZ",
    "db": "the bias gradient db = dZ summed over the batch",
    "dA": "backpropagation through the weights dA = dZ @ W.T",
    "delta": "the update p <- p - lr * dL/dp",
}


@dataclass
class Step:
    """One quantity of the computation: its label, layer (None for the loss) and trace field."""

    label: str
    layer: int | None
    field: str  # a LayerTrace field, "loss" or a parameter name for "delta"


@dataclass
class Diagnosis:
    quantity: str
    layer: int | None
    engine: str | None  # the engine blamed, if one can be
    agreeing: list[str]
    line: int | None
    sentence: str
    oracle_distance: dict[str, float] = field(default_factory=dict)  # worst |delta - oracle| / tolerance
    hints: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "quantity": self.quantity, "layer": self.layer, "engine": self.engine, "agreeing": self.agreeing,
            "line": self.line, "sentence": self.sentence, "oracle_distance": self.oracle_distance, "hints": self.hints,
        }


def order(case: Case) -> list[Step]:
    """Every quantity in the order the computation produces it."""
    steps: list[Step] = []
    for i in range(len(case.layers)):
        steps += [Step("Z", i, "Z"), Step("A", i, "A")]
    steps.append(Step("loss", None, "loss"))
    last = len(case.layers) - 1
    on_logits = case.loss == "categorical_crossentropy"
    steps.append(Step("loss gradient", last, "dZ" if on_logits else "dA"))
    for i in reversed(range(len(case.layers))):
        if i < last:
            steps.append(Step("dA", i, "dA"))
        if not (i == last and on_logits):
            steps.append(Step("dZ", i, "dZ"))
        steps += [Step("dW", i, "dW"), Step("db", i, "db")]
    steps += [Step("delta", None, name) for name in case.parameters()]
    return steps


def value(run: "EngineRun | StepResult", step: Step) -> np.ndarray | None:
    """The quantity ``step`` from an engine's run (or its StepResult), None where it has none."""
    result = getattr(run, "result", run)
    if step.field == "loss":
        return np.array(result.loss)
    if step.label == "delta":
        return result.deltas.get(step.field)
    if step.layer is None or len(result.trace) <= step.layer:
        return None
    return getattr(result.trace[step.layer], step.field)


def _agree(case: Case, step: Step, a: np.ndarray, b: np.ndarray, allowance=0.0) -> bool:
    reference = case.parameters().get(step.field) if step.label == "delta" else None
    return compare(step.field, "a", a, "b", b, case.rtol, case.atol, reference=reference, allowance=allowance).ok


def _oracle_allowance(oracle: "EngineRun", step: Step, case: Case):
    """The oracle's own uncertainty on a quantity it has: deltas, and dW, db (deltas / lr)."""
    if step.label == "delta":
        return oracle.result.uncertainty.get(step.field, 0.0)
    if step.field in ("dW", "db") and step.layer is not None:
        name = f"layers.{step.layer}.{'kernel' if step.field == 'dW' else 'bias'}"
        return np.asarray(oracle.result.uncertainty.get(name, 0.0)) / case.lr
    return 0.0


def oracle_distance(case: Case, run: "EngineRun", oracle: "EngineRun") -> float:
    """The worst |delta - oracle delta| as a fraction of the tolerance, over every parameter."""
    worst = 0.0
    for name, initial in case.parameters().items():
        mine, precise = run.result.deltas.get(name), oracle.result.deltas.get(name)
        if mine is None or precise is None or np.shape(mine) != np.shape(precise):
            return float("inf")
        c = compare(name, run.engine, mine, oracle.engine, precise, case.rtol, case.atol, reference=initial,
                    allowance=oracle.result.uncertainty.get(name, 0.0))
        worst = max(worst, c.worst_ratio)
    return worst


def first_non_finite(case: Case, result: StepResult) -> str | None:
    """Where a NaN or an infinity first appears, in the order of the computation."""
    if np.isfinite(result.loss) and all(np.all(np.isfinite(d)) for d in result.deltas.values()):
        return None  # the trace is looked at only when there is something to locate
    for step in order(case):
        found = value(result, step)
        if found is not None and not np.all(np.isfinite(found)):
            kind = "nan" if np.any(np.isnan(found)) else "inf"
            where = step.field if step.label in ("delta", "loss") else f"layers.{step.layer}.{step.field}"
            phase = {"Z": "forward", "A": "forward", "loss": "loss", "delta": "update"}.get(step.label, "backward")
            return f"{kind} first in {where} ({phase})"
    return None


def diagnose(case: Case, runs: list["EngineRun"], oracle: "EngineRun | None") -> Diagnosis | None:
    """The first divergence among ``runs`` (engines that ran), arbitrated by ``oracle`` when given."""
    if len(runs) < 2:
        return None
    distance = {r.engine: oracle_distance(case, r, oracle) for r in runs} if oracle else {}
    for step in order(case):
        values = {r.engine: value(r, step) for r in runs}
        values = {k: v for k, v in values.items() if v is not None}
        if len(values) < 2:
            continue
        agree = {(a, b): _agree(case, step, values[a], values[b]) for a, b in combinations(values, 2)}
        if all(agree.values()):
            continue
        blamed = _blame(case, step, values, agree, oracle, distance)
        return _describe(case, step, blamed, values, distance, runs, oracle)
    return None


def _blame(case, step, values, agree, oracle, distance) -> str | None:
    names = list(values)
    together = lambda a, b: agree.get((a, b), agree.get((b, a)))  # noqa: E731
    if len(names) >= 3:
        for odd in names:
            rest = [n for n in names if n != odd]
            if all(not together(odd, n) for n in rest) and all(together(a, b) for a, b in combinations(rest, 2)):
                return odd
    if oracle is not None:
        precise = value(oracle, step)
        if precise is not None:
            allowance = _oracle_allowance(oracle, step, case)
            off = [n for n in names if not _agree(case, step, values[n], precise, allowance)]
            if len(off) == 1:
                return off[0]
        if distance:
            ranked = sorted(names, key=lambda n: distance[n])
            if distance[ranked[-1]] > 1 >= distance[ranked[0]]:
                return ranked[-1]
    return None


def _where(case: Case, step: Step) -> str:
    if step.label == "delta":
        return f"{step.field}"
    if step.layer is None:
        return "the loss"
    layer = case.layers[step.layer]
    line = case.line_of(("layers", step.layer))
    name = layer.activation if layer.activation != "leaky_relu" else f"leaky_relu {layer.alpha:g}"
    return f"layer {step.layer} ({name}" + (f", line {line})" if line else ")")


def _describe(case, step, blamed, values, distance, runs, oracle) -> Diagnosis:
    meaning = MEANING["dZ" if step.label == "dZ" else step.label]
    if step.label == "loss gradient" and case.loss == "categorical_crossentropy":
        meaning = "the loss gradient on the logits, dL/dZ = p * sum(t) - t (cross-entropy through softmax)"
    before = {
        "Z": "", "A": "Z agrees; ", "loss": "the forward pass agrees; ", "loss gradient": "the forward pass and the loss agree; ",
        "dZ": "forward agrees; ", "dW": "forward agrees; ", "db": "forward agrees; ", "dA": "forward agrees; ",
        "delta": "every intermediate agrees; ",
    }[step.label]
    who = f"in {blamed}" if blamed else f"between {', '.join(values)} (no majority, no oracle verdict)"
    what = step.label if step.label != "delta" else "the delta"
    sentence = f"{_where(case, step)}: {before}{what} differs first {who}: {meaning}"
    line = case.line_of(("layers", step.layer)) if step.layer is not None else None
    agreeing = [n for n in values if n != blamed] if blamed else []
    result = Diagnosis(step.label, step.layer, blamed, agreeing, line, sentence, distance)
    reference = next((r for r in runs if r.engine in agreeing), None) or oracle
    culprit = next((r for r in runs if r.engine == blamed), None)
    if culprit is not None and reference is not None:
        result.hints = hints(case, step, culprit, reference)
    return result


# -- hints --------------------------------------------------------------------------------------

def _constant_ratio(a: np.ndarray, b: np.ndarray) -> float | None:
    """a / b when it is the same number everywhere b is not negligible, else None."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        return None
    mask = np.abs(b) > 1e-9 * max(np.abs(b).max(), 1e-300)
    if mask.sum() == 0 or np.any(np.abs(a[~mask]) > 1e-9 * max(np.abs(a).max(), 1e-300)):
        return None
    ratios = a[mask] / b[mask]
    middle = float(np.median(ratios))
    return middle if np.allclose(ratios, middle, rtol=1e-3, atol=0) else None


def _factor_hint(case: Case, c: float, engine: str) -> str:
    if c == 0:
        return (f"{engine}'s deltas are zero where the others' are not: a gradient that does not flow "
                "(a saturated unit, a clipped probability, a detached tensor)")
    batch, outputs = case.inputs.shape[0], case.targets.shape[1]
    named = [
        (-1.0, "a sign flip: the update adds lr * g instead of subtracting it"),
        (2.0, "a factor 2: the derivative of (y - t)^2 is 2 (y - t), or a 1/2 in the loss"),
        (0.5, "a factor 1/2: the derivative of (y - t)^2 is 2 (y - t), or a 1/2 in the loss"),
    ]
    if batch > 1:
        named += [(float(batch), f"a factor of the batch size N = {batch}: a sum where the mean belongs, or a dropped 1/N"),
                  (1.0 / batch, f"a factor 1/N (N = {batch}, the batch size): a mean where the sum belongs")]
    if outputs > 1:
        named += [(float(outputs), f"a factor of the number of outputs ({outputs}): a mean over each sample's outputs where the mean over every element belongs"),
                  (1.0 / outputs, f"a factor 1/{outputs} (the number of outputs): a mean over every element where a per-sample sum belongs")]
    if batch > 1 and outputs > 1:
        named += [(float(batch * outputs), f"a factor N x outputs = {batch * outputs}: a sum where the mean over every element belongs")]
    for factor, text in named:
        if abs(c - factor) <= 1e-3 * abs(factor):
            return f"{engine}'s deltas are {c:.4g} times the others': {text}"
    return f"{engine}'s deltas are {c:.4g} times the others' everywhere: a constant factor (a learning rate or a loss scale?)"


def hints(case: Case, step: Step, culprit: "EngineRun", reference: "EngineRun") -> list[str]:
    """Patterns in how the blamed engine differs, each with the slip it usually means."""
    found: list[str] = []
    mine, theirs = culprit.result.deltas, reference.result.deltas
    failing = [n for n in case.parameters() if n in mine and n in theirs
               and not compare(n, "a", mine[n], "b", theirs[n], case.rtol, case.atol, reference=case.parameters()[n]).ok]
    ratios = {n: _constant_ratio(mine[n], theirs[n]) for n in failing}
    if failing and all(r is not None for r in ratios.values()) and np.allclose(list(ratios.values()), ratios[failing[0]], rtol=1e-3):
        found.append(_factor_hint(case, ratios[failing[0]], culprit.engine))
    for n in failing:
        a, b = np.asarray(mine[n]), np.asarray(theirs[n])
        if a.ndim == 2 and a.T.shape == b.shape and np.allclose(a.T, b, rtol=case.rtol * 10, atol=case.atol * 10):
            found.append(f"{n}: {culprit.engine}'s delta matches after transposing: a layout slip, (out, in) where (in, out) belongs")
    found += _leaky_hint(case, step, culprit, reference)
    found += _saturation_hint(case, step, culprit, reference)
    found += _clipping_hint(case, culprit, reference, failing)
    if case.loss == "categorical_crossentropy" and not np.allclose(case.targets.sum(axis=1), 1.0) and step.label in ("loss gradient", "dZ", "dW", "db", "delta"):
        found.append("the targets do not sum to 1 per sample: the gradient of -sum(t log softmax(z)) is p * sum(t) - t; "
                     "TensorFlow's softmax cross-entropy uses p - t whatever the sum")
    return found


def _leaky_hint(case, step, culprit, reference) -> list[str]:
    if step.label != "A" or case.layers[step.layer].activation != "leaky_relu":
        return []
    z = value(reference, Step("Z", step.layer, "Z"))
    a_mine, a_ref = value(culprit, step), value(reference, step)
    if z is None or a_mine is None or a_ref is None or not np.any(z < 0):
        return []
    c = _constant_ratio(a_mine[z < 0], a_ref[z < 0])
    if c is None:
        return []
    alpha = case.layers[step.layer].alpha
    return [f"layer {step.layer}: {culprit.engine}'s leaky_relu slope is {alpha * c:.4g}, not the case's {alpha:g}"
            " (PyTorch's default is 0.01, Keras's 0.2, Keras 2's 0.3)"]


def _saturation_hint(case, step, culprit, reference) -> list[str]:
    """tanh or sigmoid outputs within float32 rounding of their limits: 1 - a^2 or a (1 - a) is then
    mostly rounding, and TensorFlow's float32 tanh reaches exactly 1 from |z| >= 8."""
    if step.label != "dZ" or case.layers[step.layer].activation not in ("tanh", "sigmoid") or case.dtype != np.float32:
        return []
    a = value(reference, Step("A", step.layer, "A"))
    if a is None or not np.any(np.abs(a) > 1 - 1e-5):
        return []
    return [f"layer {step.layer}: some {case.layers[step.layer].activation} outputs are within 1e-5 of their limit, where the "
            "float32 derivative is mostly rounding; TensorFlow's float32 tanh is exactly 1 from |z| >= 8 "
            "(see cases/canaries/keras_float32_tanh_saturation.yaml)"]


def _clipping_hint(case, culprit, reference, failing) -> list[str]:
    if case.loss != "categorical_crossentropy" or not failing or not reference.result.trace:
        return []
    p = reference.result.trace[-1].A
    if p is None:
        return []
    clipped = (p <= 1e-7) | (p >= 1 - 1e-7)
    if not np.any(clipped):
        return []
    last = culprit.result.trace[-1].dZ if culprit.result.trace else None
    if last is not None and np.all(last[np.any(clipped, axis=1)] == 0):
        return ["zero gradient exactly where a probability is within 1e-7 of 0 or 1: cross-entropy clipped at 1e-7 "
                "(Keras clips probabilities when it cannot reach the logits)"]
    return []
