"""A case: a validated case file turned into arrays, every engine's common input.

Loading runs in three stages, each reporting every problem it finds with the file, the line and
the field path: safe YAML (:mod:`manualprop.casefile.yamlsafe`), the schema (:mod:`manualprop.casefile.schema`),
then the checks below (shapes, links between fields, sizes). Generated arrays are drawn here,
once, from ``numpy.random.default_rng(seed)`` in file order (inputs, targets, then each layer's
kernel and bias), so every engine receives the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydantic import ValidationError

from .. import concepts
from ..verdict.compare import DEFAULT_TOLERANCE, EXPECTED_TOLERANCE
from . import schema, yamlsafe
from .errors import CaseError, Problem, format_path
from .layers import LayerChecks, pair, takes_images, written_shape

MAX_ELEMENTS = 10_000_000  # per array, generated or implied by a layer's size
PARAM_NAME = re.compile(r"^layers\.(\d+)\.(kernel|bias|weight|gamma|beta|moving_mean|moving_variance)$")
STATE_NAMES = frozenset(name for kind in concepts.LAYER_TYPES.values() for name in kind.state)


@dataclass(frozen=True)
class Layer:
    """A layer ready to run (SPEC section 8); ``kind`` is a name of :data:`manualprop.concepts.LAYER_TYPES`.

    dense: ``A = activation(A_prev @ kernel + bias)``, kernel (in, out). conv2d: kernel (kh, kw, in,
    out), ``units`` its filters. batch_norm and layer_norm: ``gamma``, ``beta``, and batch_norm's
    ``moving_mean`` and ``moving_variance``. Pooling and flatten have no parameters.
    ``in_shape`` and ``out_shape`` are one sample's: (features,) or (height, width, channels).
    """

    units: int  # dense units, conv filters; the output's last axis for the other kinds
    activation: str
    alpha: float  # the leaky_relu slope; 0 for other activations
    kernel: np.ndarray | None  # dense (in, out); conv2d (kh, kw, in, out)
    bias: np.ndarray | None  # (out,), or None for a layer without bias
    line: int | None = None  # where the layer starts in the case file
    layout: str = "kernel"  # how the case file gives the kernel: kernel (in, out) or weight (out, in)
    kind: str = "dense"
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    window: tuple[int, int] = (1, 1)  # conv2d's kernel_size, a pool's pool_size
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"  # conv2d: valid or same (TensorFlow's rule)
    epsilon: float = 0.0  # batch_norm, layer_norm
    momentum: float = 0.0  # batch_norm, Keras's convention: moving <- momentum moving + (1 - momentum) stat
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    moving_mean: np.ndarray | None = None
    moving_variance: np.ndarray | None = None

    @property
    def declared(self) -> concepts.LayerType:
        return concepts.LAYER_TYPES[self.kind]

    @property
    def architecture(self) -> tuple:
        """Everything that shapes the built layer but its arrays: what a framework's model cache keys on."""
        return (
            self.kind,
            self.units,
            self.activation,
            self.alpha,
            self.bias is not None,
            self.in_shape,
            self.out_shape,
            self.window,
            self.strides,
            self.padding,
            self.epsilon,
            self.momentum,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Its parameters and state by short name (kernel, bias, gamma, ...), in report order."""
        found = {name: getattr(self, name) for name in self.declared.reported}
        return {name: value for name, value in found.items() if value is not None}


@dataclass(frozen=True)
class Expected:
    """Golden values; ``updated`` and ``deltas`` are keyed by parameter name, kernels (in, out)."""

    loss: float | list[float] | None  # before the step, or before each step
    updated: dict[str, np.ndarray]
    deltas: dict[str, np.ndarray]
    rtol: float
    atol: float
    given_as: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, kernel name) -> key in the file


@dataclass(frozen=True)
class Case:
    """Everything one step needs, already checked: engines never see an invalid case."""

    name: str
    path: str
    description: str
    dtype: np.dtype
    seed: int
    loss: str  # canonical name: mse, mae or categorical_crossentropy
    reduction: str
    scale: float
    lr: float
    inputs: np.ndarray  # (batch, features) or images (batch, height, width, channels)
    targets: np.ndarray  # (batch, outputs); class indices (batch,) of integers for a sparse loss
    layers: tuple[Layer, ...]
    engines: tuple[str, ...] | None
    rtol: float
    atol: float
    loss_params: dict[str, float] = field(default_factory=dict)  # the loss's own parameters (huber's delta)
    expected: Expected | None = None
    lines: dict[tuple, int] = field(default_factory=dict, repr=False)
    known_differences: dict[str, str] = field(default_factory=dict)  # engine -> reason
    known_params: dict[str, tuple[str, ...]] = field(default_factory=dict)  # engine -> the only parameters it differs on
    optimizer: str = "sgd"  # a name declared in manualprop.concepts.OPTIMIZERS
    hyper: dict[str, float | bool] = field(default_factory=dict)  # every hyperparameter of the optimizer, defaults filled in
    steps: int = 1  # updates, each on the same batch; deltas are after the last minus before the first

    def parameters(self) -> dict[str, np.ndarray]:
        """The initial parameters and state by name (``layers.<i>.kernel``, ...), kernels in the
        (in, out) layout (conv2d: (kh, kw, in, out))."""
        return {f"layers.{i}.{name}": value for i, layer in enumerate(self.layers) for name, value in layer.arrays().items()}

    def trainable(self, param: str) -> bool:
        """Whether the optimizer updates ``param`` (a moving statistic is changed by the forward pass)."""
        return param.rsplit(".", 1)[-1] not in STATE_NAMES

    @property
    def images(self) -> bool:
        """Whether the inputs are images (batch, height, width, channels)."""
        return self.inputs.ndim == 4

    def with_parameters(self, params: dict[str, np.ndarray]) -> Case:
        """The same case with other parameter and state values (by name, kernels (in, out)): the
        network as it stands before a later step."""
        layers = tuple(
            dataclasses.replace(
                layer,
                **cast(dict[str, Any], {name: params.get(f"layers.{i}.{name}", value) for name, value in layer.arrays().items()}),
            )
            for i, layer in enumerate(self.layers)
        )
        return dataclasses.replace(self, layers=layers)

    def shown_as(self, param: str) -> str:
        """The parameter's name in the case file's own layout: ``layers.0.weight`` for a kernel
        given as ``weight`` (out, in), else the name itself."""
        match = PARAM_NAME.match(param)
        if match and match[2] == "kernel" and self.layers[int(match[1])].layout == "weight":
            return f"layers.{match[1]}.weight"
        return param

    def in_file_layout(self, param: str, array: np.ndarray) -> np.ndarray:
        """An (in, out) array of ``param`` as the case file lays it out (transposed for ``weight``)."""
        return as_weight(array) if self.shown_as(param) != param else np.asarray(array)

    def line_of(self, path: tuple) -> int | None:
        """The line of ``path`` in the file, or of its nearest enclosing field."""
        return _line_of(self.lines, path)


def as_weight(kernel: np.ndarray) -> np.ndarray:
    """A kernel in PyTorch's layout: dense (in, out) -> (out, in), conv2d (kh, kw, in, out) -> (out, in, kh, kw)."""
    kernel = np.asarray(kernel)
    return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def as_kernel(weight: np.ndarray) -> np.ndarray:
    """The inverse of :func:`as_weight`: PyTorch's layout back to the Keras one the SPEC reports."""
    weight = np.asarray(weight)
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def display_path(path: Path) -> str:
    """The path relative to the working folder when it lies below it, else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


def load_case(path: str | os.PathLike, known_engines: Iterable[str] | None = None) -> Case:
    """Read, validate and materialise one case file; raise CaseError listing every problem."""
    file = Path(path)
    shown = display_path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaseError(shown, [Problem((), "no such file")]) from None
    except UnicodeDecodeError as err:
        raise CaseError(shown, [Problem((), f"the file is not UTF-8 text ({err.reason} at byte {err.start})")]) from None
    except OSError as err:
        raise CaseError(shown, [Problem((), f"cannot read the file: {err.strerror}")]) from None
    return parse_case(text, shown, default_name=file.stem, known_engines=known_engines)


def parse_case(text: str, file: str, default_name: str = "case", known_engines: Iterable[str] | None = None) -> Case:
    """Validate the text of a case file shown to the user as ``file``."""
    try:
        data, lines = yamlsafe.load(text)
    except yamlsafe.YamlError as err:
        raise CaseError(file, [err.problem]) from None
    if not isinstance(data, dict):
        found = "a list" if isinstance(data, list) else "nothing" if data is None else f"{type(data).__name__} {_show(data)}"
        raise CaseError(
            file,
            [
                Problem(
                    (),
                    f"expected a mapping of fields (lr:, loss:, layers: ...), found {found}",
                    lines.get((), 1) if isinstance(data, list) else 1,
                )
            ],
        )
    return case_from_data(data, file, default_name, known_engines, lines)


def case_from_data(
    data: dict,
    file: str,
    default_name: str = "case",
    known_engines: Iterable[str] | None = None,
    lines: dict[tuple, int] | None = None,
) -> Case:
    """Validate a case already read as data (what safe YAML gives); ``lines`` maps fields to lines."""
    lines = lines or {}
    try:
        spec = schema.CaseSpec.model_validate(data)
    except ValidationError as err:
        errors: list[dict[str, Any]] = [
            {**e, "loc": tuple(part for part in e["loc"] if part not in schema.UNION_TAGS)} for e in err.errors()
        ]
        # a key suggested as a required field stands in for it: its message says so already
        meant = {(*e["loc"][:-1], _suggested_key(e["loc"])) for e in errors if e["type"] == "extra_forbidden"}
        problems = [_problem_from_pydantic(e, lines) for e in errors if not (e["type"] == "missing" and e["loc"] in meant)]
        raise CaseError(file, sorted(problems, key=lambda p: p.line or 0)) from None
    builder = _Builder(spec, lines, known_engines)
    case = builder.build(file, default_name)
    if builder.problems or case is None:  # no case is built without a problem to say why
        raise CaseError(file, builder.problems)
    return case


def _line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    path = tuple(path)
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


def _problem_from_pydantic(error: dict, lines: dict[tuple, int]) -> Problem:
    loc = tuple(part for part in error["loc"] if part not in schema.UNION_TAGS)
    kind, found = error["type"], error.get("input")
    if kind == "extra_forbidden":
        close = _suggested_key(loc)
        hint = f"; did you mean {close!r}?" if close else ""
        message = f"unknown key {loc[-1]!r}{hint}"
    elif kind == "missing":
        message = f"missing required field {loc[-1]!r}"
    elif kind == "union_tag_not_found":
        message = (
            "a generated array needs `random: uniform`, `random: normal` or `random: one_hot` "
            "(`random: classes` for a sparse loss's targets)"
        )
    elif kind == "union_tag_invalid":
        message = (
            f"expected random: uniform, normal or one_hot (classes: a sparse loss's targets), found {found.get('random')!r}"
            if isinstance(found, dict)
            else error["msg"]
        )
    elif kind == "list_type" and loc and loc[-1] in ("inputs", "targets", *schema.ARRAY_FIELDS):
        message = f"expected a list of numbers or a {{random: ...}} mapping, found {_show(found)}"
    else:
        message = f"{_lower_first(error['msg'])}, found {_show(found)}"
        if kind == "literal_error" and isinstance(found, str):
            choices = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
            close = closest(found, choices, schema.VALUE_ALIASES.get(loc[-1]))
            message += f"; did you mean {close!r}?" if close else ""
        elif kind in _BOUNDS and len(loc) > 2 and loc[0] == "layers" and loc[2] in schema.LayerSpec.model_fields:
            meaning = schema.LayerSpec.model_fields[loc[2]].description
            message += f" ({meaning})" if meaning else ""
    return Problem(loc, message, _line_of(lines, loc))


_BOUNDS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _suggested_key(loc: tuple) -> str | None:
    """The field an unknown key at ``loc`` was most likely meant as, among the keys allowed beside it."""
    parent = loc[-2] if len(loc) > 1 else None
    allowed = schema.KEYS_UNDER.get(int if isinstance(parent, int) else parent, schema.FIELD_NAMES)
    return closest(str(loc[-1]), allowed, {alias: name for alias, name in schema.KEY_ALIASES.items() if name in allowed})


def closest(word: str, names: Iterable[str], aliases: dict[str, str] | None = None) -> str | None:
    """The name nearest to ``word`` by edit distance (an alias counts as its name), if near enough to be a slip.

    Near enough: fewer edits than half the longer of the two. Ties go to the later name, so an
    index past the last layer suggests the last layer.
    """
    word = word.lower()
    candidates = [(name, name) for name in names] + list((aliases or {}).items())
    scored = []
    for order, (spelled, name) in enumerate(candidates):
        distance = _edit_distance(word, spelled)
        if 2 * distance < max(len(word), len(spelled)):
            scored.append((distance, -order, name))
    return min(scored)[2] if scored else None


def _edit_distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (optimal string alignment): insertions, deletions, substitutions
    and swaps of two neighbours (``wieght`` -> ``weight``) each count one."""
    d = [[i + j if i == 0 or j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Builder(LayerChecks):
    """Turns a schema-valid CaseSpec into a Case, collecting every problem on the way."""

    def __init__(self, spec: schema.CaseSpec, lines: dict[tuple, int], known_engines: Iterable[str] | None):
        self.spec = spec
        self.lines = lines
        self.known_engines = None if known_engines is None else tuple(known_engines)
        self.problems: list[Problem] = []
        self.dtype = np.dtype(spec.dtype)

    @cached_property
    def rng(self) -> np.random.Generator:
        """The case's generator, made at the first draw: a file of literal arrays never imports numpy.random."""
        return np.random.default_rng(self.spec.seed)

    def problem(self, path: tuple, message: str) -> None:
        self.problems.append(Problem(path, message, _line_of(self.lines, path)))

    # -- arrays --------------------------------------------------------------------------

    def array(self, value: Any, path: tuple, shape: tuple[int | None, ...], what: str) -> np.ndarray | None:
        """A literal or generated array of the expected ``shape`` (None: any size there)."""
        if isinstance(value, schema.GENERATORS):
            return self.generated(value, path, shape, what)
        return self.literal(value, path, shape, what)

    def literal(self, value: list, path: tuple, shape: tuple[int | None, ...], what: str) -> np.ndarray | None:
        found = self.nested_shape(value, path, len(shape))
        if found is None:
            return None
        if not _fits(found, shape):
            self.problem(path, f"expected shape {_show_shape(shape)} = {what}, found {found}")
            return None
        if 0 in found:
            self.problem(path, f"expected at least one value along each axis of {what}, found shape {found}")
            return None
        return np.array(value, dtype=np.float64).astype(self.dtype)

    def nested_shape(self, value: Any, path: tuple, ndim: int) -> tuple[int, ...] | None:
        """The shape of a rectangular nested list of finite numbers, or None after a problem."""
        if ndim == 1:
            if not isinstance(value, list):
                self.problem(path, f"expected a list of numbers, found {_show(value)}")
                return None
            bad = [(i, v) for i, v in enumerate(value) if not _is_number(v)]
            for i, v in bad[:3]:
                self.problem((*path, i), f"expected a finite number, found {_show(v)}")
            return None if bad else (len(value),)
        if not isinstance(value, list) or not value or not all(isinstance(row, list) for row in value):
            self.problem(path, f"expected a list of rows (a {ndim}-dimensional array), found {_show(value)}")
            return None
        found = [self.nested_shape(row, (*path, i), ndim - 1) for i, row in enumerate(value)]
        rows = [r for r in found if r is not None]
        if len(rows) < len(found):
            return None
        lengths = sorted({r[0] for r in rows})
        if len(lengths) > 1:
            first = rows[0][0]
            odd = next(i for i, r in enumerate(rows) if r[0] != first)
            self.problem((*path, odd), f"ragged array: row 0 has {first} values, row {odd} has {rows[odd][0]}")
            return None
        return (len(value), *rows[0])

    def generated(self, gen: Any, path: tuple, shape: tuple[int | None, ...], what: str) -> np.ndarray | None:
        if gen.shape is not None:
            drawn = tuple(gen.shape)
            if not _fits(drawn, shape):
                self.problem((*path, "shape"), f"expected shape {_show_shape(shape)} = {what}, found {drawn}")
                return None
        elif None in shape:
            self.problem(path, f"a generated array needs `shape:` here: {what}")
            return None
        else:
            drawn = shape
        if math.prod(drawn) > MAX_ELEMENTS:
            self.problem((*path, "shape"), f"{drawn} is {math.prod(drawn):,} values; at most {MAX_ELEMENTS:,} are allowed")
            return None
        values: np.ndarray
        if isinstance(gen, schema.Uniform):
            if not gen.low < gen.high:
                self.problem((*path, "low"), f"expected low < high, found low={gen.low}, high={gen.high}")
                return None
            values = self.rng.uniform(gen.low, gen.high, size=drawn)
        elif isinstance(gen, schema.Normal):
            values = self.rng.normal(gen.mean, gen.std, size=drawn)
        elif isinstance(gen, schema.Classes):
            if self.classes is None:
                self.problem((*path, "random"), "random: classes draws class indices, the targets of a sparse loss only")
                return None
            values = self.rng.integers(0, self.classes, size=drawn)
        else:
            values = np.eye(drawn[-1])[self.rng.integers(0, drawn[-1], size=drawn[:-1])]
        return values.astype(self.dtype)

    # -- the case ------------------------------------------------------------------------

    def build(self, file: str, default_name: str) -> Case | None:
        spec = self.spec
        images = takes_images(spec)
        inputs = self.array(
            spec.inputs,
            ("inputs",),
            (None, None, None, None) if images else (None, None),
            "(batch, height, width, channels)"
            if images
            else "(batch, features)"
            + ("; images are (batch, height, width, channels)" if len(written_shape(spec.inputs) or ()) == 3 else ""),
        )
        batch = None if inputs is None else inputs.shape[0]
        sample = None if inputs is None else inputs.shape[1:]
        if inputs is not None and not images and self.check_inputs_width(inputs.shape, spec.layers[0]):
            batch, sample = None, inputs.shape[:1]  # blamed on inputs alone: the layer and targets are checked without them
        shapes = self.shapes(sample)  # each layer's (input, output) shape of one sample, None where unknown
        loss_spec = spec.loss if isinstance(spec.loss, schema.LossSpec) else schema.LossSpec(name=spec.loss)
        declared = concepts.loss(loss_spec.name)
        out = shapes[-1][1] if shapes and shapes[-1] is not None else None
        # a network that ends with images is reported in shapes(): its targets are not blamed too
        last_units = (out[0] if len(out) == 1 else None) if out is not None else spec.layers[-1].units
        if declared.class_indices and (isinstance(spec.targets, schema.OneHot) or _written_shape(spec.targets) is not None):
            self.problem(
                ("targets",),
                f"{declared.name} takes one class index per sample, (batch,): write a list of integers or "
                "{random: classes}; one-hot rows are categorical_crossentropy's targets",
            )
            targets = None
        elif declared.class_indices:
            self.classes = last_units
            targets = self.array(spec.targets, ("targets",), (batch,), "(batch,): one class index per sample")
            targets = self.class_indices(targets, last_units)
            self.classes = None
        else:
            targets = self.array(spec.targets, ("targets",), (batch, last_units), "(batch, units of the last layer)")
            self.probabilities(targets, declared)
        layers: list[Layer | None] = []
        for i, layer_spec in enumerate(spec.layers):
            shape = shapes[i] if i < len(shapes) else None
            if layer_spec.type == "dense":
                fan_in = shape[0][0] if shape is not None and len(shape[0]) == 1 and shape[0][0] <= MAX_ELEMENTS else None
                layers.append(self.layer(i, layer_spec, fan_in, batch))
            else:
                layers.append(None if shape is None else self.shaped_layer(i, layer_spec, *shape))
        self.check_loss_params(loss_spec, declared)
        loss_name = declared.name
        needed = declared.last_activation
        if needed and layers and spec.layers[-1].activation_name != needed:
            self.problem(
                ("layers", len(spec.layers) - 1, "activation"),
                f"{loss_name} is computed from the logits of a {needed} last layer; "
                f"expected activation {needed}, found {spec.layers[-1].activation_name}",
            )
        if spec.engines is not None and self.known_engines is not None:
            for j, name in enumerate(spec.engines):
                if name not in self.known_engines:
                    self.problem(("engines", j), f"unknown engine {name!r}; registered: {', '.join(self.known_engines)}")
        if spec.known_differences and self.known_engines is not None:
            for name in spec.known_differences:
                if name not in self.known_engines:
                    self.problem(
                        ("known_differences", name), f"unknown engine {name!r}; registered: {', '.join(self.known_engines)}"
                    )
        optimizer, hyper = self.optimizer(spec.optimizer)
        rtol, atol = _tolerance(spec.tolerance, DEFAULT_TOLERANCE[spec.dtype])
        built = [layer for layer in layers if layer is not None]
        if self.problems or inputs is None or targets is None or len(built) < len(layers):
            return None
        case = Case(
            name=spec.name or default_name,
            path=file,
            description=spec.description or "",
            dtype=self.dtype,
            seed=spec.seed,
            loss=loss_name,
            reduction=loss_spec.reduction,
            scale=loss_spec.scale,
            loss_params={
                p.name: float(getattr(loss_spec, p.name) if getattr(loss_spec, p.name) is not None else p.default or 0.0)
                for p in declared.params
            },
            lr=spec.lr,
            inputs=inputs,
            targets=targets,
            layers=tuple(built),
            engines=None if spec.engines is None else tuple(spec.engines),
            rtol=rtol,
            atol=atol,
            lines=self.lines,
            known_differences={
                name: value if isinstance(value, str) else value.reason for name, value in (spec.known_differences or {}).items()
            },
            known_params={
                name: tuple(value.params)
                for name, value in (spec.known_differences or {}).items()
                if isinstance(value, schema.KnownDifference)
            },
            optimizer=optimizer,
            hyper=hyper,
            steps=spec.steps,
        )
        for engine, params in case.known_params.items():
            for j, param in enumerate(params):
                if param not in case.parameters():
                    close = closest(param, case.parameters())
                    hint = f"; did you mean {close!r}?" if close else ""
                    self.problem(("known_differences", engine, "params", j), f"no parameter named {param!r}{hint}")
        expected = self.expected(case, spec.expected) if spec.expected is not None else None
        if self.problems:
            return None
        return Case(**{**case.__dict__, "expected": expected})

    def check_inputs_width(self, found: tuple[int, ...], first: schema.LayerSpec) -> bool:
        """Report ``inputs`` whose width is not what the first layer's kernel takes; True when they read
        as transposed (a column where a row was meant: as many rows as the kernel takes inputs, and
        targets that do not back that many samples), so they alone are blamed, not the kernel too."""
        key = "weight" if first.weight is not None else "kernel"
        declared = _written_shape(getattr(first, key))
        if (first.kernel is not None and first.weight is not None) or declared is None:
            return False
        takes, units = declared[::-1] if key == "weight" else declared
        if units != first.units or takes == found[1]:
            return False  # widths agree, or a kernel at odds with its own units: reported on its line alone
        generated = isinstance(self.spec.inputs, schema.GENERATORS)
        path = ("inputs", "shape") if generated else ("inputs",)
        line = _line_of(self.lines, ("layers", 0, key))
        message = (
            f"expected shape (any, {takes}) = (batch, features), as layers[0].{key} {_show_shape(declared)}"
            f"{f' at line {line}' if line else ''} takes {_many(takes, 'input')}; found {found}"
        )
        targets = _written_shape(self.spec.targets)
        transposed = found[0] == takes and (targets is None or targets[0] == found[1])  # the targets back it
        if transposed:
            samples = found[1]
            message += (
                f": transposed? each row is one sample, so {_many(samples, 'sample')} of {_many(takes, 'feature')} "
                f"{'are' if samples > 1 else 'is'} ({samples}, {takes})"
            )
        self.problem(path, message)
        return transposed

    def activation(self, i: int, spec: schema.LayerSpec) -> tuple[str, float]:
        """The layer's activation and its slope, checked against the declaration."""
        path = ("layers", i)
        given = spec.activation or "linear"
        activation = given if isinstance(given, schema.ActivationSpec) else schema.ActivationSpec(name=given)
        declared = concepts.ACTIVATIONS[activation.name]
        own = {p.name for p in declared.params}
        for param in declared.params:
            if param.required and getattr(activation, param.name) is None:
                self.problem(
                    (*path, "activation"),
                    f"{declared.name} needs its {param.meaning}: write "
                    f"{{name: {declared.name}, {param.name}: ...}}" + (f" ({param.frameworks})" if param.frameworks else ""),
                )
        for name in schema.ActivationSpec.model_fields:
            if name != "name" and name not in own and getattr(activation, name) is not None:
                owners = [a.name for a in concepts.ACTIVATIONS.values() if any(p.name == name for p in a.params)]
                self.problem(
                    (*path, "activation", name),
                    f"{name} is a parameter of {' and '.join(owners)} only, found it on {activation.name}",
                )
        if declared.last_layer_only and i != len(self.spec.layers) - 1:
            self.problem((*path, "activation"), f"{declared.name} is supported on the last layer only")
        return activation.name, float(getattr(activation, "alpha", None) or 0.0)

    def layer(self, i: int, spec: schema.LayerSpec, fan_in: int | None, batch: int | None) -> Layer | None:
        """A dense layer taking ``fan_in`` features (None: unknown after a problem above it)."""
        return self.weighted(i, spec, None if fan_in is None else (fan_in,), None if fan_in is None else (spec.units,), batch)

    def weighted(
        self, i: int, spec: schema.LayerSpec, in_shape: tuple | None, out_shape: tuple | None, batch: int | None
    ) -> Layer | None:
        """A dense or conv2d layer: its activation, kernel and bias."""
        path = ("layers", i)
        activation, alpha = self.activation(i, spec)
        units = spec.units if spec.type == "dense" else spec.filters
        if spec.kernel is not None and spec.weight is not None:
            keras, torch = ("(kh, kw, in, out)", "(out, in, kh, kw)") if spec.type == "conv2d" else ("(in, out)", "(out, in)")
            self.problem((*path, "weight"), f"give kernel {keras} or weight {torch}, not both")
            return None
        if in_shape is None or out_shape is None or units is None:
            return None
        window = pair(spec.kernel_size) if spec.type == "conv2d" else (1, 1)
        fan_in = in_shape[-1] * math.prod(window)
        for size, what in ((fan_in * units, "kernel"), ((batch or 1) * math.prod(out_shape), "activations")):
            if size > MAX_ELEMENTS:
                field_name = "units" if spec.type == "dense" else "filters"
                self.problem(
                    (*path, field_name),
                    f"{units:,} {field_name} make {size:,} {what} values; at most {MAX_ELEMENTS:,} are allowed",
                )
                return None
        source = self.gives(i, in_shape) if spec.type == "conv2d" else ""
        kernel = self.kernel(path, spec, in_shape[-1], units, window, source)
        if spec.bias is False:
            bias = None
        elif spec.bias is None or spec.bias is True:
            bias = np.zeros(units, dtype=self.dtype)
        else:
            bias = self.array(spec.bias, (*path, "bias"), (units,), "(units,)" if spec.type == "dense" else "(filters,)")
            if bias is None:
                return None
        if kernel is None:
            return None
        return Layer(
            units,
            activation,
            alpha,
            kernel,
            bias,
            self.lines.get(path),
            "weight" if spec.weight is not None else "kernel",
            kind=spec.type,
            in_shape=tuple(in_shape),
            out_shape=tuple(out_shape),
            window=window,
            strides=pair(spec.strides or 1),
            padding=spec.padding or "valid",
        )

    def kernel(
        self, path: tuple, spec: schema.LayerSpec, fan_in: int, units: int, window: tuple[int, int], source: str = ""
    ) -> np.ndarray | None:
        """The layer's kernel in the Keras layout, from ``kernel``, ``weight`` or its initialiser;
        ``source`` says where a conv2d's input channels come from."""
        conv = spec.type == "conv2d"
        keras_shape = (*window, fan_in, units) if conv else (fan_in, units)
        torch_shape = (units, fan_in, *window) if conv else (units, fan_in)
        if spec.weight is not None:
            what = (
                "(filters, input channels, kernel height, kernel width), the PyTorch layout"
                if conv
                else "(units, inputs of the layer), the PyTorch layout"
            )
            if conv and self.conv_shape(spec.weight, (*path, "weight"), torch_shape, keras_shape, what, source):
                return None
            weight = self.array(spec.weight, (*path, "weight"), torch_shape, what)
            return None if weight is None else np.ascontiguousarray(as_kernel(weight))
        if spec.kernel is not None:
            if spec.init is not None:
                self.problem((*path, "init"), "init draws a kernel; this layer gives its kernel already")
            what = (
                "(kernel height, kernel width, input channels, filters), the Keras layout"
                if conv
                else "(inputs of the layer, units), the Keras layout"
            )
            if conv and self.conv_shape(spec.kernel, (*path, "kernel"), keras_shape, torch_shape, what, source):
                return None
            return self.array(spec.kernel, (*path, "kernel"), keras_shape, what)
        return _initial_kernel(spec.init or "glorot_uniform", keras_shape, self.rng).astype(self.dtype)

    def conv_shape(self, value: Any, path: tuple, shape: tuple[int, ...], other: tuple[int, ...], what: str, source: str) -> bool:
        """Report a conv2d kernel written in the other framework's layout (``kernel`` given as
        (out, in, kh, kw), ``weight`` as (kh, kw, in, out)), or one whose input channels are not
        those coming in; True if it was either."""
        found = written_shape(value)
        if found is None or found == shape or len(found) != len(shape):
            return False
        at = (*path, "shape") if isinstance(value, schema.GENERATORS) else path
        axis = 1 if path[-1] == "weight" else 2  # the input channels' axis
        expected = f"expected shape {_show_shape(shape)} = {what}, found {found}"
        if found == other:
            key, meant = path[-1], "weight" if path[-1] == "kernel" else "kernel"
            layout = "(kh, kw, in, out), the Keras layout" if meant == "kernel" else "(out, in, kh, kw), the PyTorch layout"
            self.problem(at, f"{expected}: that is {layout}; write it as `{meant}:` instead of `{key}:`")
        elif all(f == s for j, (f, s) in enumerate(zip(found, shape, strict=True)) if j != axis):
            self.problem(at, f"{expected}: it takes {_many(found[axis], 'input channel')}, but {source}")
        else:
            return False
        return True

    def expected(self, case: Case, exp: schema.ExpectedSpec) -> Expected:
        params = case.parameters()
        names = [
            f"layers.{i}.{name}"
            for i, layer in enumerate(case.layers)
            for key in layer.arrays()
            for name in ((key, "weight") if key == "kernel" else (key,))
        ]
        tables: dict[str, dict[str, np.ndarray]] = {"updated": {}, "deltas": {}}
        given_as: dict[tuple[str, str], str] = {}
        for section, values in (("updated", exp.updated), ("deltas", exp.deltas)):
            for name, value in values.items():
                path = ("expected", section, name)
                match = PARAM_NAME.match(name)
                if not match or int(match[1]) >= len(case.layers):
                    close = closest(name, names)
                    hint = f"; did you mean {close!r}?" if close else ""
                    self.problem(path, f"no parameter named {name!r}; valid names: {', '.join(names)}{hint}")
                    continue
                index, kind = int(match[1]), match[2]
                key = f"layers.{index}.{'kernel' if kind == 'weight' else kind}"
                if key not in params:
                    layer = case.layers[index]
                    why = (
                        "has no bias (bias: false)"
                        if kind == "bias" and layer.kernel is not None
                        else f"({layer.kind}) has no {kind}"
                    )
                    self.problem(path, f"layer {index} {why}, so {name} cannot be checked")
                    continue
                target = params[key].shape if kind != "weight" else as_weight(params[key]).shape
                array = self.literal(
                    value,
                    path,
                    target,
                    f"the shape of {key}"
                    + (
                        f" in the PyTorch layout {'(out, in, kh, kw)' if len(target) == 4 else '(out, in)'}"
                        if kind == "weight"
                        else ""
                    ),
                )
                if array is not None:
                    if key in tables[section]:
                        self.problem(path, f"{key} is given twice (as kernel and as weight)")
                    tables[section][key] = as_kernel(array) if kind == "weight" else array
                    given_as[(section, key)] = name
        rtol, atol = _tolerance(exp.tolerance, EXPECTED_TOLERANCE)
        if isinstance(exp.loss, list) and len(exp.loss) != case.steps:
            self.problem(("expected", "loss"), f"expected one loss per step ({case.steps}), found {len(exp.loss)}")
        return Expected(exp.loss, tables["updated"], tables["deltas"], rtol, atol, given_as)

    def optimizer(self, value: Any) -> tuple[str, dict[str, float | bool]]:
        """The optimizer's name and every hyperparameter, checked against its declaration."""
        spec = value if isinstance(value, schema.OptimizerSpec) else schema.OptimizerSpec(name=value)
        declared = concepts.OPTIMIZERS[spec.name]
        path = ("optimizer",)
        own = {p.name for p in declared.params}
        for param in declared.params:
            if param.required and getattr(spec, param.name) is None:
                self.problem(
                    path,
                    f"{declared.name} needs its {param.meaning}: write {{name: {declared.name}, {param.name}: ...}}"
                    + (f" ({param.frameworks})" if param.frameworks else ""),
                )
        for name in schema.OptimizerSpec.model_fields:
            if name != "name" and name not in own and getattr(spec, name) is not None:
                owners = [o.name for o in concepts.OPTIMIZERS.values() if any(p.name == name for p in o.params)]
                self.problem((*path, name), f"{name} is a hyperparameter of {', '.join(owners)}, not of {declared.name}")
        given = {name: getattr(spec, name) for name in own}
        for param in declared.params:
            wrong = None if given.get(param.name) is None else param.problem(given[param.name])
            if wrong:
                self.problem((*path, param.name), wrong)
        return declared.name, declared.settings(given)


def _tolerance(given: schema.Tolerance | None, default: tuple[float, float]) -> tuple[float, float]:
    if given is None:
        return default
    return (default[0] if given.rtol is None else given.rtol, default[1] if given.atol is None else given.atol)


def _initial_kernel(init: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Kernel initialisers, named as in Keras (normal ones are not truncated here); a conv kernel's
    fans count its window: (kh kw in, kh kw out)."""
    receptive = math.prod(shape[:-2])
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    fan = {"glorot": (fan_in + fan_out) / 2, "he": fan_in / 2, "lecun": fan_in}
    if init == "zeros":
        return np.zeros(shape)
    family, kind = init.split("_")
    variance = 1.0 / fan[family]
    if kind == "uniform":
        limit = math.sqrt(3.0 * variance)
        return rng.uniform(-limit, limit, size=shape)
    return rng.normal(0.0, math.sqrt(variance), size=shape)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


def _written_shape(value: Any) -> tuple[int, ...] | None:
    """The 2-dimensional shape an array (a kernel, targets) is written with, when it reads as one; else None."""
    if isinstance(value, schema.GENERATORS):
        return tuple(value.shape) if value.shape is not None and len(value.shape) == 2 else None
    rows = value if isinstance(value, list) and value and all(isinstance(row, list) for row in value) else []
    return (len(rows), len(rows[0])) if rows and len({len(row) for row in rows}) == 1 else None


def _many(count: int, thing: str) -> str:
    return f"{count} {thing}" if count == 1 else f"{count} {thing}s"


def _fits(found: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(found) == len(expected) and all(e is None or e == f for f, e in zip(found, expected, strict=True))


def _show_shape(shape: tuple[int | None, ...]) -> str:
    inner = ", ".join("any" if s is None else str(s) for s in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


__all__ = ["MAX_ELEMENTS", "Case", "Expected", "Layer", "format_path", "load_case", "parse_case"]
