"""What an engine may compute otherwise than the SPEC, each a modified copy of a reference function.

Optimizer updates as a framework computes them where they differ from the SPEC's (section 7),
each a modified copy of one function of :mod:`manualprop.reference.optimizers`, with its state as there.
A hint (:mod:`manualprop.verdict.hints`) replays a case through the NumPy engine with one of these in place
of the SPEC's update and names the variant when an engine's deltas follow it; the Keras tests
(tests/test_keras_optimizers.py) hold each against the framework that computes it so. Each variant
that no framework setting removes is pinned by the canary it names.

Layers (section 8): :func:`layer_variants` gives a layer's forward pass computed with one classic
slip of porting between frameworks (a conv kernel in the other layout, the "same" padding on the
other side, flatten in (c, h, w) order, a norm's epsilon at the other framework's default, ...),
from the layer's input, each with the slip in words; :func:`moving_variants` gives batch_norm's
moving statistics updated in PyTorch's conventions (the momentum the other way round, the
unbiased variance). A hint recomputes the quantity where engines first differ with each and
names the one the blamed engine follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..casefile.case import Case, Layer, as_kernel, as_weight
from ..engines import LayerTrace, StepResult, filled
from . import optimizers
from .activations import ACTIVATIONS
from .layers import KINDS, padding_of
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


# -- layers ---------------------------------------------------------------------------------------


def _forward(layer: Layer, a_prev: Array) -> LayerTrace:
    """The SPEC's forward pass of ``layer`` (as changed by a variant) on ``a_prev``."""
    trace = LayerTrace()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        KINDS[layer.kind].forward(layer, a_prev, trace, ACTIVATIONS)
    return trace


def _with_kernel(layer: Layer, a_prev: Array, kernel: Array) -> LayerTrace | None:
    """The conv layer with another kernel of the same shape, None when it is the same kernel."""
    kernel = np.ascontiguousarray(kernel)
    if kernel.shape != filled(layer.kernel).shape or np.array_equal(kernel, filled(layer.kernel)):
        return None
    return _forward(dataclasses.replace(layer, kernel=kernel), a_prev)


def _conv_padded(layer: Layer, a_prev: Array, pads: tuple[tuple[int, int], tuple[int, int]]) -> LayerTrace:
    """The conv layer on its input padded by ``pads`` ((top, bottom), (left, right)), as many outputs as it has."""
    padded = np.pad(a_prev, ((0, 0), *pads, (0, 0)))
    return _forward(dataclasses.replace(layer, padding="valid", in_shape=padded.shape[1:]), padded)


