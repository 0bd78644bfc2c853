"""The NumPy engine's whole step against finite differences of its forward pass and loss."""

import numpy as np
import pytest

from manualprop import parse_case
from manualprop.reference.engine import NumpyEngine, forward, loss_value

from finite_differences import gradient

NET = {
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "relu": "relu",
    "leaky": "{name: leaky_relu, alpha: 0.15}",
    "linear": "linear",
}


def make_case(
    hidden: str, loss: str, last: str = "linear", dtype: str = "float64", first_bias: str = "{random: normal, std: 0.1}"
) -> str:
    targets = "{random: one_hot}" if "categorical" in loss else "{random: normal}"
    return f"""
dtype: {dtype}
seed: 5
loss: {loss}
lr: 0.3
inputs: {{random: uniform, shape: [6, 3], low: -1, high: 1}}
targets: {targets}
layers:
  - {{units: 4, activation: {hidden}, init: glorot_normal, bias: {first_bias}}}
  - {{units: 3, activation: {hidden}, init: he_uniform, bias: {{random: normal, std: 0.1}}}}
  - {{units: 2, activation: {last}, init: glorot_uniform}}
"""


def check_against_finite_differences(case):
    result = NumpyEngine().step(case)
    params = case.parameters()
    for name, initial in params.items():

        def loss_at(value, name=name):
            layers = list(case.layers)
            i, kind = int(name.split(".")[1]), name.split(".")[2]
            layers[i] = layers[i].__class__(**{**layers[i].__dict__, kind: value})
            changed = case.__class__(**{**case.__dict__, "layers": tuple(layers)})
            return loss_value(changed, forward(changed))

        expected_delta = -case.lr * gradient(loss_at, initial)
        np.testing.assert_allclose(result.deltas[name], expected_delta, rtol=1e-5, atol=1e-9, err_msg=name)
    assert result.loss == pytest.approx(loss_value(case, forward(case)))


@pytest.mark.parametrize("hidden", sorted(NET))
@pytest.mark.parametrize("loss", ["mse", "mae", "{name: mse, reduction: sum, scale: 0.5}", "{name: mae, reduction: sum}"])
def test_step_matches_finite_differences_for_regression(hidden, loss):
    check_against_finite_differences(parse_case(make_case(NET[hidden], loss), "fd.yaml"))


@pytest.mark.parametrize("loss", ["categorical_crossentropy", "{name: cce, reduction: sum, scale: 2}"])
def test_step_matches_finite_differences_for_cross_entropy(loss):
    check_against_finite_differences(parse_case(make_case("tanh", loss, last="softmax"), "fd.yaml"))


def test_softmax_under_mse_matches_finite_differences():
    check_against_finite_differences(parse_case(make_case("sigmoid", "mse", last="softmax"), "fd.yaml"))


def test_a_layer_without_bias_has_no_bias_delta():
    case = parse_case(make_case("tanh", "mse", first_bias="false"), "fd.yaml")
    assert case.layers[0].bias is None
    result = NumpyEngine().step(case)
    assert "layers.0.bias" not in result.deltas
    check_against_finite_differences(case)


def test_seed_004_batch_example_printed_numbers():
    """The worked example printed by seed 004 (0.5 * MSELoss(reduction='sum'), lr 0.1)."""
    case = parse_case(
        """
loss: {name: mse, reduction: sum, scale: 0.5}
lr: 0.1
inputs: [[-1, 2], [-3, 4]]
targets: [[-6, 8], [-2, 4]]
layers:
  - {units: 2, weight: [[1, 0], [2, 3]], bias: [4, 0]}
  - {units: 2, weight: [[5, 0], [6, 7]], bias: [0, 8]}
""",
        "seed004.yaml",
    )
    result = NumpyEngine().step(case)
    assert result.loss == 2655.0
    np.testing.assert_allclose(result.trace[-1].A, [[15, 54], [5, 56]])
    np.testing.assert_allclose(result.deltas["layers.0.kernel"].T, [[142.2, -215.0], [141.4, -210.0]], atol=1e-4)
    np.testing.assert_allclose(result.deltas["layers.0.bias"], [-72.8, -68.6], atol=1e-4)
    np.testing.assert_allclose(result.deltas["layers.1.kernel"].T, [[-7.0, -12.6], [-19.0, -49.6]], atol=1e-4)
    np.testing.assert_allclose(result.deltas["layers.1.bias"], [-2.8, -9.8], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_step_runs_in_the_case_dtype(dtype):
    result = NumpyEngine().step(parse_case(make_case("tanh", "mse", dtype=dtype), "fd.yaml"))
    assert {d.dtype.name for d in result.deltas.values()} == {dtype}


def test_intermediates_are_kept_per_layer():
    case = parse_case(make_case("tanh", "mse"), "fd.yaml")
    trace = NumpyEngine().step(case).trace
    assert [t.Z.shape for t in trace] == [(6, 4), (6, 3), (6, 2)]
    for t, layer in zip(trace, case.layers, strict=True):
        assert t.dW.shape == layer.kernel.shape
        assert t.dZ.shape == t.Z.shape and t.dA.shape == t.A.shape
