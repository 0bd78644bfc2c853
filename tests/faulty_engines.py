"""Deliberately faulty engines, each the NumPy engine with one classic slip.

tests/test_diagnose.py registers them through the ``manualprop.engines`` entry point, as a
third-party package would, and checks that the harness blames each one, at the right layer and
quantity, with the help of the finite-difference oracle.
"""

import dataclasses
from collections.abc import Mapping

import numpy as np

from manualprop.engines import StepResult
from manualprop.reference import activations, losses
from manualprop.reference.activations import Activation
from manualprop.reference.engine import NumpyEngine
from manualprop.reference.losses import Loss


class WrongTanhDerivative(NumpyEngine):
    """tanh'(z) written as 1 - a instead of 1 - a^2."""

    name = "wrong-derivative"
    tanh = activations.ACTIVATIONS["tanh"]
    activations: Mapping[str, Activation] = {
        **activations.ACTIVATIONS,
        "tanh": activations.elementwise(tanh.forward, lambda z, a, alpha: 1 - a),
    }


class DroppedOneOverN(NumpyEngine):
    """The MSE gradient without its 1/N: a per-sample mean slip."""

    name = "dropped-1/N"
    mse = losses.LOSSES["mse"]
    losses: Mapping[str, Loss] = {**losses.LOSSES, "mse": losses.Loss(mse.terms, lambda y, t: 2 * (y - t) * y.shape[0], False)}


class TransposedKernel(NumpyEngine):
    """Loads the first kernel transposed, (out, in) where (in, out) belongs."""

    name = "transposed-kernel"

    def step(self, case):
        first = dataclasses.replace(case.layers[0], kernel=np.ascontiguousarray(case.layers[0].kernel.T))
        return super().step(dataclasses.replace(case, layers=(first, *case.layers[1:])))


class SummedLoss(NumpyEngine):
    """Sums the loss where the case averages it."""

    name = "summed-loss"

    def step(self, case):
        return super().step(dataclasses.replace(case, reduction="sum"))


class FlippedUpdate(NumpyEngine):
    """p + lr * g instead of p - lr * g."""

    name = "flipped-update"

    def step(self, case):
        result = super().step(case)
        return StepResult(result.loss, {k: -v for k, v in result.deltas.items()}, result.trace)


class WrongLeakySlope(NumpyEngine):
    """Uses PyTorch's default slope 0.01 whatever the case says."""

    name = "wrong-leaky-slope"

    def step(self, case):
        layers = tuple(
            dataclasses.replace(layer, alpha=0.01) if layer.activation == "leaky_relu" else layer for layer in case.layers
        )
        return super().step(dataclasses.replace(case, layers=layers))


ALL = [WrongTanhDerivative, DroppedOneOverN, TransposedKernel, SummedLoss, FlippedUpdate, WrongLeakySlope]


class TransposedDeltas(NumpyEngine):
    """Computes right, but reports its kernels' deltas in the (out, in) layout."""

    name = "transposed-deltas"

    def step(self, case):
        result = super().step(case)
        deltas = {k: (v.T.copy() if k.endswith("kernel") else v) for k, v in result.deltas.items()}
        return StepResult(result.loss, deltas, result.trace)
