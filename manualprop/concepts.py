"""Every activation, loss and optimizer, declared once: its name, its parameters with their
defaults, and what the other modules need to know of it.

The schema (the names a case file may use), case loading (required parameters, where a concept
may stand), the fuzzer (what it draws), ``explain`` and the hints read these declarations; they
never list names. The maths lives beside its engine, keyed by the same name: the NumPy reference
in :mod:`manualprop.reference.activations` and :mod:`manualprop.reference.losses`, the oracle's in
:mod:`manualprop.oracle.maths`, PyTorch's modules and Keras's objects in their adapters. A test
(tests/test_concepts.py) walks every declaration and every built-in engine, so an engine that
forgets one fails it.

Adding an activation: declare it here, then give its maths in activations.py and
oracle/maths.py and its builder in adapters/torch_engine.py and adapters/keras_engine.py.
A parameter whose default differs between the frameworks has no default (``default=None``):
the case file must write it, and ``frameworks`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Param:
    """A hyperparameter of a concept, as the case file writes it."""

    name: str
    default: float | bool | None  # None: no default here, the case must write it
    meaning: str
    frameworks: str = ""  # the frameworks' defaults, where they differ
    kind: type = float  # float, or bool for a switch (nesterov, amsgrad, centered)
    low: float | None = None  # the smallest value allowed (inclusive, or exclusive with above_low)
    below: float | None = None  # the values allowed lie below this one
    above_low: bool = False  # low itself is excluded (epsilon > 0)

    @property
    def required(self) -> bool:
        return self.default is None

    def problem(self, value: float | bool) -> str | None:
        """Why ``value`` is not allowed, or None: ``beta1 must be in [0, 1), found 1.0``."""
        if self.kind is bool or (self.low is None and self.below is None):
            return None
        low_ok = self.low is None or (value > self.low if self.above_low else value >= self.low)
        if low_ok and (self.below is None or value < self.below):
            return None
        if self.below is None:
            return f"{self.name} must be {'>' if self.above_low else '>='} {self.low:g}, found {value!r}"
        return f"{self.name} must be in {'(' if self.above_low else '['}{self.low:g}, {self.below:g}), found {value!r}"


@dataclass(frozen=True)
class Activation:
    """``A = f(Z)``, element by element unless ``elementwise`` is false."""

    name: str
    formula: str  # f and f', as explain and the README show them
    params: tuple[Param, ...] = ()
    elementwise: bool = True
    last_layer_only: bool = False

    def shown(self, values: dict[str, float]) -> str:
        """The name with its parameters, as a reader sees it: ``leaky_relu, alpha 0.1``."""
        return ", ".join([self.name, *(f"{p.name} {values[p.name]:g}" for p in self.params if p.name in values)])


@dataclass(frozen=True)
class Loss:
    """``L = scale * reduce(terms(y, t))``, reduced over every element or over samples."""

    name: str
    formula: str  # the terms and their gradient
    per: str  # "element" (MSE, MAE: a mean divides by every element) or "sample"
    on_logits: bool = False  # y is the last pre-activation Z, the last layer's activation taken inside the loss
    last_activation: str | None = None  # the activation the last layer must have
    targets: str = "normal"  # how the fuzzer draws its targets: a generator of the case file (normal, one_hot, classes)
    aliases: tuple[str, ...] = ()
    params: tuple[Param, ...] = field(default=())
    class_indices: bool = False  # the targets are class indices, shape (batch,), not one value per output


SLOPE = Param("alpha", None, "slope", "PyTorch's default is 0.01, Keras's 0.2, Keras 2's 0.3")

# In this order the fuzzer draws them, simplest first (Hypothesis shrinks towards the front).
ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("linear", "f(z) = z, f'(z) = 1"),
        Activation("relu", "f(z) = max(0, z), f'(z) = 1 where z > 0 else 0"),
        Activation("tanh", "f(z) = tanh z, f'(z) = 1 - a^2"),
        Activation("sigmoid", "f(z) = 1 / (1 + e^-z), f'(z) = a (1 - a)"),
        Activation("leaky_relu", "f(z) = z where z > 0 else alpha z, f'(z) = 1 where z > 0 else alpha", (SLOPE,)),
        Activation(
            "softmax",
            "f(z)_i = e^z_i / sum_j e^z_j per sample; dZ = A * (dA - sum(dA * A))",
            elementwise=False,
            last_layer_only=True,
        ),
    ]
}

LOSSES: dict[str, Loss] = {
    layer.name: layer
    for layer in [
        Loss("mse", "(y - t)^2 per element; d/dy = 2 (y - t)", per="element"),
        Loss("mae", "|y - t| per element; d/dy = sign(y - t)", per="element"),
        Loss(
            "categorical_crossentropy",
            "-sum_j t_j log softmax(z)_j per sample; d/dz = softmax(z) sum_j t_j - t",
            per="sample",
            on_logits=True,
            last_activation="softmax",
            targets="one_hot",
            aliases=("cce",),
        ),
        Loss(
            "binary_crossentropy",
            "-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))) per element; d/dz = sigmoid(z) - t",
            per="element",
            on_logits=True,
            last_activation="sigmoid",
            targets="uniform",
            aliases=("bce",),
        ),
        Loss(
            "sparse_categorical_crossentropy",
            "-log softmax(z)_t per sample, t a class index; d/dz = softmax(z) - onehot(t)",
            per="sample",
            on_logits=True,
            last_activation="softmax",
            targets="classes",
            aliases=("scce",),
            class_indices=True,
        ),
        Loss(
            "huber",
            "0.5 e^2 where |e| <= delta else delta (|e| - 0.5 delta), e = y - t, per element; "
            "d/dy = e clipped to [-delta, delta]",
            per="element",
            params=(Param("delta", 1.0, "threshold between the squared and the linear part", low=0.0, above_low=True),),
        ),
    ]
}

LOSS_ALIASES: dict[str, str] = {alias: loss.name for loss in LOSSES.values() for alias in loss.aliases}


@dataclass(frozen=True)
class Optimizer:
    """An update rule: per parameter, its state (each starting at zero unless said otherwise) and
    the update at step t = 1..N with g = dL/dp (SPEC section 7, PyTorch's documented algorithms)."""

    name: str
    formula: str
    params: tuple[Param, ...] = ()
    state: tuple[str, ...] = ()  # the per-parameter state explain shows, in the formula's names
    state_when: dict[str, str] = field(default_factory=dict)  # a state kept only when this hyperparameter is set
    normalized: bool = False  # the step divides by the gradient's own magnitude (manualprop.verdict.conditioning)

    def active_state(self, hyper: dict[str, float | bool]) -> list[str]:
        """The state this configuration keeps (Adam's vmax only with amsgrad, a buffer only with momentum)."""
        return [s for s in self.state if s not in self.state_when or hyper.get(self.state_when[s])]

    def settings(self, given: Mapping[str, float | bool | None]) -> dict[str, float | bool]:
        """Every hyperparameter: the ones given, the defaults for the rest (required ones must be given:
        one that is not is left out, and the case file reports it)."""
        found = {p.name: given[p.name] if given.get(p.name) is not None else p.default for p in self.params}
        return {name: value for name, value in found.items() if value is not None}


EPSILON = Param("epsilon", None, "epsilon", "PyTorch's default is 1e-8, Keras's 1e-7", low=0.0, above_low=True)
BETA1 = Param("beta1", 0.9, "first moment's decay", low=0.0, below=1.0)
BETA2 = Param("beta2", 0.999, "second moment's decay", low=0.0, below=1.0)
AMSGRAD = Param("amsgrad", False, "switch to the running maximum of v", kind=bool)

# In this order the fuzzer draws them, simplest first.
OPTIMIZERS: dict[str, Optimizer] = {
    o.name: o
    for o in [
        Optimizer(
            "sgd",
            "g <- g + weight_decay p; b <- momentum b + g; d = g + momentum b if nesterov else b; p <- p - lr d",
            (
                Param("momentum", 0.0, "momentum", low=0.0),
                Param("nesterov", False, "nesterov", kind=bool),
                Param("weight_decay", 0.0, "weight decay (L2, added to g)", low=0.0),
            ),
            ("b",),
            {"b": "momentum"},
        ),
        Optimizer(
            "adam",
            "m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2; p <- p - lr (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)",
            (BETA1, BETA2, EPSILON, AMSGRAD),
            ("m", "v", "vmax"),
            {"vmax": "amsgrad"},
            normalized=True,
        ),
        Optimizer(
            "adamw",
            "p <- p (1 - lr weight_decay), then the adam update with g taken before the decay",
            (
                BETA1,
                BETA2,
                EPSILON,
                Param("weight_decay", None, "weight decay", "PyTorch's default is 0.01, Keras's 0.004", low=0.0),
                AMSGRAD,
            ),
            ("m", "v", "vmax"),
            {"vmax": "amsgrad"},
            normalized=True,
        ),
        Optimizer(
            "rmsprop",
            "s <- rho s + (1-rho) g^2; centered: a <- rho a + (1-rho) g, s~ = s - a^2; "
            "b <- mu b + g/(sqrt(s~) + eps), p <- p - lr b (mu = 0: p <- p - lr g/(sqrt(s~) + eps))",
            (
                Param(
                    "rho",
                    None,
                    "decay of the mean square (rho)",
                    "PyTorch's alpha defaults to 0.99, Keras's rho to 0.9",
                    low=0.0,
                    below=1.0,
                ),
                EPSILON,
                Param("momentum", 0.0, "momentum", low=0.0),
                Param("centered", False, "centered", kind=bool),
            ),
            ("s", "a", "b"),
            {"a": "centered", "b": "momentum"},
            normalized=True,
        ),
        Optimizer(
            "adagrad",
            "acc <- acc + g^2; p <- p - lr g/(sqrt(acc) + eps)",
            (
                Param("initial_accumulator", None, "initial accumulator", "PyTorch's default is 0, Keras's 0.1", low=0.0),
                Param("epsilon", None, "epsilon", "PyTorch's default is 1e-10, Keras's 1e-7", low=0.0, above_low=True),
            ),
            ("acc",),
            normalized=True,
        ),
    ]
}


@dataclass(frozen=True)
class LayerType:
    """A layer kind (SPEC section 8): the fields a case file may give it, its trainable parameters
    and its state (changed by the forward pass of a training step, reported and compared like a
    parameter), in the order reports list them, and what it takes in.

    ``takes``: "features" for (batch, features) only, "images" for (batch, height, width, channels)
    only, "any" for either. The maths lives in :mod:`manualprop.reference.layers` (NumPy), the
    oracle's :mod:`manualprop.oracle.maths`, and a builder per framework in its adapter.
    """

    name: str
    formula: str
    fields: tuple[str, ...]  # the keys besides ``type`` it may write
    required: tuple[str, ...] = ()  # the keys it must write
    params: tuple[str, ...] = ()  # trainable, in report order
    state: tuple[str, ...] = ()  # moving statistics: not trained, updated by the step's forward pass
    takes: str = "any"
    activation: bool = False  # A = f(Z) after its linear part, as dense
    frameworks: str = ""  # the frameworks' defaults of a required field, where they differ

    @property
    def reported(self) -> tuple[str, ...]:
        return self.params + self.state


_WEIGHTS = ("activation", "kernel", "weight", "bias", "init")

# In this order the fuzzer draws them.
LAYER_TYPES: dict[str, LayerType] = {
    k.name: k
    for k in [
        LayerType(
            "dense",
            "Z = A_prev @ W + b, A = f(Z); dW = A_prev.T @ dZ, db = sum dZ, dA_prev = dZ @ W.T",
            ("units", *_WEIGHTS),
            ("units",),
            ("kernel", "bias"),
            takes="features",
            activation=True,
        ),
        LayerType(
            "conv2d",
            "Z[b, y, x, o] = sum_(i, j, c) A_prev_padded[b, y s + i, x s + j, c] K[i, j, c, o] + b[o], A = f(Z); "
            "dK = patches.T @ dZ, db = sum dZ, dA_prev = dZ @ K.T scattered back over the patches",
            ("filters", "kernel_size", "strides", "padding", *_WEIGHTS),
            ("filters", "kernel_size"),
            ("kernel", "bias"),
            takes="images",
            activation=True,
        ),
        LayerType(
            "max_pool2d",
            "A = the largest value of each window; dA_prev: dA to the first largest of its window, 0 elsewhere",
            ("pool_size", "strides"),
            ("pool_size",),
            takes="images",
        ),
        LayerType(
            "avg_pool2d",
            "A = the mean of each window; dA_prev: dA / (window size) to every element of its window",
            ("pool_size", "strides"),
            ("pool_size",),
            takes="images",
        ),
        LayerType("flatten", "A = A_prev reshaped to (batch, height * width * channels), (h, w, c) order", (), takes="any"),
        LayerType(
            "batch_norm",
            "mean, var (biased) of each feature of the last axis over every other axis; x^ = (x - mean)/sqrt(var + eps); "
            "A = gamma x^ + beta; moving <- momentum moving + (1 - momentum) stat",
            ("epsilon", "momentum", "gamma", "beta", "moving_mean", "moving_variance"),
            ("epsilon", "momentum"),
            ("gamma", "beta"),
            ("moving_mean", "moving_variance"),
            frameworks="Keras's epsilon defaults to 1e-3 and momentum to 0.99; PyTorch's eps to 1e-5 and momentum to 0.1 (= 1 - 0.9)",
        ),
        LayerType(
            "layer_norm",
            "mean, var (biased) of each sample over its last axis; x^ = (x - mean)/sqrt(var + eps); A = gamma x^ + beta",
            ("epsilon", "gamma", "beta"),
            ("epsilon",),
            ("gamma", "beta"),
            frameworks="Keras's epsilon defaults to 1e-3, PyTorch's eps to 1e-5",
        ),
    ]
}

# What a parameter's gradient is called in a layer's trace (manualprop.engines.LayerTrace).
GRADIENT_FIELD = {"kernel": "dW", "bias": "db", "gamma": "dgamma", "beta": "dbeta"}


def loss(name: str) -> Loss:
    """The loss declared as ``name`` or under one of its aliases."""
    return LOSSES[LOSS_ALIASES.get(name, name)]
