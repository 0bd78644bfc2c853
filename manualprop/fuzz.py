"""``manualprop fuzz``: random cases through every installed engine; each disagreement shrunk to
a minimal case file.

Cases are drawn by Hypothesis (depth 1-5, widths 1-16, every activation, every loss and
reduction, float32 and float64, batch 1-32, learning rates and weight scales over several orders
of magnitude). Their arrays are generated from a seed, so a case is a few numbers. When the
engines disagree, Hypothesis shrinks the case (fewest layers, smallest widths and batch, simplest
choices), then the arrays are written out and their numbers rounded to as few significant digits
as still disagree. The result is a case file ready for cases/, with a comment saying how it was
found. Disagreements that a case declares as known, and the conventions the canaries document,
are not findings.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, Phase, find, settings, strategies as st
from hypothesis.errors import HypothesisWarning, NoSuchExample

from . import engines as registry
from .casefile.case import case_from_data, parse_case
from .casefile.errors import CaseError
from .concepts import ACTIVATIONS, LOSSES, OPTIMIZERS
from .harness import run_case
from .reference import variants
from .verdict.outcomes import Status
from .verdict.results import CaseResult, failed

# What is drawn comes from the declarations (manualprop.concepts), in their order: simplest first,
# as Hypothesis shrinks towards the front.
HIDDEN = [a.name for a in ACTIVATIONS.values() if not a.last_layer_only]
LAST_ONLY = [a.name for a in ACTIVATIONS.values() if a.last_layer_only]
PARAMETER_VALUES = {"alpha": [0.5, 0.25, 0.1, 0.01, 0.2, 0.3]}  # per declared parameter, by name
# Per declared optimizer hyperparameter, by name (switches are drawn as booleans); simplest first.
HYPER_VALUES = {
    "momentum": [0.0, 0.9, 0.5],
    "weight_decay": [0.0, 0.01, 0.1],
    "beta1": [0.9, 0.5],
    "beta2": [0.999, 0.9],
    "epsilon": [1e-7, 1e-8, 1e-3],
    "rho": [0.9, 0.99],
    "initial_accumulator": [0.1, 0.0],
}
MAX_STEPS = 5
LEARNING_RATES = [0.1, 1.0, 0.01, 0.5, 1e-3, 1e-4]
WEIGHT_SCALES = [1.0, 0.5, 0.1, 2.0, 0.01, 3.0]
LOSS_SCALES = [1.0, 0.5, 2.0, 0.1]
LEAKY_FLOAT64 = "in float64 TensorFlow rounds leaky_relu's slope to float32 (cases/canaries/keras_float64_leaky_slope.yaml)"
TANH_FLOAT32 = (
    "TensorFlow's float32 tanh saturates to exactly 1 from |z| >= 8 and is less accurate near it "
    "(cases/canaries/keras_float32_tanh_saturation.yaml)"
)


class _Hypothesis:
    """Choices drawn by Hypothesis (so that it can shrink them)."""

    def __init__(self, draw):
        self.draw = draw

    def integers(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def sampled_from(self, options: list):
        return self.draw(st.sampled_from(options))

    def booleans(self) -> bool:
        return self.draw(st.booleans())


class _Random:
    """The same choices from a seeded random generator (for a pool of architectures)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def integers(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def sampled_from(self, options: list):
        return self.rng.choice(options)

    def booleans(self) -> bool:
        return self.rng.random() < 0.5


def architecture(choose, optimizers: bool = False) -> dict:
    """What a compiled model depends on: dtype, loss, its reduction and scale, and the layers."""
    loss = choose.sampled_from(list(LOSSES))
    arch = {
        "dtype": choose.sampled_from(["float64", "float32"]),
        "loss": {"name": loss, "reduction": choose.sampled_from(["mean", "sum"]), "scale": choose.sampled_from(LOSS_SCALES)},
        "features": choose.integers(1, 16),
        "layers": [],
    }
    depth = choose.integers(1, 5)
    needed = LOSSES[loss].last_activation
    for i in range(depth):
        last = i == depth - 1
        activation = needed if last and needed else choose.sampled_from(HIDDEN + (LAST_ONLY if last else []))
        declared = ACTIVATIONS[activation]
        layer: dict = {"units": choose.integers(1 if declared.elementwise else 2, 16)}  # a softmax of one unit is constant
        params = {p.name: choose.sampled_from(PARAMETER_VALUES[p.name]) for p in declared.params}
        layer["activation"] = {"name": activation, **params} if params else activation
        layer["bias"] = not choose.booleans()
        arch["layers"].append(layer)
    if optimizers:
        optimizer = OPTIMIZERS[choose.sampled_from(list(OPTIMIZERS))]
        hyper = {
            p.name: choose.booleans() if p.kind is bool else choose.sampled_from(HYPER_VALUES[p.name]) for p in optimizer.params
        }
        arch["optimizer"] = {"name": optimizer.name, **hyper}
    return arch


def pool(size: int, seed: int, optimizers: bool = False) -> list[dict]:
    """``size`` architectures from ``seed``, simplest first (Hypothesis shrinks towards the front)."""
    rng = random.Random(seed)
    found = [architecture(_Random(rng), optimizers) for _ in range(size)]
    return sorted(found, key=lambda a: (len(a["layers"]), sum(layer["units"] for layer in a["layers"]), a["features"]))


@st.composite
def case_data(draw, architectures: list[dict] | None = None, optimizers: bool = False) -> dict:
    """The data of a random case file (what safe YAML of one would give): an architecture, drawn
    afresh or from ``architectures``, then the numbers of this case."""
    arch = draw(st.sampled_from(architectures)) if architectures else architecture(_Hypothesis(draw), optimizers)
    batch = draw(st.integers(1, 32))
    weight_scale = draw(st.sampled_from(WEIGHT_SCALES))
    layers, fan_in = [], arch["features"]
    for spec in arch["layers"]:
        layers.append(
            {
                "units": spec["units"],
                "activation": spec["activation"],
                "kernel": {"random": "normal", "std": weight_scale / math.sqrt(fan_in)},
                "bias": {"random": "normal", "std": 0.1} if spec["bias"] else False,
            }
        )
        fan_in = spec["units"]
    data = {
        "dtype": arch["dtype"],
        "seed": draw(st.integers(0, 2**32 - 1)),
        "loss": dict(arch["loss"]),
        "lr": draw(st.sampled_from(LEARNING_RATES)),
        "inputs": {"random": "uniform", "shape": [batch, arch["features"]], "low": -1.0, "high": 1.0},
        "targets": {"random": LOSSES[arch["loss"]["name"]].targets},
        "layers": layers,
    }
    if "optimizer" in arch:
        data.update(optimizer=dict(arch["optimizer"]), steps=draw(st.integers(1, MAX_STEPS)))
    return with_known_conventions(data)


def with_known_conventions(data: dict) -> dict:
    """Declare the documented differences a case may run into (the canaries), so that they are
    not findings. Coarse on purpose: a float32 case with a tanh layer excuses Keras whether or not
    a unit saturates; the canaries pin each convention exactly."""
    optimizer = data.get("optimizer")
    if optimizer is not None:  # Keras's own update formulas where no setting gives the SPEC's (manualprop.reference.variants)
        hyper = OPTIMIZERS[optimizer["name"]].settings(optimizer)
        pinned = [
            v
            for v in variants.VARIANTS
            if v.optimizer == optimizer["name"] and v.differs(hyper) and "cases/canaries/" in v.pinned
        ]
        if pinned:
            return {**data, "known_differences": {"keras": f"{pinned[0].who}: {pinned[0].formula} ({pinned[0].pinned})"}}
    alphas = [layer["activation"]["alpha"] for layer in data["layers"] if isinstance(layer["activation"], dict)]
    if data["dtype"] == "float64" and any(float(np.float32(a)) != a for a in alphas):
        return {**data, "known_differences": {"keras": LEAKY_FLOAT64}}
    if data["dtype"] == "float32" and any(layer["activation"] == "tanh" for layer in data["layers"]):
        return {**data, "known_differences": {"keras": TANH_FLOAT32}}
    return data


def to_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def is_finding(result: CaseResult) -> bool:
    """An engine crashed, a comparison failed that no known difference explains, or only some
    engines produced a NaN or an infinity. A known difference that did not show is not a finding."""
    if result.error is not None:
        return False
    runs = [r for r in result.runs.values() if r.status != Status.SKIPPED]
    if any(r.status == Status.ERROR for r in runs):
        return True
    non_finite = [r.non_finite is not None for r in runs]
    if any(non_finite):
        return not all(non_finite)
    return any(failed(c) for c in result.comparisons)


@dataclass
class Finding:
    path: Path
    sentence: str


@dataclass
class Summary:
    cases: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    closest: float = 0.0  # the largest worst error / tolerance among the cases that agreed
    closest_case: str = ""
    closest_data: dict | None = None  # that case, to write out and look at
    repeats: int = 0  # findings with the diagnosis of one already written

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0


class Runner:
    """Runs drawn cases and keeps the tallies; a case is counted once, shrinking steps are not."""

    def __init__(self, engines: list[str], summary: Summary, progress: Callable[[Summary], None] | None):
        self.engines = engines
        self.summary = summary
        self.progress = progress
        self.known = registry.names()
        self.shrinking = False

    def result(self, data: dict) -> CaseResult | None:
        try:
            case = case_from_data(data, "fuzz.yaml", default_name="fuzz", known_engines=self.known)
        except CaseError:
            return None
        return run_case(case, self.engines)

    def __call__(self, data: dict) -> bool:
        result = self.result(data)
        if result is None:
            return False
        finding = is_finding(result)
        if not self.shrinking:
            self.summary.cases += 1
            # The margin of the tolerances: comparisons of engines with no declared difference on this case.
            plain = [c for c in result.comparisons if not {c.a, c.b} & set(result.loaded.known_differences)]
            worst = max(plain, key=lambda c: c.worst_ratio, default=None)
            if not finding and worst is not None and worst.worst_ratio > self.summary.closest:
                self.summary.closest = worst.worst_ratio
                self.summary.closest_case = f"seed {data['seed']}: {worst.param} {worst.a}-{worst.b}"
                self.summary.closest_data = data
            if self.progress:
                self.progress(self.summary)
            self.shrinking = finding
        return finding


def _smaller(data: dict):
    """Candidate cases one step simpler than ``data``: fewer steps, a layer fewer, a plain loss, one
    unit, one sample, one feature. Each is a valid case (generated arrays follow the new shapes);
    the optimizer stays (a difference often lives in it), but its steps go down to the fewest."""
    layers, loss = data["layers"], data["loss"]
    if data.get("steps", 1) > 1:
        yield {**data, "steps": 1}
        yield {**data, "steps": data["steps"] - 1}
    plain_loss = {"name": "mse", "reduction": "mean", "scale": 1.0}
    for i in range(len(layers)):
        if len(layers) > 1:
            rest = [layer for j, layer in enumerate(layers) if j != i]
            if LOSSES[loss["name"]].last_activation in (None, rest[-1]["activation"]):
                yield {**data, "layers": rest}
            else:
                yield {**data, "layers": rest, "loss": plain_loss, "targets": {"random": "normal"}}
    if loss != plain_loss and _name(layers[-1]["activation"]) not in LAST_ONLY:
        yield {**data, "loss": plain_loss, "targets": {"random": "normal"}}
    for i, layer in enumerate(layers):
        smallest = 1 if ACTIVATIONS[_name(layer["activation"])].elementwise else 2
        if layer["units"] > smallest:
            yield {**data, "layers": [*layers[:i], {**layer, "units": smallest}, *layers[i + 1 :]]}
    batch, features = data["inputs"]["shape"]
    if batch > 1:
        yield {**data, "inputs": {**data["inputs"], "shape": [1, features]}}
    if features > 1:
        yield {**data, "inputs": {**data["inputs"], "shape": [batch, 1]}}


def _name(activation: str | dict) -> str:
    return activation["name"] if isinstance(activation, dict) else activation


def reduce_structure(data: dict, still_fails: Callable[[dict], bool]) -> dict:
    """Greedy steps past Hypothesis's shrinking, which can stop where one choice constrains another
    (a cross-entropy case must end in softmax): take any simpler case that still fails, repeat."""
    improved = True
    while improved:
        improved = False
        for candidate in _smaller(data):
            if still_fails(with_known_conventions({k: v for k, v in candidate.items() if k != "known_differences"})):
                data, improved = with_known_conventions({k: v for k, v in candidate.items() if k != "known_differences"}), True
                break
    return data


def simplify_numbers(data: dict, still_fails: Callable[[dict], bool]) -> dict:
    """The case with its arrays written out, each rounded to as few significant digits as still fail."""
    case = parse_case(to_yaml(data), "fuzz.yaml", known_engines=registry.names())
    explicit = {k: v for k, v in data.items() if k not in ("seed", "inputs", "targets", "layers")}
    explicit["inputs"] = case.inputs.astype(np.float64).tolist()
    explicit["targets"] = case.targets.astype(np.float64).tolist()
    explicit["layers"] = []
    for spec, layer in zip(data["layers"], case.layers, strict=True):
        entry = {"units": spec["units"], "activation": spec["activation"], "kernel": layer.kernel.astype(np.float64).tolist()}
        entry["bias"] = False if layer.bias is None else layer.bias.astype(np.float64).tolist()
        explicit["layers"].append(entry)
    if not still_fails(explicit):  # the float32 cast changed something: keep the generated form
        return data
    slots = [("inputs",), ("targets",)] + [("layers", i, key) for i in range(len(case.layers)) for key in ("kernel", "bias")]
    for slot in slots:
        original = _get(explicit, slot)
        if original is False:
            continue
        for digits in (1, 2, 3, 5):
            candidate = _round(original, digits)
            _set(explicit, slot, candidate)
            if still_fails(explicit):
                break
        else:
            _set(explicit, slot, original)
    return explicit


def _get(data, slot):
    for key in slot:
        data = data[key]
    return data


def _set(data, slot, value):
    for key in slot[:-1]:
        data = data[key]
    data[slot[-1]] = value


def _round(values, digits: int):
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return float(f"{values:.{digits}g}")


def write_case(data: dict, out: Path, header: list[str], explain: Callable[[str, str], str]) -> Path:
    """Write the case with a comment header; ``explain(text, path)`` gives its diagnosis, with the
    lines of the file as written (the header is one line a sentence, so it is filled in last)."""
    name = "fuzz-" + hashlib.sha256(to_yaml(data).encode()).hexdigest()[:10]
    body = to_yaml({"name": name, **data})
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"

    def text(sentence: str) -> str:
        return "".join(f"# {line}\n" for line in [*header, f"What disagreed: {sentence}"]) + body

    path.write_text(text(explain(text("..."), str(path))), encoding="utf-8")
    return path


def fuzz(
    n: int,
    seed: int,
    out: Path,
    engines: Iterable[str] | None = None,
    progress: Callable[[Summary], None] | None = None,
    architectures: int | None = None,
    optimizers: bool = True,
) -> Summary:
    """Run ``n`` random cases; write each distinct finding, minimised, to ``out``.

    Every case has an architecture of its own, unless ``architectures`` asks for a pool of that
    many: Keras then reuses its compiled models (a new architecture costs it a model build and a
    traced step, 0.1 to 0.3 s), and shrinking goes to the simplest architecture of the pool.
    ``optimizers`` draws the optimizer, its hyperparameters and 1 to MAX_STEPS steps too (off:
    one plain SGD step, the fuzzer before the optimizers). A gradient that is nearly nothing can
    then meet an update normalized by sqrt(v), or several steps: the comparison allows what its
    rounding can move (:mod:`manualprop.verdict.conditioning`), so that is not a finding."""
    choices = pool(architectures, seed, optimizers) if architectures else None
    names = list(engines) if engines else [e for e in registry.default_names() if registry.get(e).unavailable() is None]
    summary = Summary()
    rng = random.Random(seed)
    start = time.perf_counter()
    signatures: set[str] = set()
    while summary.cases < n:
        runner = Runner(names, summary, progress)
        config = settings(
            max_examples=n - summary.cases,
            database=None,
            deadline=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        try:
            with warnings.catch_warnings():
                # TensorFlow raises the recursion limit when it is imported, mid-run: harmless here.
                warnings.filterwarnings("ignore", "The recursion limit will not be reset", HypothesisWarning)
                found = find(case_data(choices, optimizers), runner, settings=config, random=rng)
        except NoSuchExample:
            break

        # Both closures take this iteration's runner as a default argument, bound here.
        def fails(data: dict, runner: Runner = runner) -> bool:
            return is_finding(runner.result(data) or CaseResult(""))

        minimal = simplify_numbers(reduce_structure(found, fails), fails)
        # One file per distinct fault: the same diagnosis (lines aside) found again is not written twice.
        again = runner.result(minimal)
        signature = re.sub(r", line \d+", "", again.diagnosis.sentence if again and again.diagnosis else "the engines disagree")
        if signature in signatures:
            summary.repeats += 1
            continue
        signatures.add(signature)

        def explain(text: str, where: str, runner: Runner = runner) -> str:
            result = run_case(parse_case(text, where, known_engines=runner.known), names)
            return result.diagnosis.sentence if result.diagnosis else "the engines disagree"

        flags = (f" --architectures {architectures}" if architectures else "") + ("" if optimizers else " --plain-sgd")
        header = [
            f"Found by: manualprop fuzz --n {n} --seed {seed}{flags} --engines {','.join(names)}",
            "Shrunk by Hypothesis (fewest layers, smallest widths and batch), numbers rounded while it still failed.",
        ]
        path = write_case(minimal, out, header, explain)
        summary.findings.append(
            Finding(path, path.read_text(encoding="utf-8").splitlines()[2].removeprefix("# What disagreed: "))
        )
    summary.seconds = time.perf_counter() - start
    return summary
