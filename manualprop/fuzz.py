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
from .casefile.layers import pair
from .concepts import ACTIVATIONS, LOSSES, OPTIMIZERS
from .harness import run_case
from .reference import variants
from .verdict.outcomes import Status
from .verdict.results import CaseResult, failed

# What is drawn comes from the declarations (manualprop.concepts), in their order: simplest first,
# as Hypothesis shrinks towards the front.
HIDDEN = [a.name for a in ACTIVATIONS.values() if not a.last_layer_only]
LAST_ONLY = [a.name for a in ACTIVATIONS.values() if a.last_layer_only]
PARAMETER_VALUES = {"alpha": [0.5, 0.25, 0.1, 0.01, 0.2, 0.3], "delta": [1.0, 0.5, 0.1, 2.0]}  # per declared parameter
NORM_EPSILONS = [1e-3, 1e-5]
MOMENTUMS = [0.99, 0.9, 0.5]
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
ARRAY_KEYS = ("kernel", "weight", "bias", "gamma", "beta", "moving_mean", "moving_variance", "init")
LEARNING_RATES = [0.1, 1.0, 0.01, 0.5, 1e-3, 1e-4]
WEIGHT_SCALES = [1.0, 0.5, 0.1, 2.0, 0.01, 3.0]
LOSS_SCALES = [1.0, 0.5, 2.0, 0.1]
LEAKY_FLOAT64 = "in float64 TensorFlow rounds leaky_relu's slope to float32 (cases/canaries/keras_float64_leaky_slope.yaml)"
TORCH_RUNNING_VARIANCE = (
    "PyTorch's batch norm keeps the unbiased batch variance in running_var "
    "(cases/canaries/torch_batch_norm_unbiased_running_variance.yaml)"
)
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


def _activation(choose, last: bool = False, needed: str | None = None) -> str | dict:
    activation = needed if needed else choose.sampled_from(HIDDEN + (LAST_ONLY if last else []))
    params = {p.name: choose.sampled_from(PARAMETER_VALUES[p.name]) for p in ACTIVATIONS[activation].params}
    return {"name": activation, **params} if params else activation


def _norm(choose, kind: str) -> dict:
    """A batch_norm or layer_norm layer's settings (its parameters are generated per case)."""
    layer: dict = {"type": kind, "epsilon": choose.sampled_from(NORM_EPSILONS)}
    if kind == "batch_norm":
        layer["momentum"] = choose.sampled_from(MOMENTUMS)
    return layer


def _image_layers(choose, shape: list[int]) -> list[dict]:
    """One or two blocks of conv2d, then maybe a pool or a batch norm, each fitting what comes in; then flatten."""
    layers: list[dict] = []
    for _ in range(choose.integers(1, 2)):
        padding = choose.sampled_from(["valid", "same"])
        limit = 3 if padding == "same" else min(3, shape[0], shape[1])
        kernel = [choose.integers(1, limit), choose.integers(1, limit)]
        strides = choose.integers(1, 2)
        layers.append(
            {
                "type": "conv2d",
                "filters": choose.integers(1, 4),
                "kernel_size": kernel,
                "strides": strides,
                "padding": padding,
                "activation": _activation(choose),
                "bias": not choose.booleans(),
            }
        )
        shape = _after(layers[-1], shape)
        after = choose.sampled_from([None, "max_pool2d", "avg_pool2d", "batch_norm"])
        if after == "batch_norm":
            layers.append(_norm(choose, "batch_norm"))
        elif after is not None:
            layers.append(
                {"type": after, "pool_size": [choose.integers(1, min(2, shape[0])), choose.integers(1, min(2, shape[1]))]}
            )
            shape = _after(layers[-1], shape)
    layers.append({"type": "flatten"})
    return layers


def architecture(choose, optimizers: bool = False) -> dict:
    """What a compiled model depends on: dtype, loss, its reduction, scale and parameters, the input
    shape and the layers: dense layers, each maybe followed by a norm layer; or images through one
    or two conv blocks and a flatten first (valid architectures only)."""
    loss = choose.sampled_from(list(LOSSES))
    declared_loss = LOSSES[loss]
    arch = {
        "dtype": choose.sampled_from(["float64", "float32"]),
        "loss": {
            "name": loss,
            "reduction": choose.sampled_from(["mean", "sum"]),
            "scale": choose.sampled_from(LOSS_SCALES),
            **{p.name: choose.sampled_from(PARAMETER_VALUES[p.name]) for p in declared_loss.params},
        },
        "features": choose.integers(1, 16),
        "layers": [],
    }
    if choose.booleans():  # images
        arch["features"] = [choose.integers(2, 7), choose.integers(2, 7), choose.integers(1, 3)]
        arch["layers"] = _image_layers(choose, arch["features"])
    depth = choose.integers(1, 4 if arch["layers"] else 5)
    needed = declared_loss.last_activation
    for i in range(depth):
        last = i == depth - 1
        activation = _activation(choose, last, needed if last else None)
        # a softmax of one unit is constant, and so are the classes of a sparse loss over one
        smallest = 1 if ACTIVATIONS[_name(activation)].elementwise and not (last and declared_loss.class_indices) else 2
        arch["layers"].append({"units": choose.integers(smallest, 16), "activation": activation, "bias": not choose.booleans()})
        norm = None if last else choose.sampled_from([None, None, "batch_norm", "layer_norm"])
        if norm:
            arch["layers"].append(_norm(choose, norm))
    if optimizers:
        optimizer = OPTIMIZERS[choose.sampled_from(list(OPTIMIZERS))]
        hyper = {
            p.name: choose.booleans() if p.kind is bool else choose.sampled_from(HYPER_VALUES[p.name]) for p in optimizer.params
        }
        arch["optimizer"] = {"name": optimizer.name, **hyper}
    return arch


