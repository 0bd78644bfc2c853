"""The Keras engine: a real ``keras.Sequential`` of ``Dense`` layers, compiled with
``keras.optimizers.SGD`` and a Keras loss, stepped through ``train_on_batch``, Keras's own
training path (measured bit-identical to ``fit`` for one batch).

Conventions pinned here:

* Dense kernels are (in, out) already: no transpose.
* float64 is set with ``keras.config.set_floatx`` for the run and restored after it; a layer
  dtype alone would leave the loss and the learning-rate variable in float32.
* Keras's MSE and MAE average over the outputs of each sample before the reduction over the
  batch. ``sum_over_batch_size`` is then the SPEC's mean over every element, but Keras's ``sum``
  is the SPEC's sum divided by the number of outputs: the loss weight makes up that factor.
  The case's ``scale`` is applied the same way, through ``compile(loss_weights=...)``.
* A ``Dense(activation="softmax")`` output remembers its logits, so ``categorical_crossentropy``
  is computed from the logits, as in PyTorch and the NumPy engine.
* leaky_relu gets the case's slope explicitly (Keras's default is 0.2; Keras 2's 0.3).
* ``jit_compile=False``: XLA may fuse and reorder the arithmetic.

Keras 2 runs too: the ``keras`` 2.x package that TensorFlow 2.15 and older install, or
``tf_keras`` when ``TF_USE_LEGACY_KERAS=1`` (as TensorFlow itself reads that variable). The two
APIs differ in two places this adapter touches, each handled in one function: where floatx is
set (:func:`_floatx`) and how leaky_relu takes its slope (:func:`_activation`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import importlib.util
import logging
import os
import re
import sys
import tempfile

import numpy as np

from manualprop.case import Case
from manualprop.engines import BuildCache, LayerTrace, StepResult

INSTALL = 'pip install "manualprop[tf]"'


def legacy_keras() -> bool:
    """True when TF_USE_LEGACY_KERAS asks for Keras 2 from the tf_keras package."""
    return os.environ.get("TF_USE_LEGACY_KERAS", "").strip().lower() in ("1", "true", "yes")


class KerasEngine:
    name = "keras"

    def unavailable(self) -> str | None:
        if legacy_keras():
            if importlib.util.find_spec("tf_keras") is None:
                return "TF_USE_LEGACY_KERAS=1 asks for Keras 2, but tf_keras is not installed (install it with: pip install \"manualprop[keras2]\")"
            return None
        if importlib.util.find_spec("keras") is None:
            return f"keras is not installed (install it with: {INSTALL})"
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        if importlib.util.find_spec(backend) is None:
            from .torch_engine import INSTALL as TORCH_INSTALL

            how = {"tensorflow": INSTALL, "torch": TORCH_INSTALL}.get(backend, f"pip install {backend}")
            return f"keras's backend {backend} is not installed (install it with: {how})"
        return None

    def __init__(self, cache_size: int = 64):
        self.models = BuildCache(cache_size)

    def step(self, case: Case) -> StepResult:
        keras = _import_keras()

        floatx, set_floatx = _floatx(keras)
        previous = floatx()
        set_floatx(case.dtype.name)
        try:
            return _step(keras, case, self.compiled(keras, case))
        finally:
            set_floatx(previous)

    def compiled(self, keras, case: Case) -> "_Compiled":
        """The compiled model for the case's architecture, dtype and loss: built once, then reused
        (its weights and learning rate are loaded for every step; plain SGD keeps no other state)."""
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
    # Each architecture gets its own model, so TensorFlow traces one step function per model and
    # warns that retracing is expensive: expected here, and the only message this filter drops.
    logging.getLogger("tensorflow").addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())
    return keras


def _floatx(keras):
    """(floatx, set_floatx): keras.config in Keras 3, keras.backend in Keras 2."""
    where = keras.config if hasattr(getattr(keras, "config", None), "set_floatx") else keras.backend
    return where.floatx, where.set_floatx


def _activation(keras, name: str, alpha: float):
    if name != "leaky_relu":
        return name
    if hasattr(keras.activations, "leaky_relu"):  # Keras 3
        return functools.partial(keras.activations.leaky_relu, negative_slope=alpha)
    return functools.partial(keras.activations.relu, alpha=alpha)  # Keras 2: relu's alpha is the negative slope


@dataclass
class _Compiled:
    model: object
    layers: list
    loss_fn: object
    weight: float


def _loss_weight(case: Case) -> float:
    """The case's scale, times the number of outputs where Keras's sum is the SPEC's sum / outputs."""
    per_sample_mean = case.loss in ("mse", "mae")
    return case.scale * (case.targets.shape[1] if per_sample_mean and case.reduction == "sum" else 1)


