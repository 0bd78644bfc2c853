"""When engines disagree: the first quantity that diverges, the engine to blame, and hints.

The computation is walked in the order it runs (:func:`manualprop.verdict.computation.walk`, which
``explain`` prints too): each layer's Z and A (forward), the loss, the loss gradient, then backward
from the last layer (dZ, dW, db, and the dA it passes down through its W to the layer below), and
last the update of each parameter. The first quantity on which the engines disagree under the
case's tolerance is where the fault starts.

Who is to blame is decided at that quantity. The oracle (``numeric``: its own forward pass in
128-bit arithmetic and central differences, :mod:`manualprop.oracle`) has every quantity with
its uncertainty; an engine is far from it when it lies outside the tolerance widened by that
uncertainty. With two engines, the one far from the oracle is blamed; with three or more the odd
one out of a majority vote is blamed only when the oracle agrees, and when the vote and the
oracle disagree the diagnosis says so rather than pick. One engine alone is judged against the
oracle. Where engines lie apart but each within the tolerance of a precise oracle, that is
rounding, and the walk goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from ..casefile.case import Case
from ..engines import StepResult
from .compare import compare, tolerated
from .computation import Quantity, Step, comparable, describe, result_of, value

if TYPE_CHECKING:
    from .results import EngineRun

BEFORE = {
    "Z": "",
    "A": "Z agrees; ",
    "loss": "the forward pass agrees; ",
    "loss gradient": "the forward pass and the loss agree; ",
    "dZ": "forward agrees; ",
    "dW": "forward agrees; ",
    "db": "forward agrees; ",
    "dA": "forward agrees; ",
    "mean": "",
    "var": "the mean agrees; ",
    "xhat": "the mean and the variance agree; ",
    "dxhat": "forward agrees; ",
    "dgamma": "forward agrees; ",
    "dbeta": "forward agrees; ",
    "delta": "every intermediate agrees; ",
}
# How a sentence names a quantity, where its label alone does not say it.
NAMED = {
    "delta": "the delta",
    "mean": "the batch mean",
    "var": "the variance",
    "xhat": "x^ (the normalized input)",
    "dxhat": "dx^",
}


@dataclass
class Diagnosis:
    quantity: str
    layer: int | None  # the layer whose maths is at fault (for dA: the upper layer, whose W passes it down)
    engine: str | None  # the engine blamed, if one can be ("expected" for the golden values)
    agreeing: list[str]
    line: int | None
    sentence: str
    oracle_distance: dict[str, float] = field(default_factory=dict)  # worst |delta - oracle| / tolerance
    hints: list[str] = field(default_factory=list)
    step: Step | None = None  # the quantity in the walk (explain marks it)

    def to_json(self) -> dict:
        return {
            "quantity": self.quantity,
            "layer": self.layer,
            "engine": self.engine,
            "agreeing": self.agreeing,
            "line": self.line,
            "sentence": self.sentence,
            "oracle_distance": self.oracle_distance,
            "hints": self.hints,
        }


def order(case: Case) -> list[Step]:
    """Every quantity diagnose compares, in the order the computation produces it."""
    return [q.at for q in comparable(case)]


def uncertainty(run: EngineRun | StepResult, step: Step) -> np.ndarray | float:
    """What an engine states of its own error on ``step`` (the oracle does), else 0."""
    result = result_of(run)
    if step.label == "delta":
        stated = result.uncertainty.get(step.field, 0.0)
        # One step's own change, p_k+1 - p_k: the oracle's bound grows step by step, so the one it
        # states for p_N - p_0 bounds each p_k - p_0 too, and twice it bounds the step's change.
        return stated if step.step is None else 2 * np.asarray(stated)
    if step.step not in (None, 0):
        return 0.0 if step.field == "loss" else np.inf  # no stated bound for a later step's trace: not judged there
    if step.layer is None or len(result.trace) <= step.layer:
        return 0.0
    return result.trace[step.layer].uncertainty.get(step.field, 0.0)


def agree(case: Case, step: Step, a: np.ndarray, b: np.ndarray, allowance=0.0) -> bool:
    reference = case.parameters().get(step.field) if step.label == "delta" else None
    return compare(step.field, "a", a, "b", b, case.rtol, case.atol, reference=reference, allowance=allowance).ok


def oracle_distance(case: Case, run: EngineRun, oracle: EngineRun) -> float:
    """The worst |delta - oracle delta| as a fraction of the tolerance, over every parameter."""
    worst = 0.0
    for name, initial in case.parameters().items():
        mine, precise = run.output.deltas.get(name), oracle.output.deltas.get(name)
        if mine is None or precise is None or np.shape(mine) != np.shape(precise):
            return float("inf")
        c = compare(
            name,
            run.engine,
            mine,
            oracle.engine,
            precise,
            case.rtol,
            case.atol,
            reference=initial,
            allowance=oracle.output.uncertainty.get(name, 0.0),
        )
        worst = max(worst, c.worst_ratio)
    return worst


def first_non_finite(case: Case, result: StepResult) -> str | None:
    """Where a NaN or an infinity first appears, in the order of the computation."""
    if np.isfinite(result.loss) and all(np.all(np.isfinite(d)) for d in result.deltas.values()):
        return None  # the trace is looked at only when there is something to locate
    for q in comparable(case):
        step, found = q.at, q.value(result)
        if found is not None and not np.all(np.isfinite(found)):
            kind = "nan" if np.any(np.isnan(found)) else "inf"
            where = step.field if step.label in ("delta", "loss") else f"layers.{step.layer}.{step.field}"
            return f"{kind} first in {where} ({q.phase})"
    return None


@dataclass
class _Verdict:
    """Who is blamed at one quantity, and why not when nobody is."""

    blamed: str | None
    off: list[str]  # the engines far from the oracle (empty without one)
    why_not: str = ""


def diagnose(case: Case, runs: list[EngineRun], oracle: EngineRun | None) -> Diagnosis | None:
    """The first divergence among ``runs`` (engines that ran), arbitrated by ``oracle`` when given."""
    if not runs or (len(runs) < 2 and oracle is None):
        return None
    distance = {r.engine: oracle_distance(case, r, oracle) for r in runs} if oracle else {}
    unsettled = None  # the first quantity where engines lie apart, each within a precise oracle's tolerance
    for q in comparable(case):
        step = q.at
        values = {r.engine: v for r in runs if (v := value(r, step)) is not None}
        precise = value(oracle, step) if oracle is not None else None
        if len(values) + (precise is not None) < 2 or (
            precise is not None and all(np.shape(precise) != np.shape(v) for v in values.values())
        ):
            continue  # nothing to hold against another, or an oracle that keeps it in a shape of its own
        together = {(a, b): agree(case, step, values[a], values[b]) for a, b in combinations(values, 2)}
        stated = uncertainty(oracle, step) if oracle is not None and precise is not None else 0.0  # the oracle's own error
        off = [] if precise is None else [n for n in values if not agree(case, step, values[n], precise, stated)]
        if all(together.values()) and not off:
            continue
        if precise is not None and not off and precise_enough(case, step, precise, stated):
            unsettled = unsettled or q  # rounding, which the oracle can judge: look further
            continue
        verdict = _blame(values, together, off, precise is not None)
        return _describe(case, q, verdict, values, distance, runs, oracle)
    if unsettled is not None:
        return _describe(
            case,
            unsettled,
            _Verdict(None, [], "each is within the tolerance of the oracle: rounding"),
            {r.engine: value(r, unsettled.at) for r in runs},
            distance,
            runs,
            oracle,
        )
    return None


def precise_enough(case: Case, step: Step, precise: ArrayLike, error: ArrayLike) -> bool:
    """The oracle can tell a fault from rounding where its uncertainty is under a tenth of the tolerance."""
    initial = case.parameters().get(step.field) if step.label == "delta" else None
    return bool(np.all(np.asarray(error) <= 0.1 * tolerated(case.rtol, case.atol, precise, initial)))


def _odd_one_out(names: list[str], together: dict) -> str | None:
    """With three or more engines: the one that disagrees with all the others, which agree among themselves."""
    both = lambda a, b: together.get((a, b), together.get((b, a)))  # noqa: E731
    for odd in names if len(names) >= 3 else []:
        rest = [n for n in names if n != odd]
        if all(not both(odd, n) for n in rest) and all(both(a, b) for a, b in combinations(rest, 2)):
            return odd
    return None


def _blame(values: dict, together: dict, off: list[str], have_oracle: bool) -> _Verdict:
    names = list(values)
    vote = _odd_one_out(names, together)
    if not have_oracle:
        return _Verdict(vote, [], "" if vote else "no majority, and the oracle has no value here")
    if vote is not None and off != [vote]:
        sides = f"the oracle finds {', '.join(off)} far from it" if off else "the oracle finds every engine within its tolerance"
        return _Verdict(
            None, off, f"the majority blames {vote} but {sides}: the vote and the oracle disagree, so no engine is blamed"
        )
    if len(off) == 1:
        return _Verdict(off[0], off)
    if not off:
        return _Verdict(None, off, "the oracle cannot tell them apart here (its uncertainty is too large)")
    return _Verdict(None, off, f"{', '.join(off)} are each far from the oracle")


def where(case: Case, step: Step) -> str:
    """The place a quantity belongs to, in the case's terms: a parameter, the loss, or a layer and its line."""
    if step.label == "delta":
        i = moving_layer(case, step)
        line = case.line_of(("layers", i)) if i is not None else None
        if i is None:
            return case.shown_as(step.field)
        return f"{step.field} (layer {i}, {case.layers[i].kind}" + (f", line {line})" if line else ")")
    if step.culprit_layer is None:
        return "the loss"
    i = step.culprit_layer
    layer = case.layers[i]
    line = case.line_of(("layers", i))
    name = describe(layer) if layer.kind != "dense" or layer.activation != "leaky_relu" else f"leaky_relu {layer.alpha:g}"
    return f"layer {i} ({name}" + (f", line {line})" if line else ")")