def _other_padding(layer: Layer) -> tuple[str, tuple[int, int]]:
    """conv2d's other padding (valid for same, same for valid) and the output height and width it gives."""
    (kh, kw), (sh, sw), (h, w) = layer.window, layer.strides, layer.in_shape[:2]
    if layer.padding == "same":
        return "valid", ((h - kh) // sh + 1, (w - kw) // sw + 1)
    return "same", (-(-h // sh), -(-w // sw))


def conv_variants(layer: Layer, a_prev: Array) -> Iterator[tuple[str, LayerTrace | None]]:
    """conv2d: the kernel in the other layout, the padding on the other side or the other padding."""
    kernel = filled(layer.kernel)
    kh, kw, cin, cout = kernel.shape
    yield (
        "the kernel in the other layout: an (out, in, kh, kw) array reshaped to (kh, kw, in, out), where it "
        "needs a transpose (weight.transpose(2, 3, 1, 0); PyTorch keeps (out, in, kh, kw), Keras (kh, kw, in, out))",
        _with_kernel(layer, a_prev, as_weight(kernel).reshape(kernel.shape)),
    )
    yield (
        "the kernel in the other layout: a (kh, kw, in, out) array reshaped to (out, in, kh, kw), where it needs "
        "a transpose (kernel.transpose(3, 2, 0, 1); Keras keeps (kh, kw, in, out), PyTorch (out, in, kh, kw))",
        _with_kernel(layer, a_prev, as_kernel(kernel.reshape(cout, cin, kh, kw))),
    )
    yield (
        "the kernel with its height and width swapped, K[j, i] for K[i, j]: a transpose (3, 2, 1, 0) where "
        "(3, 2, 0, 1) turns (kh, kw, in, out) into (out, in, kh, kw), or the reverse",
        _with_kernel(layer, a_prev, kernel.transpose(1, 0, 2, 3)) if kh == kw else None,
    )
    yield (
        "the kernel with its input and output channels swapped, (kh, kw, out, in) read as (kh, kw, in, out)",
        _with_kernel(layer, a_prev, kernel.transpose(0, 1, 3, 2)) if cin == cout else None,
    )
    yield (
        "the kernel flipped in height and width: a true convolution, where the frameworks compute a cross-correlation",
        _with_kernel(layer, a_prev, kernel[::-1, ::-1]),
    )
    pads = padding_of(layer)
    other_side = ((pads[0][1], pads[0][0]), (pads[1][1], pads[1][0]))
    yield (
        '"same" padding with the extra row or column at the top or left, where TensorFlow (and the SPEC) put it at '
        f"the bottom or right (here (top, bottom) {other_side[0]}, (left, right) {other_side[1]} for {pads[0]}, {pads[1]}); "
        "PyTorch's symmetric padding=kernel_size // 2 reads the input so when the total padding is odd",
        _conv_padded(layer, a_prev, other_side) if other_side != pads else None,
    )
    padding, out_hw = _other_padding(layer)
    other = dataclasses.replace(layer, padding=padding, out_shape=(*out_hw, cout))
    yield (f"padding {padding} where the case says {layer.padding}", _forward(other, a_prev) if min(out_hw) > 0 else None)


def flatten_variants(layer: Layer, a_prev: Array) -> Iterator[tuple[str, LayerTrace | None]]:
    """flatten in (c, h, w) order, as an NCHW tensor flattens."""
    trace = None
    if a_prev.ndim == 4 and a_prev.shape[-1] > 1:
        trace = LayerTrace(A=a_prev.transpose(0, 3, 1, 2).reshape(a_prev.shape[0], -1))
    yield (
        "flatten in (c, h, w) order, as PyTorch's NCHW tensors flatten, where the SPEC and Keras flatten (h, w, c): "
        "an engine that keeps channels first must permute to (batch, h, w, c) before flattening",
        trace,
    )


EPSILONS = {1e-3: "Keras's default epsilon", 1e-5: "PyTorch's default eps"}


def _normalized(layer: Layer, a_prev: Array, axes: tuple[int, ...], unbiased: bool = False, outside: bool = False) -> LayerTrace:
    """mean, var, x^ and A over ``axes`` (the SPEC's: batch_norm every axis but the last, layer_norm the last),
    with the unbiased variance or epsilon outside the square root when asked."""
    eps = a_prev.dtype.type(layer.epsilon)
    mean = a_prev.mean(axis=axes, keepdims=True)
    var = ((a_prev - mean) ** 2).mean(axis=axes, keepdims=True)
    if unbiased:
        n = int(np.prod([a_prev.shape[k] for k in axes]))
        var = var * a_prev.dtype.type(n / (n - 1)) if n > 1 else var
    xhat = (a_prev - mean) / (np.sqrt(var) + eps if outside else np.sqrt(var + eps))
    keep = tuple(k for k in range(a_prev.ndim) if k not in axes)
    shape = tuple(a_prev.shape[k] for k in keep)
    return LayerTrace(
        mean=mean.reshape(shape), var=var.reshape(shape), xhat=xhat, A=filled(layer.gamma) * xhat + filled(layer.beta)
    )


def norm_variants(layer: Layer, a_prev: Array) -> Iterator[tuple[str, LayerTrace | None]]:
    """batch_norm and layer_norm: epsilon at a framework's default or outside the square root, the
    unbiased variance, and (layer_norm on images) PyTorch's LayerNorm over (h, w, c)."""
    for eps, whose in EPSILONS.items():
        if not np.isclose(eps, layer.epsilon, rtol=1e-6, atol=0):
            yield (
                f"epsilon {eps:g}, {whose}, where the case says {layer.epsilon:g} (Keras's default is 1e-3, PyTorch's 1e-5)",
                _forward(dataclasses.replace(layer, epsilon=eps), a_prev),
            )
    axes = tuple(range(a_prev.ndim - 1)) if layer.kind == "batch_norm" else (a_prev.ndim - 1,)
    yield (
        "epsilon outside the square root, (x - mean) / (sqrt(var) + eps), where it belongs inside, sqrt(var + eps)",
        _normalized(layer, a_prev, axes, outside=True),
    )
    n = int(np.prod([a_prev.shape[k] for k in axes]))
    yield (
        f"the unbiased variance (divided by n - 1 = {n - 1}, as torch.var and np.var(ddof=1) give), where {layer.kind} "
        f"normalizes with the biased one (divided by n = {n})",
        _normalized(layer, a_prev, axes, unbiased=True) if n > 1 else None,
    )
    if layer.kind == "layer_norm" and a_prev.ndim == 4:
        yield (
            "layer_norm over (h, w, c), as PyTorch's nn.LayerNorm([c, h, w]), where the SPEC and Keras's "
            "LayerNormalization(axis=-1) normalize over the last axis only",
            _normalized(layer, a_prev, (1, 2, 3)),
        )


LAYER_VARIANTS: dict[str, Callable[[Layer, Array], Iterator[tuple[str, LayerTrace | None]]]] = {
    "conv2d": conv_variants,
    "flatten": flatten_variants,
    "batch_norm": norm_variants,
    "layer_norm": norm_variants,
}


def layer_variants(layer: Layer, a_prev: Array) -> list[tuple[str, LayerTrace]]:
    """``layer``'s forward pass on ``a_prev`` with each slip that can differ from the SPEC here, with the slip in words."""
    variants = LAYER_VARIANTS.get(layer.kind)
    return [] if variants is None else [(slip, trace) for slip, trace in variants(layer, a_prev) if trace is not None]


def momentum_swapped(m: float, n: int) -> str:
    return (
        f"the momentum the other way round, moving <- {1 - m:g} moving + {m:g} stat for the case's {m:g} moving + "
        f"{1 - m:g} stat: PyTorch's momentum (its default 0.1) is 1 - Keras's (its default 0.99), so a momentum "
        "written in the other framework's convention swaps them"
    )


def unbiased_running_variance(m: float, n: int) -> str:
    return (
        f"PyTorch's running_var, which keeps the unbiased batch variance n / (n - 1) var (n = {n}) where the SPEC and "
        "Keras keep the biased one; no PyTorch setting removes it (pinned by "
        "cases/canaries/torch_batch_norm_unbiased_running_variance.yaml)"
    )


@dataclass(frozen=True)
class MovingVariant:
    """batch_norm's moving statistics as a framework (or a slip) updates them, otherwise than the SPEC."""

    swapped: bool  # the momentum the other way round: moving <- (1 - m) moving + m stat
    unbiased: bool  # the unbiased batch variance, n / (n - 1) var

    def slip(self, m: float, n: int) -> str:
        """The variant in words, at momentum ``m`` with ``n`` values per statistic."""
        return "; and ".join(
            [*([momentum_swapped(m, n)] if self.swapped else []), *([unbiased_running_variance(m, n)] if self.unbiased else [])]
        )

    def update(self, m: float, moving_mean: Array, moving_variance: Array, mean: Array, var: Array, n: int) -> dict[str, Array]:
        """The moving statistics after the step, from their values before it and the batch's mean and (biased) variance."""
        keep = 1 - m if self.swapped else m
        var = var * (n / (n - 1)) if self.unbiased and n > 1 else var
        return {
            "moving_mean": keep * moving_mean + (1 - keep) * mean,
            "moving_variance": keep * moving_variance + (1 - keep) * var,
        }


MOVING_VARIANTS = [MovingVariant(swapped=True, unbiased=False), MovingVariant(False, True), MovingVariant(True, True)]
