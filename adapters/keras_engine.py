"""The Keras engine: a real ``keras.Sequential`` of the case's layers (``Dense``, ``Conv2D``,
``MaxPooling2D``, ``AveragePooling2D``, ``Flatten``, ``BatchNormalization``, ``LayerNormalization``),
compiled with the case's ``keras.optimizers`` optimizer and a Keras loss, stepped through
``train_on_batch``, Keras's own training path (measured bit-identical to ``fit`` for one batch),
``case.steps`` times on the batch.

Conventions pinned here:

* Dense kernels are (in, out) and Conv2D kernels (kh, kw, in, out) already, Keras's own layouts:
  no transpose. Weights are loaded and read by the variable's name (kernel, bias, gamma, beta,
  moving_mean, moving_variance), never by their position in ``get_weights()``.
* Images are channels-last (``data_format="channels_last"`` on every image layer, whatever
  ``keras.config.image_data_format()`` says), so Flatten orders features (height, width, channels).
  Conv2D's ``padding="same"`` is TensorFlow's rule, the SPEC's: the odd row or column at the bottom or right.
  Pools are ``padding="valid"`` with the case's strides.
* BatchNormalization(axis=-1, momentum=case momentum, epsilon=case epsilon) runs in training mode
  under ``train_on_batch``: the batch's mean and biased variance (``ops.moments``) normalize, and
  its non-trainable moving_mean and moving_variance move by ``momentum*moving + (1-momentum)*stat``
  with that biased variance, as the SPEC. Their change in a step is reported as the delta of
  ``layers.<i>.moving_mean`` / ``layers.<i>.moving_variance``. Keras computes ``y = x*inv + (beta - mean*inv)``
  with ``inv = gamma*rsqrt(var + eps)`` (``tf.nn.batch_normalization``; LayerNormalization the same
  per sample): epsilon in the same place as the SPEC, the product rearranged (rounding only).
  Keras 2 gets ``fused=False``: its fused kernel (float32 images) would update the moving variance
  with the unbiased batch variance (measured).
* The optimizer sees the trainable weights only (kernel, bias, gamma, beta), built in the order
  :func:`_parameters` names them, so its state lists line up with those names; moving statistics
  are changed by the forward pass, never by the optimizer.
* float64 is set with ``keras.config.set_floatx`` for the run (and for the trace's pass) and restored
  after it; a layer dtype alone would leave the loss and the learning-rate variable in float32 (and
  Keras 2's Huber computes in floatx).
* Keras's MSE, MAE, BinaryCrossentropy and Huber average over the last axis (the outputs of each sample)
  before the reduction over the batch. ``sum_over_batch_size`` is then the SPEC's mean over every element, but
  Keras's ``sum`` is the SPEC's sum divided by the number of outputs: the loss weight makes up that factor
  (:func:`_loss_weight`; the per-sample cross-entropies need none).
  The case's ``scale`` is applied the same way, through ``compile(loss_weights=...)``.
* A ``Dense(activation="softmax")`` or ``"sigmoid"`` output remembers its logits (``_keras_logits``,
  Keras 3 on TensorFlow, eager and traced alike), so ``categorical_crossentropy``,
  ``sparse_categorical_crossentropy`` (int class-index targets) and ``binary_crossentropy`` are
  computed from the logits, as in PyTorch and the NumPy engine, never from a clipped probability
  (measured: a logit of 30 gives the loss on the logits, not the clipped ``-log(1e-7)``).
  ``Huber(delta=case delta)``.
* leaky_relu gets the case's slope explicitly (Keras's default is 0.2; Keras 2's 0.3).
* ``jit_compile=False``: XLA may fuse and reorder the arithmetic.
* Optimizers (SPEC section 7), set up as the SPEC's formulas wherever a setting exists
  (:data:`OPTIMIZER`). In a float64 model every hyperparameter is given as ``np.float64``: a
  Python float goes through ``tf.cast`` as a float32 constant first, so Keras would step with
  momentum 0.8999999761581421 for 0.9 (and so beta1, beta2, weight_decay; Keras 2's batch-norm
  momentum likewise). The SPEC's SGD
  weight decay is L2 added to g; Keras's ``weight_decay`` is decoupled (it never enters the
  momentum), so it is given as an L2 penalty ``weight_decay / 2 * sum(p^2)`` on every trainable
  kernel, bias, gamma and beta instead, and the loss reported is the case's loss without it.
  Keras 2's Adam keeps
  ``adaptive_epsilon=False``, its default and Keras 3's behaviour (see :func:`_adam`). What no setting
  removes is pinned by a canary in cases/canaries/ and named by a hint
  (:mod:`manualprop.verdict.hints`, with the formulas of :mod:`manualprop.reference.variants`): Keras 3's Adam and
  AdamW put epsilon on the uncorrected v, RMSprop and Adagrad put it inside the square root.
  The state is reported in the SPEC's names and meaning (:data:`STATE`): Keras's SGD keeps
  ``-lr * b`` and its RMSprop ``lr * b``, the same steps for a constant learning rate.
* The compiled model is cached per architecture (every field that changes the built model: each
  layer's kind, units, activation, window, strides, padding, epsilon, momentum and shapes; the
  sample's shape; the loss and its parameters), optimizer and hyperparameters (Keras bakes the
  hyperparameters into its traced step; the learning rate is a variable). Its optimizer is built
  at once and its variables' initial values kept: every run restores them (iterations 0, moments
  0, Adagrad's accumulators at initial_accumulator), so no state leaks from one case to the next.
* The trace (:func:`_trace`) is a second, GradientTape pass over the same layers on the parameters
  a step started from: dense and conv2d Z (``matmul`` / the layer's ``convolution_op``, plus bias),
  A = the layer's activation of Z; pools and flatten A = the layer's call; norm layers A = the
  layer's call (batch norm with ``training=True``), with mean and var from ``ops.moments`` (the op the
  layers call) on the layer's input, and xhat from Keras's own normalization op without gamma and beta.
  dA, dZ, dW, db, dgamma, dbeta are the tape's gradients; dxhat = dA * gamma. The pass loads the
  parameters it needs and puts back every value it found (a batch norm called in training mode moves
  its moving statistics): the step's reported values never change.

Keras 2 runs too: the ``keras`` 2.x package that TensorFlow 2.15 and older install, or
``tf_keras`` when ``TF_USE_LEGACY_KERAS=1`` (as TensorFlow itself reads that variable). The two
APIs differ in the places this adapter touches, each handled in one function: where floatx is
set (:func:`_floatx`), how leaky_relu takes its slope (:func:`_leaky_relu`), Adam's
``adaptive_epsilon``, Keras 2's only and left at its default (:func:`_adam`), the ops the L2 penalty
and the trace's statistics are written with (:func:`_penalty`, :func:`_norm_stats`), and batch norm's
``fused`` (:func:`_batch_norm`). Keras 2's LayerNormalization computes float32 with epsilon >= 1.001e-5
through the fused batch-norm kernel (no setting turns it off): the same maths, another order of rounding.
The optimizers' state lists have the same names in both (:data:`STATE`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from manualprop import Case
from manualprop.casefile.case import Layer
from manualprop.concepts import LOSSES
from manualprop.engines import BuildCache, LayerTrace, StepRecord, StepResult

INSTALL = 'pip install "manualprop[tf]"'


def legacy_keras() -> bool:
    """True when TF_USE_LEGACY_KERAS asks for Keras 2 from the tf_keras package."""
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")


class KerasEngine:
    name = "keras"

    def unavailable(self) -> str | None:
        if legacy_keras():
            if importlib.util.find_spec("tf_keras") is None:
                return 'TF_USE_LEGACY_KERAS=1 asks for Keras 2, but tf_keras is not installed (install it with: pip install "manualprop[keras2]")'
            return None
        if importlib.util.find_spec("keras") is None:
            return f"keras is not installed (install it with: {INSTALL})"
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        if importlib.util.find_spec(backend) is None:
            from .torch_engine import INSTALL as TORCH_INSTALL

            how = {"tensorflow": INSTALL, "torch": TORCH_INSTALL}.get(backend, f"pip install {backend}")
            return f"keras's backend {backend} is not installed (install it with: {how})"
        return None

    def __init__(self, cache_size: int = 256):
        self.models = BuildCache(cache_size)

    def step(self, case: Case) -> StepResult:
        keras = _import_keras()
        with _floatx_set(keras, case.dtype.name):
            return _step(keras, case, self.compiled(keras, case))

    def compiled(self, keras, case: Case) -> _Compiled:
        """The compiled model for the case's architecture, dtype, loss and optimizer: built once, then
        reused (its weights, learning rate and optimizer state are loaded for every run)."""
        return self.models.get(_architecture(keras, case), lambda: _build(keras, case))


# Informational lines TensorFlow writes straight to file descriptor 2 at import and device
# discovery (no GPU here is not an error), whatever TF_CPP_MIN_LOG_LEVEL says. They are
# dropped; anything else it writes is passed on.
_IMPORT_NOISE = re.compile(
    r"oneDNN custom operations are on|All log messages before absl::InitializeLog|cpu_feature_guard"
    r"|To enable the following instructions|rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|Could not find cuda drivers|TF-TRT Warning"
    r"|failed call to cuInit"
)


def _import_keras():
    """Import keras (tf_keras for Keras 2 on request), keeping TensorFlow's import-time info lines quiet."""
    name = "tf_keras" if legacy_keras() else "keras"
    logger = logging.getLogger("tensorflow")
    if _retracing_dropped not in logger.filters:  # also when keras was imported before (by the caller)
        logger.addFilter(_retracing_dropped)
    if name in sys.modules:
        return sys.modules[name]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            keras = importlib.import_module(name)
            if "tensorflow" in sys.modules:  # device discovery logs too, on first use: do it here
                sys.modules["tensorflow"].config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
    kept = [line for line in text.splitlines() if line.strip() and not _IMPORT_NOISE.search(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return keras


def _retracing_dropped(record: logging.LogRecord) -> bool:
    """Each architecture gets its own model, so TensorFlow traces one step function per model and
    warns that retracing is expensive: expected here, and the only message this filter drops."""
    return "triggered tf.function retracing" not in record.getMessage()


def _floatx(keras):
    """(floatx, set_floatx): keras.config in Keras 3, keras.backend in Keras 2."""
    where = keras.config if hasattr(getattr(keras, "config", None), "set_floatx") else keras.backend
    return where.floatx, where.set_floatx


@contextlib.contextmanager
def _floatx_set(keras, dtype: str) -> Iterator[None]:
    """floatx set to ``dtype`` inside, restored after (Keras 2's losses compute in floatx)."""
    floatx, set_floatx = _floatx(keras)
    previous = floatx()
    set_floatx(dtype)
    try:
        yield
    finally:
        set_floatx(previous)


def _leaky_relu(keras, alpha: float):
    if hasattr(keras.activations, "leaky_relu"):  # Keras 3
        return functools.partial(keras.activations.leaky_relu, negative_slope=alpha)
    return functools.partial(keras.activations.relu, alpha=alpha)  # Keras 2: relu's alpha is the negative slope


# The Keras object of every declared activation and loss (manualprop.concepts), by name.
ACTIVATION = {
    "linear": lambda keras, alpha: "linear",
    "sigmoid": lambda keras, alpha: "sigmoid",
    "tanh": lambda keras, alpha: "tanh",
    "relu": lambda keras, alpha: "relu",
    "leaky_relu": _leaky_relu,
    "softmax": lambda keras, alpha: "softmax",
}
# Each builder takes the loss's own parameters (case.loss_params) and gives a class taking ``reduction``.
LOSS: dict[str, Callable[..., Any]] = {
    "mse": lambda keras: keras.losses.MeanSquaredError,
    "mae": lambda keras: keras.losses.MeanAbsoluteError,
    "categorical_crossentropy": lambda keras: keras.losses.CategoricalCrossentropy,
    # on the logits the sigmoid output keeps (see the module docstring), as softmax's are for the two below
    "binary_crossentropy": lambda keras: keras.losses.BinaryCrossentropy,
    "sparse_categorical_crossentropy": lambda keras: keras.losses.SparseCategoricalCrossentropy,
    "huber": lambda keras, delta: functools.partial(keras.losses.Huber, delta=delta),
}


def _activation(keras, layer: Layer):
    return ACTIVATION[layer.activation](keras, layer.alpha)


def _dense(keras, layer: Layer, dtype: str, number, penalty) -> object:
    return keras.layers.Dense(
        layer.units,
        activation=_activation(keras, layer),
        use_bias=layer.bias is not None,
        dtype=dtype,
        kernel_regularizer=penalty,
        bias_regularizer=penalty if layer.bias is not None else None,
    )


def _conv2d(keras, layer: Layer, dtype: str, number, penalty) -> object:
    return keras.layers.Conv2D(
        layer.units,
        layer.window,
        strides=layer.strides,
        padding=layer.padding,
        data_format="channels_last",
        activation=_activation(keras, layer),
        use_bias=layer.bias is not None,
        dtype=dtype,
        kernel_regularizer=penalty,
        bias_regularizer=penalty if layer.bias is not None else None,
    )


def _pool(name: str) -> Callable[..., object]:
    def build(keras, layer: Layer, dtype: str, number, penalty) -> object:
        pool = getattr(keras.layers, name)
        return pool(pool_size=layer.window, strides=layer.strides, padding="valid", data_format="channels_last", dtype=dtype)

    return build


def _batch_norm(keras, layer: Layer, dtype: str, number, penalty) -> object:
    # Keras 2 only: its fused kernel updates the moving variance with the unbiased batch variance.
    keras2 = {} if hasattr(keras, "ops") else {"fused": False}
    return keras.layers.BatchNormalization(
        axis=-1,
        momentum=number(layer.momentum),
        epsilon=layer.epsilon,
        gamma_regularizer=penalty,
        beta_regularizer=penalty,
        dtype=dtype,
        **keras2,
    )


def _layer_norm(keras, layer: Layer, dtype: str, number, penalty) -> object:
    return keras.layers.LayerNormalization(
        axis=-1, epsilon=layer.epsilon, gamma_regularizer=penalty, beta_regularizer=penalty, dtype=dtype
    )


# The Keras layer of every declared layer type (manualprop.concepts.LAYER_TYPES), by name:
# (keras, layer, dtype, number, penalty) -> a Keras layer; ``penalty`` regularizes its trainable weights.
LAYER: dict[str, Callable[..., object]] = {
    "dense": _dense,
    "conv2d": _conv2d,
    "max_pool2d": _pool("MaxPooling2D"),
    "avg_pool2d": _pool("AveragePooling2D"),
    "flatten": lambda keras, layer, dtype, number, penalty: keras.layers.Flatten(data_format="channels_last", dtype=dtype),
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
}


def _number(case: Case):
    """A hyperparameter as Keras should get it: np.float64 in a float64 model (a float subclass, which
    ``tf.cast`` keeps in float64), a Python float otherwise."""
    return np.float64 if case.dtype == np.float64 else float


def _sgd(keras, hp: dict, number) -> object:
    # weight_decay is not passed: Keras's is decoupled; the SPEC's L2 is a penalty (_penalty).
    return keras.optimizers.SGD(momentum=number(hp["momentum"]), nesterov=bool(hp["nesterov"]))


def _adam(keras, hp: dict, number, **decay) -> object:
    cls = keras.optimizers.AdamW if decay else keras.optimizers.Adam
    settings = dict(
        beta_1=number(hp["beta1"]),
        beta_2=number(hp["beta2"]),
        epsilon=number(hp["epsilon"]),
        amsgrad=bool(hp["amsgrad"]),
        **decay,
    )
    # Keras 2's Adam has adaptive_epsilon (epsilon on the corrected v, as the SPEC), False by default.
    # It is left at its default: Keras 2 and Keras 3 then take the same step, as people's Keras code
    # does, and one canary pins it across the matrix (a known difference cannot yet depend on the
    # Keras version, so setting it would fail the canary in the Keras 2 cell).
    return cls(**settings)


# The Keras optimizer of every declared optimizer (manualprop.concepts), by name: (keras, hyper, number) -> optimizer.
OPTIMIZER = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": lambda keras, hp, number: _adam(keras, hp, number, weight_decay=number(hp["weight_decay"])),
    "rmsprop": lambda keras, hp, number: keras.optimizers.RMSprop(
        rho=number(hp["rho"]), momentum=number(hp["momentum"]), epsilon=number(hp["epsilon"]), centered=bool(hp["centered"])
    ),
    "adagrad": lambda keras, hp, number: keras.optimizers.Adagrad(
        initial_accumulator_value=number(hp["initial_accumulator"]), epsilon=number(hp["epsilon"])
    ),
}

# Where each optimizer keeps the state the SPEC names, per parameter (the same attribute in Keras 3
# and Keras 2, one variable per trainable variable in the order the optimizer was built with), and
# how the SPEC's value follows from Keras's: SGD keeps -lr * b, RMSprop's momentum lr * b.
STATE: dict[str, dict[str, tuple[str, Callable[[np.ndarray, Any], np.ndarray] | None]]] = {
    "sgd": {"b": ("momentums", lambda x, lr: -x / lr)},
    "adam": {"m": ("_momentums", None), "v": ("_velocities", None), "vmax": ("_velocity_hats", None)},
    "adamw": {"m": ("_momentums", None), "v": ("_velocities", None), "vmax": ("_velocity_hats", None)},
    "rmsprop": {"s": ("_velocities", None), "a": ("_average_gradients", None), "b": ("_momentums", lambda x, lr: x / lr)},
    "adagrad": {"acc": ("_accumulators", None)},
}


def _kept(case: Case) -> set[str]:
    """The state names the case's settings use (SGD without momentum keeps no b; no vmax without amsgrad)."""
    hp = case.hyper
    unused = {
        "sgd": {"b"} if not hp.get("momentum") else set(),
        "adam": set() if hp.get("amsgrad") else {"vmax"},
        "adamw": set() if hp.get("amsgrad") else {"vmax"},
        "rmsprop": ({"a"} if not hp.get("centered") else set()) | ({"b"} if not hp.get("momentum") else set()),
    }
    return set(STATE[case.optimizer]) - unused.get(case.optimizer, set())


@dataclass
class _Compiled:
    model: Any  # a compiled keras.Model; the framework's objects are used dynamically here
    layers: list
    loss_fn: Any  # the loss object
    weight: float
    initial: list  # the optimizer's variables as built, restored before every run
    penalized: bool  # the SPEC's SGD weight decay as an L2 penalty: the case's loss is a metric then


def _loss_weight(case: Case) -> float:
    """The case's scale, times the number of outputs where Keras's sum is the SPEC's sum / outputs
    (a per-element loss, which Keras first averages over the last axis)."""
    per_sample_mean = LOSSES[case.loss].per == "element"
    return case.scale * (case.targets.shape[-1] if per_sample_mean and case.reduction == "sum" else 1)


def _architecture(keras, case: Case) -> tuple:
    """What a compiled model depends on: everything but the weights, the data and the learning rate
    (the optimizer's hyperparameters are constants in Keras's traced step)."""
    layers = tuple(layer.architecture for layer in case.layers)
    return (
        keras.__name__,
        case.dtype.name,
        case.inputs.shape[1:],
        layers,
        case.loss,
        tuple(sorted(case.loss_params.items())),
        case.reduction,
        _loss_weight(case),
        case.optimizer,
        tuple(sorted(case.hyper.items())),
    )


def _penalty(keras, case: Case):
    """The SPEC's SGD weight decay, g <- g + wd p, as a regularizer wd / 2 * sum(p^2) (on every trainable
    kernel, bias, gamma and beta), its factor in the parameter's dtype (Keras's own L2 casts a Python float through float32); None without it."""
    wd = case.hyper.get("weight_decay", 0.0) if case.optimizer == "sgd" else 0.0
    if not wd:
        return None
    half = case.dtype.type(wd) / 2
    if hasattr(keras, "ops"):  # Keras 3, on any backend
        return lambda p: keras.ops.multiply(keras.ops.sum(keras.ops.square(p)), half)
    import tensorflow as tf  # Keras 2

    return lambda p: tf.reduce_sum(tf.square(p)) * half


def _build(keras, case: Case) -> _Compiled:
    # The dtype is given to every layer as well as through floatx: Keras 3 caches its default dtype
    # policy on first use, so a float64 model built after a float32 one would otherwise be float32.
    dtype, number = case.dtype.name, _number(case)
    penalty = _penalty(keras, case)
    layers = [LAYER[layer.kind](keras, layer, dtype, number, penalty) for layer in case.layers]
    model = keras.Sequential([keras.Input(shape=case.inputs.shape[1:], dtype=dtype), *layers])
    loss_class = LOSS[case.loss](keras, **case.loss_params)
    loss_fn = loss_class(reduction="sum_over_batch_size" if case.reduction == "mean" else "sum")
    weight = _loss_weight(case)

    def case_loss(targets, outputs):  # the loss without the penalty, as the SPEC reports it
        return weight * loss_fn(targets, outputs)

    optimizer = OPTIMIZER[case.optimizer](keras, case.hyper, _number(case))
    model.compile(
        optimizer=optimizer,
        loss=loss_fn,
        loss_weights=[weight],
        jit_compile=False,
        metrics=[case_loss] if penalty is not None else None,
    )
    # Built at once, on the trainable parameters in the order _parameters names them (kernel, bias or
    # gamma, beta per layer): each of its state lists follows that order.
    optimizer.build(list(_trainable(case, layers).values()))
    initial = [np.array(v.numpy()) for v in optimizer.variables]
    return _Compiled(model, layers, loss_fn, weight, initial, penalty is not None)


def _weights(keras_layer) -> dict[str, Any]:
    """A Keras layer's variables by short name: kernel, bias, gamma, beta, moving_mean, moving_variance
    (Keras 3 names them so; Keras 2 as ``dense/kernel:0``)."""
    return {v.name.rsplit("/", 1)[-1].split(":")[0]: v for v in keras_layer.weights}


def _variables(case: Case, layers: list) -> dict[str, Any]:
    """Every parameter's and state's Keras variable, by the SPEC's name, in report order."""
    found = {}
    for i, (layer, keras_layer) in enumerate(zip(case.layers, layers, strict=True)):
        own = _weights(keras_layer)
        for name in layer.arrays():
            if name not in own:
                raise ValueError(f"Keras's {type(keras_layer).__name__} has no variable {name!r}; it has {sorted(own)}")
            found[f"layers.{i}.{name}"] = own[name]
    return found


def _trainable(case: Case, layers: list) -> dict[str, Any]:
    """The variables the optimizer updates (no moving statistics), in the order :func:`_parameters` names them."""
    return {name: v for name, v in _variables(case, layers).items() if case.trainable(name)}


def _load(case: Case, layers: list) -> None:
    params = case.parameters()
    for name, variable in _variables(case, layers).items():
        variable.assign(params[name])


def _parameters(case: Case, layers: list) -> dict[str, np.ndarray]:
    """Every parameter's and state's current value, by name, kernels (in, out) or (kh, kw, in, out)."""
    return {name: np.array(v.numpy()) for name, v in _variables(case, layers).items()}


def _reset(compiled: _Compiled) -> None:
    """The optimizer as built: iterations 0, every moment 0, Adagrad's accumulators at their start."""
    for variable, value in zip(compiled.model.optimizer.variables, compiled.initial, strict=True):
        variable.assign(value)


def _state(case: Case, compiled: _Compiled, names: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """The optimizer's state after a step, per trainable parameter, in the SPEC's names and meaning."""
    optimizer, kept = compiled.model.optimizer, _kept(case)
    names = [name for name in names if case.trainable(name)]  # the optimizer's own order (_build)
    state: dict[str, dict[str, np.ndarray]] = {name: {} for name in names}
    for concept, (attribute, convert) in STATE[case.optimizer].items():
        slots = getattr(optimizer, attribute, None) or []
        if concept not in kept or len(slots) != len(names):
            continue
        for name, slot in zip(names, slots, strict=True):
            value = np.asarray(slot.numpy())
            state[name][concept] = convert(value, value.dtype.type(case.lr)) if convert else value
    return state


class _Record(StepRecord):
    """A step's record whose trace is computed the first time it is read (a second pass over the
    parameters the step started from); a pass that fails leaves it empty and says why in ``trace_error``."""

    def __init__(self, loss: float, deltas: dict, state: dict, compute: Callable[[], list[LayerTrace]]):
        self._compute: Callable[[], list[LayerTrace]] | None = compute
        self._trace: list[LayerTrace] | None = None
        self.trace_error: str | None = None
        super().__init__(loss, deltas, state)

    @property
    def trace(self) -> list[LayerTrace] | None:
        if self._trace is None and self._compute is not None:
            compute, self._compute = self._compute, None
            try:
                self._trace = compute()
            except Exception as err:  # a diagnostic pass that fails leaves the step's verdict standing
                self.trace_error, self._trace = f"{type(err).__name__}: {err}", []
        return self._trace

    @trace.setter
    def trace(self, value: list[LayerTrace] | None) -> None:
        if value is not None:
            self._trace, self._compute = value, None

    @property
    def has_trace(self) -> bool:
        return self._trace is not None

    def __repr__(self) -> str:
        return f"StepRecord(loss={self.loss!r}, deltas={sorted(self.deltas)}, state={sorted(self.state)})"


def _step(keras, case: Case, compiled: _Compiled) -> StepResult:
    _load(case, compiled.layers)
    _reset(compiled)
    optimizer = compiled.model.optimizer
    optimizer.learning_rate = _number(case)(case.lr)
    start = before = _parameters(case, compiled.layers)
    names = list(start)
    history: list[StepRecord] = []
    for _ in range(case.steps):
        logs = compiled.model.train_on_batch(case.inputs, case.targets, return_dict=True)
        loss = logs["case_loss"] if compiled.penalized else logs["loss"]
        after = _parameters(case, compiled.layers)
        history.append(
            _Record(
                float(loss),
                {n: after[n] - before[n] for n in names},
                _state(case, compiled, names),
                functools.partial(_traced, keras, case, compiled, before),
            )
        )
        before = after

    deltas = {n: before[n] - start[n] for n in names}
    return StepResult(loss=history[0].loss, deltas=deltas, history=history, trace_factory=lambda: history[0].trace or [])


def _traced(keras, case: Case, compiled: _Compiled, params: dict[str, np.ndarray]) -> list[LayerTrace]:
    """The trace of the step that started from ``params``: they are loaded, then a GradientTape pass;
    every value the model held before (weights and moving statistics) is put back after it."""
    held = case.with_parameters(_parameters(case, compiled.layers))
    loaded = case.with_parameters(params)
    _load(loaded, compiled.layers)
    try:
        with _floatx_set(keras, case.dtype.name):  # read after the step, perhaps long after
            return _trace(keras, loaded, compiled.layers, compiled.loss_fn, compiled.weight)
    finally:
        _load(held, compiled.layers)


def _variable(v):
    """The tf.Variable behind a Keras 3 variable (Keras 2's are tf.Variables already)."""
    return v.value if isinstance(getattr(type(v), "value", None), property) else v


# One layer's forward pass in the tape: (its output, the forward fields of its LayerTrace, and the
# gradient fields with the tensor or variable each is taken against).
Traced = tuple[Any, dict[str, Any], dict[str, Any]]


def _linear_traced(linear: Callable[[Any, Any, Any], Any]) -> Callable[..., Traced]:
    """dense and conv2d: Z = linear(A_prev, kernel) + bias, A = the layer's activation of Z."""

    def forward(keras, layer: Layer, keras_layer, a_prev) -> Traced:
        own = _weights(keras_layer)
        kernel = _variable(own["kernel"])
        bias = _variable(own["bias"]) if layer.bias is not None else None
        z = linear(keras_layer, a_prev, kernel) if bias is None else linear(keras_layer, a_prev, kernel) + bias
        a = keras_layer.activation(z)
        return a, {"Z": z, "A": a}, {"dA": a, "dZ": z, "dW": kernel, "db": bias}

    return forward


def _called_traced(keras, layer: Layer, keras_layer, a_prev) -> Traced:
    """Pools and flatten: A = the layer's own call."""
    a = keras_layer(a_prev)
    return a, {"A": a}, {"dA": a}


def _norm_stats(keras, layer: Layer, x) -> tuple[Any, Any, Any]:
    """mean, var (biased) and xhat of a norm layer's input, by the ops the layers call: ``ops.moments``
    over every axis but the last (batch_norm) or the last (layer_norm), and Keras's normalization op
    without gamma and beta, so xhat = x rsqrt(var + eps) - mean rsqrt(var + eps), as Keras rounds it."""
    import tensorflow as tf

    axes = list(range(len(x.shape) - 1)) if layer.kind == "batch_norm" else [len(x.shape) - 1]
    if hasattr(keras, "ops"):  # Keras 3
        mean, var = keras.ops.moments(x, axes=axes, keepdims=True)
        if layer.kind == "batch_norm":
            xhat = keras.ops.batch_normalization(x, mean, var, axis=-1, epsilon=layer.epsilon)
        else:
            xhat = keras.ops.layer_normalization(x, axis=-1, epsilon=layer.epsilon)
    else:  # Keras 2's layers call these (its float32 layer norm the fused kernel instead)
        mean, var = tf.nn.moments(x, axes=axes, keepdims=True)
        xhat = tf.nn.batch_normalization(x, mean, var, None, None, layer.epsilon)
    squeeze = (lambda t: tf.reshape(t, (-1,))) if layer.kind == "batch_norm" else (lambda t: t[..., 0])
    return squeeze(mean), squeeze(var), xhat


def _norm_traced(keras, layer: Layer, keras_layer, a_prev) -> Traced:
    """batch_norm (in training mode) and layer_norm: A = the layer's own call; mean, var, xhat beside it."""
    mean, var, xhat = _norm_stats(keras, layer, a_prev)
    a = keras_layer(a_prev, training=True) if layer.kind == "batch_norm" else keras_layer(a_prev)
    own = _weights(keras_layer)
    gamma, beta = _variable(own["gamma"]), _variable(own["beta"])
    return a, {"mean": mean, "var": var, "xhat": xhat, "A": a}, {"dA": a, "dgamma": gamma, "dbeta": beta}


def _matmul(keras_layer, a, kernel):
    import tensorflow as tf

    return tf.matmul(a, kernel)


# The trace's forward pass of every declared layer type, by name.
TRACED: dict[str, Callable[..., Traced]] = {
    "dense": _linear_traced(_matmul),
    "conv2d": _linear_traced(lambda keras_layer, a, kernel: keras_layer.convolution_op(a, kernel)),
    "max_pool2d": _called_traced,
    "avg_pool2d": _called_traced,
    "flatten": _called_traced,
    "batch_norm": _norm_traced,
    "layer_norm": _norm_traced,
}


def _trace(keras, case: Case, layers: list, loss_fn, weight: float) -> list[LayerTrace]:
    """Per layer the NumPy reference's fields (:class:`~manualprop.engines.LayerTrace`), by a
    GradientTape pass over the same Keras layers and the same loss (TensorFlow backend only)."""
    if "tensorflow" not in sys.modules or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return []
    import tensorflow as tf

    kept = []
    with tf.GradientTape(persistent=True) as tape:
        a = tf.constant(case.inputs)
        for layer, keras_layer in zip(case.layers, layers, strict=True):
            a, forward, against = TRACED[layer.kind](keras, layer, keras_layer, a)
            kept.append((forward, against))
        loss = weight * loss_fn(tf.constant(case.targets), a)

    def array(t):
        return None if t is None else np.array(t)

    trace = []
    for layer, (forward, against) in zip(case.layers, kept, strict=True):
        found = LayerTrace()
        for field, value in forward.items():
            setattr(found, field, array(value))
        for field, x in against.items():
            setattr(found, field, None if x is None else array(tape.gradient(loss, x)))
        if layer.kind in ("batch_norm", "layer_norm") and found.dA is not None:
            found.dxhat = found.dA * np.asarray(layer.gamma)
        trace.append(found)
    del tape
    return trace
