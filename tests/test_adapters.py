"""The framework adapters: layouts, conventions and availability, checked against the frameworks."""

import importlib.util

import numpy as np
import pytest

from manualprop import harness, parse_case
from manualprop.reference.engine import NumpyEngine

FRAMEWORKS = [
    pytest.param(n, marks=pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} is not installed"))
    for n, m in (("torch", "torch"), ("keras", "keras"))
]


def step(engine, text):
    from manualprop import engines

    return engines.get(engine).step(parse_case(text, "adapter.yaml"))


NON_SQUARE = """
dtype: float64
loss: mse
lr: 0.1
inputs: [[0.5, -1.0, 2.0]]
targets: [[1.0, 0.0]]
layers:
  - {units: 4, activation: tanh, LAYOUT, bias: [0.1, 0.2, 0.3, 0.4]}
  - {units: 2, activation: linear, kernel: [[1, 2], [3, 4], [5, 6], [7, 8]]}
"""
KERNEL = "kernel: [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [-0.1, -0.2, -0.3, -0.4]]"
WEIGHT = "weight: [[0.1, 0.5, -0.1], [0.2, 0.6, -0.2], [0.3, 0.7, -0.3], [0.4, 0.8, -0.4]]"


@pytest.mark.parametrize("engine", ["numpy", *FRAMEWORKS])
def test_kernels_are_reported_in_keras_layout_whatever_the_case_used(engine):
    from_kernel = step(engine, NON_SQUARE.replace("LAYOUT", KERNEL))
    from_weight = step(engine, NON_SQUARE.replace("LAYOUT", WEIGHT))
    assert from_kernel.deltas["layers.0.kernel"].shape == (3, 4)
    assert from_kernel.deltas["layers.1.kernel"].shape == (4, 2)
    for name, delta in from_kernel.deltas.items():
        np.testing.assert_array_equal(delta, from_weight.deltas[name])


@pytest.mark.parametrize("engine", FRAMEWORKS)
@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_leaky_slope_is_passed_explicitly(engine, alpha):
    case = f"""
loss: mse
lr: 1.0
inputs: [[-1.0]]
targets: [[1.0]]
layers:
  - {{units: 1, activation: {{name: leaky_relu, alpha: {alpha}}}, kernel: [[1.0]]}}
"""
    # z = -1, y = -alpha, dL/dy = 2 (y - 1), dy/dz = alpha, dL/dw = 2 (-alpha - 1) alpha * x (x = -1)
    expected = -1.0 * 2 * (-alpha - 1) * alpha * -1.0
    assert step(engine, case).deltas["layers.0.kernel"][0, 0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("engine", FRAMEWORKS)
@pytest.mark.parametrize("loss", ["mse", "mae", "categorical_crossentropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_each_reduction_matches_the_spec(engine, loss, reduction):
    """The SPEC's mean and sum: over every element for MSE and MAE, over samples for cross-entropy."""
    text = f"""
dtype: float64
seed: 4
loss: {{name: {loss}, reduction: {reduction}, scale: 0.75}}
lr: 0.2
inputs: {{random: normal, shape: [5, 3]}}
targets: {{random: {"one_hot" if loss == "categorical_crossentropy" else "normal"}}}
layers:
  - {{units: 4, activation: sigmoid, init: glorot_normal}}
  - {{units: 3, activation: {"softmax" if loss == "categorical_crossentropy" else "linear"}, init: glorot_normal}}
"""
    case = parse_case(text, "reduction.yaml")
    result = harness.run_case(case, ["numpy", engine])
    assert result.ran == ["numpy", engine]
    assert all(c.ok for c in result.comparisons), [c.message for c in result.comparisons if not c.ok]


@pytest.mark.parametrize("engine", FRAMEWORKS)
def test_float64_runs_in_float64(engine):
    """float32 would disagree with the NumPy engine by about 1e-8, far beyond the float64 tolerance."""
    text = NON_SQUARE.replace("LAYOUT", KERNEL).replace("lr: 0.1", "lr: 0.123456789")
    result = step(engine, text)
    reference = NumpyEngine().step(parse_case(text, "adapter.yaml"))
    for name, delta in result.deltas.items():
        assert delta.dtype == np.float64
        np.testing.assert_allclose(delta, reference.deltas[name], rtol=1e-12, atol=1e-15)


def test_a_missing_framework_is_a_skip_with_the_install_command(monkeypatch):
    from manualprop.adapters.keras_engine import KerasEngine
    from manualprop.adapters.torch_engine import TorchEngine

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "keras", "tf_keras") else real(name, *a)
    )
    case = parse_case(NON_SQUARE.replace("LAYOUT", KERNEL), "adapter.yaml")
    for engine in (TorchEngine(), KerasEngine()):
        reason = engine.unavailable()
        assert reason and "is not installed" in reason and "pip install" in reason
    result = harness.run_case(case)
    assert result.runs["torch"].status == "skipped" and result.runs["keras"].status == "skipped"
    assert result.runs["numpy"].status == "ran" and result.ok


@pytest.mark.parametrize("engine", FRAMEWORKS)
def test_a_reused_model_gives_bit_identical_deltas_to_a_fresh_one(engine):
    from manualprop.adapters.keras_engine import KerasEngine
    from manualprop.adapters.torch_engine import TorchEngine

    Engine = {"keras": KerasEngine, "torch": TorchEngine}[engine]
    first = NON_SQUARE.replace("LAYOUT", KERNEL)
    other = (
        first.replace("lr: 0.1", "lr: 0.37")
        .replace("[1, 2], [3, 4]", "[-1, 2.5], [3, -4]")
        .replace("0.5, -1.0, 2.0", "1.5, 1.0, -2.0")
    )
    for dtype in ("float32", "float64"):
        a, b = (parse_case(text.replace("dtype: float64", f"dtype: {dtype}"), "reuse.yaml") for text in (first, other))
        reused = Engine()
        before = reused.step(a)
        reused.step(b)  # the same architecture: the same model, other weights and learning rate
        again = reused.step(a)
        fresh = Engine().step(a)
        assert len(reused.models) == 1
        for name in before.deltas:
            assert before.deltas[name].dtype == np.dtype(dtype)
            assert before.deltas[name].tobytes() == again.deltas[name].tobytes() == fresh.deltas[name].tobytes(), name
        assert before.loss == again.loss == fresh.loss


@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
def test_a_float64_model_after_a_float32_one_is_float64():
    from manualprop.adapters.keras_engine import KerasEngine

    text = NON_SQUARE.replace("LAYOUT", KERNEL).replace("lr: 0.1", "lr: 0.123456789")
    engine = KerasEngine()
    engine.step(parse_case(text.replace("dtype: float64", "dtype: float32"), "f32.yaml"))
    case = parse_case(text, "f64.yaml")
    result, reference = engine.step(case), NumpyEngine().step(case)
    for name, delta in result.deltas.items():
        np.testing.assert_allclose(delta, reference.deltas[name], rtol=1e-12, atol=1e-15)
    assert result.trace and result.trace[0].Z.dtype == np.float64  # the second pass, on request
