"""Optimizer updates as a framework computes them where they differ from the SPEC's (section 7),
each a modified copy of one function of :mod:`manualprop.reference.optimizers`, with its state as there.

A hint (:mod:`manualprop.verdict.hints`) replays a case through the NumPy engine with one of these in place
of the SPEC's update and names the variant when an engine's deltas follow it; the Keras tests
(tests/test_keras_optimizers.py) hold each against the framework that computes it so. Each variant
that no framework setting removes is pinned by the canary it names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..casefile.case import Case
from ..engines import StepResult
from . import optimizers
from .optimizers import Array, Hyper, State


def adam_epsilon_uncorrected(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """Keras's Adam: alpha = lr sqrt(1-b2^t) / (1-b1^t); p <- p - alpha m / (sqrt(v) + eps), epsilon
    on the uncorrected v (the SPEC's update with eps / sqrt(1-b2^t) in place of eps)."""
    c = p.dtype.type
    b1, b2, eps = c(hp["beta1"]), c(hp["beta2"]), c(hp["epsilon"])
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    if hp["amsgrad"]:
        state["vmax"] = np.maximum(state["vmax"], state["v"])
    v = state["vmax"] if hp["amsgrad"] else state["v"]
    alpha = c(lr) * np.sqrt(1 - b2**t) / (1 - b1**t)
    return p - alpha * state["m"] / (np.sqrt(v) + eps)


def adamw_epsilon_uncorrected(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """Keras's AdamW: p <- p - p wd lr, then Keras's Adam (epsilon on the uncorrected v)."""
    c = p.dtype.type
    return adam_epsilon_uncorrected(p - p * c(hp["weight_decay"]) * c(lr), g, state, t, lr, hp)


def rmsprop_epsilon_inside(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """Keras's RMSprop: the SPEC's, with g / sqrt(s~ + eps) in place of g / (sqrt(s~) + eps)."""
    c = p.dtype.type
    rho, eps = c(hp["rho"]), c(hp["epsilon"])
    state["s"] = rho * state["s"] + (1 - rho) * g * g
    s = state["s"]
    if hp["centered"]:
        state["a"] = rho * state["a"] + (1 - rho) * g
        s = s - state["a"] * state["a"]
    step = g / np.sqrt(s + eps)
    if hp["momentum"]:
        state["b"] = c(hp["momentum"]) * state["b"] + step
        step = state["b"]
    return p - c(lr) * step


def adagrad_epsilon_inside(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """Keras's Adagrad: acc <- acc + g^2; p <- p - lr g / sqrt(acc + eps)."""
    c = p.dtype.type
    state["acc"] = state["acc"] + g * g
    return p - c(lr) * g / np.sqrt(state["acc"] + c(hp["epsilon"]))


def sgd_decoupled_weight_decay(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """Keras's SGD(weight_decay=wd): p <- p - p wd lr, then the momentum update with g alone (the
    decay never enters b), where the SPEC adds wd p to g."""
    c = p.dtype.type
    decayed = p - p * c(hp["weight_decay"]) * c(lr)
    return optimizers.sgd(decayed, g, state, t, lr, {**hp, "weight_decay": 0.0})


@dataclass(frozen=True)
class Variant:
    """A framework's update where it differs from the SPEC's, for one declared optimizer."""

    optimizer: str  # the declared optimizer whose update it replaces
    who: str  # who computes it so
    formula: str  # how, against the SPEC
    update: Callable[[Array, Array, State, int, float, Hyper], Array]
    pinned: str  # the canary that pins it, or the setting that removes it, in words
    differs: Callable[[Hyper], bool] = lambda hp: True  # the settings under which it differs from the SPEC
    detail: Callable[[Hyper], str] = lambda hp: ""  # its size at these settings, in words

    def replay(self, case: Case) -> StepResult:
        """The case's steps through the NumPy engine with this update in place of the SPEC's."""
        from .engine import run_steps

        spec = optimizers.OPTIMIZERS[self.optimizer]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return run_steps(
                case, optimizers={**optimizers.OPTIMIZERS, self.optimizer: optimizers.Optimizer(spec.init, self.update)}
            )


def _epsilon_at_step_one(hp: Hyper) -> str:
    eps, b2 = float(hp["epsilon"]), float(hp["beta2"])
    return f"epsilon {eps:g} acts as {eps / np.sqrt(1 - b2):.4g} at step 1"


UNCORRECTED = (
    "epsilon on the uncorrected v: p <- p - lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps), "
    "the SPEC's update with eps / sqrt(1-b2^t) for eps"
)
INSIDE = "epsilon inside the square root"


def _canary(name: str) -> str:
    return f"no Keras setting removes it (pinned by cases/canaries/{name}.yaml)"


VARIANTS: list[Variant] = [
    Variant(
        "adam",
        "Keras 3's Adam",
        UNCORRECTED,
        adam_epsilon_uncorrected,
        _canary("keras_adam_epsilon_uncorrected") + "; in Keras 2, Adam(adaptive_epsilon=True) follows the SPEC",
        detail=_epsilon_at_step_one,
    ),
    Variant(
        "adamw",
        "Keras's AdamW",
        UNCORRECTED,
        adamw_epsilon_uncorrected,
        _canary("keras_adamw_epsilon_uncorrected"),
        detail=_epsilon_at_step_one,
    ),
    Variant(
        "rmsprop",
        "Keras's RMSprop",
        f"{INSIDE}: g / sqrt(s~ + eps) for g / (sqrt(s~) + eps)",
        rmsprop_epsilon_inside,
        _canary("keras_rmsprop_epsilon_inside_sqrt"),
    ),
    Variant(
        "adagrad",
        "Keras's Adagrad",
        f"{INSIDE}: g / sqrt(acc + eps) for g / (sqrt(acc) + eps)",
        adagrad_epsilon_inside,
        _canary("keras_adagrad_epsilon_inside_sqrt"),
    ),
    Variant(
        "sgd",
        "Keras's SGD(weight_decay=...)",
        "decoupled weight decay, p <- p - lr wd p beside the momentum, where the SPEC adds wd p to g before it",
        sgd_decoupled_weight_decay,
        "an L2 penalty wd/2 sum(p^2) on every parameter gives the SPEC's (as the Keras adapter does)",
        differs=lambda hp: bool(hp["weight_decay"]) and bool(hp["momentum"]),
    ),
]


def of(case: Case) -> list[Variant]:
    """The variants of the case's optimizer that differ from the SPEC at its settings."""
    return [v for v in VARIANTS if v.optimizer == case.optimizer and v.differs(case.hyper)]