def _size(arch: dict) -> tuple:
    """Simplest first: fewest layers, then the fewest units and filters, then the smallest input."""
    widths = sum(layer.get("units", layer.get("filters", 0)) for layer in arch["layers"])
    features = arch["features"] if isinstance(arch["features"], int) else math.prod(arch["features"])
    return (len(arch["layers"]), widths, features)


def pool(size: int, seed: int, optimizers: bool = False) -> list[dict]:
    """``size`` architectures from ``seed``, simplest first (Hypothesis shrinks towards the front)."""
    rng = random.Random(seed)
    found = [architecture(_Random(rng), optimizers) for _ in range(size)]
    return sorted(found, key=_size)


def _fan_in(layer: dict, shape: list[int]) -> int:
    return math.prod(pair(layer["kernel_size"])) * shape[-1] if layer.get("type") == "conv2d" else shape[-1]


def _after(layer: dict, shape: list[int]) -> list[int]:
    """One sample's shape after ``layer`` (the architecture is valid: drawn so)."""
    kind = layer.get("type", "dense")
    if kind == "dense":
        return [layer["units"]]
    if kind == "flatten":
        return [math.prod(shape)]
    if kind in ("conv2d", "max_pool2d", "avg_pool2d"):
        window = pair(layer.get("kernel_size", layer.get("pool_size")))
        strides = pair(layer.get("strides"), (1, 1) if kind == "conv2d" else window)
        if layer.get("padding") == "same":
            size = [-(-n // stride) for n, stride in zip(shape[:2], strides, strict=True)]
        else:
            size = [(n - k) // stride + 1 for n, k, stride in zip(shape[:2], window, strides, strict=True)]
        return [*size, layer["filters"] if kind == "conv2d" else shape[2]]
    return shape


def _layer_data(spec: dict, fan_in: int, weight_scale: float) -> dict:
    """A layer of the case file: the architecture's settings and generated parameters."""
    kind = spec.get("type", "dense")
    layer = {k: v for k, v in spec.items() if k != "bias"}
    if kind in ("dense", "conv2d"):
        layer["kernel"] = {"random": "normal", "std": weight_scale / math.sqrt(fan_in)}
        layer["bias"] = {"random": "normal", "std": 0.1} if spec["bias"] else False
    elif kind in ("batch_norm", "layer_norm"):
        layer["gamma"] = {"random": "normal", "mean": 1.0, "std": 0.5}
        layer["beta"] = {"random": "normal", "std": 0.1}
        if kind == "batch_norm":
            layer["moving_mean"] = {"random": "normal", "std": 0.1}
            layer["moving_variance"] = {"random": "uniform", "low": 0.5, "high": 1.5}
    return layer


@st.composite
def case_data(draw, architectures: list[dict] | None = None, optimizers: bool = False) -> dict:
    """The data of a random case file (what safe YAML of one would give): an architecture, drawn
    afresh or from ``architectures``, then the numbers of this case."""
    arch = draw(st.sampled_from(architectures)) if architectures else architecture(_Hypothesis(draw), optimizers)
    # PyTorch's batch norm refuses one value per feature in training mode: a batch of two at least there
    batch = draw(st.integers(2 if any(layer.get("type") == "batch_norm" for layer in arch["layers"]) else 1, 32))
    weight_scale = draw(st.sampled_from(WEIGHT_SCALES))
    shape = [arch["features"]] if isinstance(arch["features"], int) else list(arch["features"])
    layers = []
    for spec in arch["layers"]:
        layers.append(_layer_data(spec, _fan_in(spec, shape), weight_scale))
        shape = _after(spec, shape)
    data = {
        "dtype": arch["dtype"],
        "seed": draw(st.integers(0, 2**32 - 1)),
        "loss": dict(arch["loss"]),
        "lr": draw(st.sampled_from(LEARNING_RATES)),
        "inputs": {"random": "uniform", "shape": [batch, *np.atleast_1d(arch["features"]).tolist()], "low": -1.0, "high": 1.0},
        "targets": {"random": LOSSES[arch["loss"]["name"]].targets},
        "layers": layers,
    }
    if "optimizer" in arch:
        data.update(optimizer=dict(arch["optimizer"]), steps=draw(st.integers(1, MAX_STEPS)))
    return with_known_conventions(data)


def with_known_conventions(data: dict) -> dict:
    """Declare the documented differences a case may run into (the canaries), so that they are
    not findings. Coarse on purpose for Keras: a float32 case with a tanh layer excuses Keras whether
    or not a unit saturates; the canaries pin each convention exactly. PyTorch's running variance is
    excused on the moving variances alone: torch is compared on everything else."""
    known: dict = {}
    optimizer = data.get("optimizer")
    pinned = []
    if optimizer is not None:  # Keras's own update formulas where no setting gives the SPEC's (manualprop.reference.variants)
        hyper = OPTIMIZERS[optimizer["name"]].settings(optimizer)
        pinned = [
            v
            for v in variants.VARIANTS
            if v.optimizer == optimizer["name"] and v.differs(hyper) and "cases/canaries/" in v.pinned
        ]
    alphas = [layer["activation"]["alpha"] for layer in data["layers"] if isinstance(layer.get("activation"), dict)]
    if pinned:
        known["keras"] = f"{pinned[0].who}: {pinned[0].formula} ({pinned[0].pinned})"
    elif data["dtype"] == "float64" and any(float(np.float32(a)) != a for a in alphas):
        known["keras"] = LEAKY_FLOAT64
    elif data["dtype"] == "float32" and any(layer.get("activation") == "tanh" for layer in data["layers"]):
        known["keras"] = TANH_FLOAT32
    variances = [f"layers.{i}.moving_variance" for i, layer in enumerate(data["layers"]) if layer.get("type") == "batch_norm"]
    if variances:
        known["torch"] = {"reason": TORCH_RUNNING_VARIANCE, "params": variances}
    return {**data, "known_differences": known} if known else data


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
    unit or filter, one sample, one feature. Generated arrays follow the new shapes; a candidate that
    is no valid case (a flatten removed between a conv and a dense layer) is simply not taken. The
    optimizer stays (a difference often lives in it), but its steps go down to the fewest."""
    layers, loss = data["layers"], data["loss"]
    if data.get("steps", 1) > 1:
        yield {**data, "steps": 1}
        yield {**data, "steps": data["steps"] - 1}
    plain_loss = {"name": "mse", "reduction": "mean", "scale": 1.0}
    for i in range(len(layers)):
        if len(layers) > 1:
            rest = [layer for j, layer in enumerate(layers) if j != i]
            if LOSSES[loss["name"]].last_activation in (None, _name(rest[-1].get("activation", "linear"))):
                yield {**data, "layers": rest}
            else:
                yield {**data, "layers": rest, "loss": plain_loss, "targets": {"random": "normal"}}
    if loss != plain_loss and _name(layers[-1].get("activation", "linear")) not in LAST_ONLY:
        yield {**data, "loss": plain_loss, "targets": {"random": "normal"}}
    for i, layer in enumerate(layers):
        key = "units" if "units" in layer else "filters" if "filters" in layer else None
        smallest = 1 if ACTIVATIONS[_name(layer.get("activation", "linear"))].elementwise else 2
        if key and layer[key] > smallest:
            yield {**data, "layers": [*layers[:i], {**layer, key: smallest}, *layers[i + 1 :]]}
    flatten = next((i for i, layer in enumerate(layers) if layer.get("type") == "flatten"), None)
    if flatten is not None and flatten + 1 < len(layers):  # images to features: the dense part alone
        yield {**data, "layers": layers[flatten + 1 :], "inputs": {**data["inputs"], "shape": [data["inputs"]["shape"][0], 1]}}
    batch, *sample = data["inputs"]["shape"]
    if batch > 1:
        yield {**data, "inputs": {**data["inputs"], "shape": [1, *sample]}}
    if len(sample) == 1 and sample[0] > 1:
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
    slots: list[tuple] = [("inputs",), ("targets",)]
    for i, (spec, layer) in enumerate(zip(data["layers"], case.layers, strict=True)):
        entry = {key: value for key, value in spec.items() if key not in ARRAY_KEYS}
        arrays = layer.arrays()
        entry.update({name: value.astype(np.float64).tolist() for name, value in arrays.items()})
        if spec.get("bias") is False:
            entry["bias"] = False
        explicit["layers"].append(entry)
        slots += [("layers", i, name) for name in arrays]
    if not still_fails(explicit):  # the float32 cast changed something: keep the generated form
        return data
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