def _architecture(keras, case: Case) -> tuple:
    """What a compiled model depends on: everything but the weights, the data and the learning rate."""
    layers = tuple((l.units, l.activation, l.alpha, l.bias is not None) for l in case.layers)
    return (keras.__name__, case.dtype.name, case.inputs.shape[1], layers, case.loss, case.reduction, _loss_weight(case))


def _build(keras, case: Case) -> _Compiled:
    # The dtype is given to every layer as well as through floatx: Keras 3 caches its default dtype
    # policy on first use, so a float64 model built after a float32 one would otherwise be float32.
    dtype = case.dtype.name
    layers = [
        keras.layers.Dense(layer.units, activation=_activation(keras, layer.activation, layer.alpha),
                           use_bias=layer.bias is not None, dtype=dtype)
        for layer in case.layers
    ]
    model = keras.Sequential([keras.Input(shape=(case.inputs.shape[1],), dtype=dtype), *layers])
    loss_class = {
        "mse": keras.losses.MeanSquaredError,
        "mae": keras.losses.MeanAbsoluteError,
        "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
    }[case.loss]
    loss_fn = loss_class(reduction="sum_over_batch_size" if case.reduction == "mean" else "sum")
    weight = _loss_weight(case)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=case.lr),
        loss=loss_fn,
        loss_weights=[weight],
        jit_compile=False,
    )
    return _Compiled(model, layers, loss_fn, weight)


def _load(case: Case, layers: list) -> None:
    for layer, dense in zip(case.layers, layers):
        dense.set_weights([layer.kernel] if layer.bias is None else [layer.kernel, layer.bias])


def _step(keras, case: Case, compiled: _Compiled) -> StepResult:
    _load(case, compiled.layers)
    compiled.model.optimizer.learning_rate = case.lr
    loss = compiled.model.train_on_batch(case.inputs, case.targets)

    deltas = {}
    for i, (layer, dense) in enumerate(zip(case.layers, compiled.layers)):
        values = dense.get_weights()
        deltas[f"layers.{i}.kernel"] = np.asarray(values[0]) - layer.kernel
        if layer.bias is not None:
            deltas[f"layers.{i}.bias"] = np.asarray(values[1]) - layer.bias

    def trace() -> list[LayerTrace]:  # a second pass, only when a disagreement asks for it
        _load(case, compiled.layers)
        return _trace(case, compiled.layers, compiled.loss_fn, compiled.weight)

    return StepResult(loss=float(loss), deltas=deltas, trace_factory=trace)


def _variable(v):
    """The tf.Variable behind a Keras 3 variable (Keras 2's are tf.Variables already)."""
    return v.value if isinstance(getattr(type(v), "value", None), property) else v


def _trace(case: Case, layers: list, loss_fn, weight: float) -> list[LayerTrace]:
    """Per layer Z, A and their gradients, by a GradientTape pass over the same Dense layers and
    the same loss (TensorFlow backend only): Z = A_prev @ kernel + bias, A = layer.activation(Z)."""
    if "tensorflow" not in sys.modules or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return []
    import tensorflow as tf

    kernels = [_variable(d.kernel) for d in layers]
    biases = [_variable(d.bias) if d.use_bias else None for d in layers]
    with tf.GradientTape(persistent=True) as tape:
        a = tf.constant(case.inputs)
        zs, activations = [], []
        for dense, kernel, bias in zip(layers, kernels, biases):
            z = tf.matmul(a, kernel) if bias is None else tf.matmul(a, kernel) + bias
            a = dense.activation(z)
            zs.append(z)
            activations.append(a)
        loss = weight * loss_fn(tf.constant(case.targets), a)

    def array(t):
        return None if t is None else np.asarray(t)

    trace = []
    for z, a, kernel, bias in zip(zs, activations, kernels, biases):
        trace.append(LayerTrace(
            Z=array(z), A=array(a), dA=array(tape.gradient(loss, a)), dZ=array(tape.gradient(loss, z)),
            dW=array(tape.gradient(loss, kernel)), db=None if bias is None else array(tape.gradient(loss, bias)),
        ))
    del tape
    return trace
