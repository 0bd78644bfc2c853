"""The seed notebooks' own slips, swapped into the NumPy engine, make the harness report a mismatch.

Each test first runs the case with the correct engine (it must pass, so the failure is the
slip's), then with the faulty function in the registry, against every installed framework.
"""

import importlib.util

import numpy as np
import pytest

from manualprop import harness, parse_case
from manualprop.reference import activations, losses

FRAMEWORKS = [name for name, module in (("torch", "torch"), ("keras", "keras")) if importlib.util.find_spec(module)]
pytestmark = pytest.mark.skipif(not FRAMEWORKS, reason='needs torch or keras as the reference (pip install "manualprop[torch]")')

RELU_CASE = """
dtype: float64
seed: 1
loss: mse
lr: 0.5
inputs: {random: uniform, shape: [8, 3], low: -1, high: 1}
targets: {random: normal}
layers:
  - {units: 5, activation: relu, init: he_normal, bias: {random: uniform, low: 0.1, high: 0.3}}
  - {units: 2, activation: linear, init: glorot_uniform}
"""

LEAKY_CASE = """
dtype: float32
seed: 2
loss: mse
lr: 0.5
inputs: {random: uniform, shape: [6, 2], low: -1, high: 1}
targets: {random: normal}
layers:
  - {units: 4, activation: {name: leaky_relu, alpha: 0.1}, kernel: {random: normal, std: 1}}
  - {units: 4, activation: {name: leaky_relu, alpha: 0.1}, kernel: {random: normal, std: 1}}
  - {units: 1, activation: {name: leaky_relu, alpha: 0.1}, kernel: {random: normal, std: 1}}
"""

MAE_CASE = """
dtype: float32
loss: mae
lr: 0.0001
inputs: [[32], [34], [36], [38], [40], [42], [44], [46], [48]]
targets: [[67], [71], [75], [79], [83], [87], [91], [95], [99]]
layers:
  - {units: 2, kernel: [[-0.29604465, -0.21134205]]}
  - {units: 2, kernel: [[-0.29604465, -0.21134205], [0.01063002, 1.5165398]]}
  - {units: 1, kernel: [[-0.29604465], [-0.21134205]]}
"""


def failing_params(case_text, engine):
    result = harness.run_case(parse_case(case_text, "slip.yaml"), ["numpy", engine])
    assert set(result.ran) == {"numpy", engine}, result.runs
    return {c.param for c in result.comparisons if not c.ok}


@pytest.mark.parametrize("engine", FRAMEWORKS)
def test_relu_derivative_written_as_max_0_y_is_caught(engine, monkeypatch):
    """Seed 002: derivative_relu returns np.maximum(0, y) instead of the step function."""
    assert failing_params(RELU_CASE, engine) == set()
    relu = activations.ACTIVATIONS["relu"]
    monkeypatch.setitem(
        activations.ACTIVATIONS, "relu", activations.elementwise(relu.forward, lambda z, a, alpha: np.maximum(0, a))
    )
    assert {"layers.0.kernel", "layers.0.bias"} <= failing_params(RELU_CASE, engine)


@pytest.mark.parametrize("engine", FRAMEWORKS)
def test_f_used_where_f_prime_belongs_is_caught(engine, monkeypatch):
    """Seed 003: the generic loop multiplies by f(y) where it needs f'(y)."""
    assert failing_params(LEAKY_CASE, engine) == set()
    leaky = activations.ACTIVATIONS["leaky_relu"]
    monkeypatch.setitem(
        activations.ACTIVATIONS, "leaky_relu", activations.elementwise(leaky.forward, lambda z, a, alpha: leaky.forward(z, alpha))
    )
    assert "layers.2.kernel" in failing_params(LEAKY_CASE, engine)


@pytest.mark.parametrize("engine", FRAMEWORKS)
def test_mse_gradient_under_mae_is_caught(engine, monkeypatch):
    """Seed 000: uses pred - true, the MSE gradient, while reporting MAE."""
    assert failing_params(MAE_CASE, engine) == set()
    mae, mse = losses.LOSSES["mae"], losses.LOSSES["mse"]
    monkeypatch.setitem(losses.LOSSES, "mae", losses.Loss(mae.terms, mse.grad, False))
    failing = failing_params(MAE_CASE, engine)
    assert {"layers.2.kernel", "layers.2.bias"} <= failing
    assert "loss" not in failing  # the loss itself is still MAE: only the gradient is wrong