def moving_layer(case: Case, step: Step) -> int | None:
    """The layer whose forward pass changes a moving statistic, for the delta of one; else None
    (a trainable parameter's delta is the optimizer's)."""
    if step.label != "delta" or case.trainable(step.field) or not step.field.startswith("layers."):
        return None
    return int(step.field.split(".")[1])


def _describe(case: Case, q: Quantity, verdict: _Verdict, values: dict, distance: dict, runs: list, oracle) -> Diagnosis:
    from . import hints

    step, meaning = q.at, q.meaning
    what = {**NAMED, "dA": f"dA (passed down to layer {step.layer})"}.get(step.label, step.label)
    who = (
        f"in {verdict.blamed}"
        if verdict.blamed
        else f"between {', '.join(values)}{' and the oracle' if verdict.off else ''} ({verdict.why_not})"
    )
    when = ""
    if step.step is not None and case.steps > 1:
        when = f"step {step.step + 1} of {case.steps}" + (", the steps before it agreeing, " if step.step else ", ")
    before = q.before if q.before is not None else BEFORE.get(step.label, "")
    sentence = f"{when}{where(case, step)}: {before}{what} differs first {who}: {meaning}"
    layer = step.culprit_layer if step.label != "delta" else moving_layer(case, step)
    line = case.line_of(("layers", layer)) if layer is not None else None
    agreeing = [n for n in values if n != verdict.blamed] if verdict.blamed else []
    result = Diagnosis(step.label, layer, verdict.blamed, agreeing, line, sentence, distance, step=step)
    reference = next((r for r in runs if r.engine in agreeing), None) or oracle
    culprit = next((r for r in runs if r.engine == verdict.blamed), None)
    if culprit is not None and reference is not None:
        result.hints = hints.hints(case, step, culprit, reference)
    return result


