"""The engine protocol and the registry that finds engines.

Built-in engines are ``numpy`` (this package), ``torch`` and ``keras`` (``manualprop.adapters``).
Third-party packages add engines through the entry-point group ``manualprop.engines``; each
entry point names a class (or factory) whose instances satisfy :class:`Engine`::

    [project.entry-points."manualprop.engines"]
    jax = "manualprop_jax:JaxEngine"

Looking an engine up never imports its framework: ``unavailable()`` checks for it cheaply and
``step()`` imports it on first use.
"""

from __future__ import annotations

import importlib
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .casefile.case import Case

GROUP = "manualprop.engines"


@dataclass
class LayerTrace:
    """One layer's intermediates, kernels and gradients in the (in, out) layout.

    Dense and conv2d, forward: ``Z = A_prev @ W + b`` (a convolution for conv2d), ``A = f(Z)``.
    Backward: ``dA = dL/dA``, ``dZ = dL/dZ``, ``dW = dL/dW`` (a conv kernel's (kh, kw, in, out)),
    ``db = dZ summed over the batch``. Pooling and flatten keep A and dA. A norm layer keeps its
    statistics ``mean`` and ``var``, the normalized ``xhat``, A, and backward ``dxhat = dA * gamma``,
    ``dgamma``, ``dbeta`` and dA. An engine fills what it can.
    """

    Z: np.ndarray | None = None
    A: np.ndarray | None = None
    dA: np.ndarray | None = None
    dZ: np.ndarray | None = None
    dW: np.ndarray | None = None
    db: np.ndarray | None = None
    mean: np.ndarray | None = None
    var: np.ndarray | None = None
    xhat: np.ndarray | None = None
    dxhat: np.ndarray | None = None
    dgamma: np.ndarray | None = None
    dbeta: np.ndarray | None = None
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)  # field -> what the engine knows of its error


def filled(value: np.ndarray | None) -> np.ndarray:
    """A trace field the computation needs, which the engine has filled (the NumPy engine fills every one)."""
    if value is None:
        raise ValueError("a trace field the computation needs was never filled")
    return value


@dataclass
class StepRecord:
    """One of several steps: the loss before it, each parameter's change in it (kernels (in, out)),
    and, where the engine gives them, the optimizer's state after it and the step's trace."""

    loss: float
    deltas: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # parameter -> state name -> array
    trace: list[LayerTrace] | None = None

    @property
    def has_trace(self) -> bool:
        """Whether the step's trace is here already (an engine that computes it on first reading,
        as Keras's second pass does, says no until then)."""
        return self.trace is not None


class StepResult:
    """What a run of the case's steps returns: the loss before the first step and, per parameter,
    its value after the last step minus its value before the first.

    ``deltas`` is keyed ``layers.<i>.kernel`` / ``layers.<i>.bias`` with every kernel in the
    (in, out) layout, whatever layout the engine keeps internally. ``trace`` holds each layer's
    intermediates; an engine for which they cost a second pass gives ``trace_factory`` instead,
    and the trace is computed the first time it is read (only a disagreement needs it).
    ``uncertainty`` is what an engine knows of its own error, per delta element (the oracle's).
    With several steps, ``history`` holds one :class:`StepRecord` per step (``losses`` reads the
    loss before each); ``trace`` is the first step's.
    """

    def __init__(
        self,
        loss: float,
        deltas: dict[str, np.ndarray],
        trace: list[LayerTrace] | None = None,
        uncertainty: dict[str, np.ndarray] | None = None,
        *,
        trace_factory: Callable[[], list[LayerTrace]] | None = None,
        history: list[StepRecord] | None = None,
    ):
        self.loss = loss
        self.deltas = deltas
        self.history = history or []
        self.uncertainty = uncertainty or {}
        self._trace = trace
        self._trace_factory = trace_factory
        self.trace_error: str | None = None

    @property
    def trace(self) -> list[LayerTrace]:
        if self._trace is None:
            try:
                self._trace = self._trace_factory() if self._trace_factory else []
            except Exception as err:  # a diagnostic pass that fails leaves the step's verdict standing
                self.trace_error = f"{type(err).__name__}: {err}"
                self._trace = []
        return self._trace

    @property
    def losses(self) -> list[float]:
        """The loss before each step."""
        return [record.loss for record in self.history] or [self.loss]

    def __repr__(self) -> str:
        return f"StepResult(loss={self.loss!r}, deltas={sorted(self.deltas)})"


