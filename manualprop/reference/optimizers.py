"""The NumPy reference's optimizers, one function each, written as SPEC section 7 reads.

An optimizer is a state plus an update (as optax's ``GradientTransformation(init, update)``):
``init(p, hp)`` gives the parameter's state, every array starting at zero (Adagrad's accumulator
at ``initial_accumulator``); ``update(p, g, state, t, lr, hp)`` returns the updated parameter at
step ``t`` = 1, 2, ... and updates the state in place, so that it can be shown after each step.
Everything is computed in the parameter's dtype. The names of the state are the formulas' (b, m,
v, vmax, s, a, acc); the declarations are in :mod:`manualprop.concepts`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

Array = np.ndarray
State = dict[str, Array]
Hyper = dict[str, float | bool]


class Optimizer(NamedTuple):
    init: Callable[[Array, Hyper], State]
    update: Callable[[Array, Array, State, int, float, Hyper], Array]


def _zeros(*names: str, when: dict[str, str] | None = None) -> Callable[[Array, Hyper], State]:
    """State arrays at zero; one listed in ``when`` only if that hyperparameter is set."""
    when = when or {}
    return lambda p, hp: {name: np.zeros_like(p) for name in names if name not in when or hp[when[name]]}


def sgd(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """g <- g + wd p; b <- momentum b + g; d = g + momentum b if nesterov else b; p <- p - lr d."""
    c = p.dtype.type
    if hp["weight_decay"]:
        g = g + c(hp["weight_decay"]) * p
    if not hp["momentum"]:
        return p - c(lr) * g
    state["b"] = c(hp["momentum"]) * state["b"] + g
    d = g + c(hp["momentum"]) * state["b"] if hp["nesterov"] else state["b"]
    return p - c(lr) * d


def adam(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; p <- p - lr m^ / (sqrt(v^) + eps)."""
    c = p.dtype.type
    b1, b2, eps = c(hp["beta1"]), c(hp["beta2"]), c(hp["epsilon"])
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    if hp["amsgrad"]:
        state["vmax"] = np.maximum(state["vmax"], state["v"])
    v = state["vmax"] if hp["amsgrad"] else state["v"]
    m_hat = state["m"] / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return p - c(lr) * m_hat / (np.sqrt(v_hat) + eps)


def adamw(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """p <- p (1 - lr wd), then the adam update with g taken before the decay."""
    c = p.dtype.type
    decayed = p * (1 - c(lr) * c(hp["weight_decay"]))
    return adam(decayed, g, state, t, lr, hp)


def rmsprop(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """s <- rho s + (1-rho) g^2; centered: a <- rho a + (1-rho) g, s~ = s - a^2; with momentum mu:
    b <- mu b + g / (sqrt(s~) + eps), p <- p - lr b; else p <- p - lr g / (sqrt(s~) + eps)."""
    c = p.dtype.type
    rho, eps = c(hp["rho"]), c(hp["epsilon"])
    state["s"] = rho * state["s"] + (1 - rho) * g * g
    s = state["s"]
    if hp["centered"]:
        state["a"] = rho * state["a"] + (1 - rho) * g
        s = s - state["a"] * state["a"]
    step = g / (np.sqrt(s) + eps)
    if hp["momentum"]:
        state["b"] = c(hp["momentum"]) * state["b"] + step
        step = state["b"]
    return p - c(lr) * step


def adagrad(p: Array, g: Array, state: State, t: int, lr: float, hp: Hyper) -> Array:
    """acc <- acc + g^2 (acc starts at initial_accumulator); p <- p - lr g / (sqrt(acc) + eps)."""
    c = p.dtype.type
    state["acc"] = state["acc"] + g * g
    return p - c(lr) * g / (np.sqrt(state["acc"]) + c(hp["epsilon"]))


OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(_zeros("b", when={"b": "momentum"}), sgd),
    "adam": Optimizer(_zeros("m", "v", "vmax", when={"vmax": "amsgrad"}), adam),
    "adamw": Optimizer(_zeros("m", "v", "vmax", when={"vmax": "amsgrad"}), adamw),
    "rmsprop": Optimizer(_zeros("s", "a", "b", when={"a": "centered", "b": "momentum"}), rmsprop),
    "adagrad": Optimizer(lambda p, hp: {"acc": np.full_like(p, hp["initial_accumulator"])}, adagrad),
}