def diagnose_expected(
    case: Case, expected: list, result: StepResult, agreeing: list[str], oracle_checked: bool
) -> Diagnosis | None:
    """Engines that agree, golden values that do not: where the person's own numbers went wrong.

    ``expected`` holds the golden-value comparisons of the engines' runs; ``result`` is one of the
    agreeing engines' steps, the numbers the golden values are held against.
    """
    from .golden import golden_hints
    from .results import failed

    wrong = [c for c in expected if failed(c)]
    if not wrong or case.expected is None:
        return None
    params, exp = case.parameters(), case.expected
    failing = list(dict.fromkeys((c.param, c.extra.get("kind", "loss")) for c in wrong))  # (param, kind), once each
    labels = {key: key[0] if key[1] == "loss" else f"{exp.given_as.get(key[::-1], key[0])} ({key[1]})" for key in failing}
    who = ", ".join(agreeing) + (" and the oracle" if oracle_checked else "")
    sentence = (
        f"the golden values differ from what {who} computed, and {'they agree with each other' if len(agreeing) > 1 or oracle_checked else 'it is the only engine'}: "
        f"{', '.join(sorted(labels.values()))}"
    )
    hints: list[str] = []
    for (param, kind), label in sorted(labels.items(), key=lambda kv: kv[1]):
        given = np.asarray(exp.loss if kind == "loss" else getattr(exp, kind)[param], dtype=np.float64)
        computed = np.array(result.loss) if kind == "loss" else result.deltas.get(param)
        if computed is None:
            continue
        layout = "weight" if exp.given_as.get((kind, param), param).endswith(".weight") else "kernel"
        found = golden_hints(
            kind,
            param,
            given,
            np.asarray(computed, dtype=np.float64),
            None if kind == "loss" else params[param].astype(np.float64),
            case.lr,
            exp.rtol,
            exp.atol,
            batch=case.inputs.shape[0],
            outputs=case.targets.shape[1] if case.targets.ndim == 2 else 1,
            scale=case.scale,
            layout=layout,
        )
        hints += [f"{label}: {h}" for h in found]
    first = wrong[0]
    layer = int(first.param.split(".")[1]) if first.param.startswith("layers.") else None
    kind = first.extra.get("kind")
    line = (
        case.line_of(("expected", kind, exp.given_as.get((kind, first.param), first.param)))
        if kind
        else case.line_of(("expected", "loss"))
    )
    return Diagnosis("golden values", layer, "expected", list(agreeing), line, sentence, hints=hints)