class BuildCache:
    """What an engine builds per architecture (a compiled model, modules and an optimizer), by key,
    the least recently used dropped once there are more than ``size``."""

    def __init__(self, size: int = 64):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key, build: Callable[[], object]):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        item = self._items[key] = build()
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return item

    def __len__(self) -> int:
        return len(self._items)


@runtime_checkable
class Engine(Protocol):
    """An engine: a name, whether it can run here (and if not, why), and one SGD step.

    ``unavailable()`` returns None when the engine can run, else a reason a person can act on
    (what is missing and the command that installs it). ``step(case)`` runs the forward pass,
    the loss, backpropagation and one update ``p <- p - lr * dL/dp`` on the whole batch, and
    returns a :class:`StepResult` whose deltas use the parameter names and the (in, out)
    kernel layout of the SPEC, in the case's dtype.

    Optionally, ``refuses(case)`` returns why the framework itself cannot run a valid case (PyTorch's
    batch norm over one value per feature), or None: the run is then a skip with that reason, not
    a crash.
    """

    name: str

    def unavailable(self) -> str | None: ...

    def step(self, case: Case) -> StepResult: ...


def refusal(engine: object, case: Case) -> str | None:
    """Why ``engine`` cannot run ``case`` (its optional ``refuses``), or None."""
    refuses = getattr(engine, "refuses", None)
    return refuses(case) if callable(refuses) else None


BUILTIN: dict[str, str] = {
    "numpy": "manualprop.reference.engine:NumpyEngine",
    "torch": "manualprop.adapters.torch_engine:TorchEngine",
    "keras": "manualprop.adapters.keras_engine:KerasEngine",
    "numeric": "manualprop.oracle:NumericEngine",
}
ORACLE = "numeric"


def _load(target: str) -> Callable[[], Engine]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_discovered: dict[tuple[str, ...], dict[str, str]] = {}


def _entry_points() -> dict[str, str]:
    """The group's entry points, name -> 'module:attr', the first of each name kept.

    Scanning reads every installed distribution's metadata (about 10 ms with TensorFlow and torch
    installed), so it is done once per ``sys.path``: a path added later is scanned again.
    """
    key = tuple(sys.path)
    if key not in _discovered:
        from importlib.metadata import entry_points

        found: dict[str, str] = {}
        for ep in entry_points(group=GROUP):
            found.setdefault(ep.name, ep.value)
        _discovered.clear()
        _discovered[key] = found
    return _discovered[key]


def _factories() -> dict[str, Callable[[], Engine] | str]:
    """Engine name -> factory (or 'module:attr' not yet imported), built-ins first."""
    found: dict[str, Callable[[], Engine] | str] = dict(BUILTIN)
    for name, target in _entry_points().items():
        if name not in found:
            found[name] = target
    return found


_instances: dict[str, Engine] = {}
_extra: dict[str, Callable[[], Engine]] = {}


def register(name: str, factory: Callable[[], Engine]) -> None:
    """Register an engine in this process (tests use it; packages use the entry point)."""
    _extra[name] = factory
    _instances.pop(name, None)


def unregister(name: str) -> None:
    _extra.pop(name, None)
    _instances.pop(name, None)


def names() -> list[str]:
    """Every registered engine name, built-ins first."""
    found = _factories()
    return [*found, *(n for n in _extra if n not in found)]


def default_names() -> list[str]:
    """The engines a run uses when none are named: all but those with ``default = False`` (the oracle)."""
    return [n for n in names() if getattr(get(n), "default", True)]


def get(name: str) -> Engine:
    """The engine registered under ``name`` (one instance per process)."""
    if name not in _instances:
        factory = _extra.get(name) or _factories().get(name)
        if factory is None:
            raise ValueError(f"Unknown engine {name!r}. Registered: {', '.join(names())}")
        if isinstance(factory, str):
            factory = _load(factory)
        _instances[name] = factory()
    return _instances[name]
