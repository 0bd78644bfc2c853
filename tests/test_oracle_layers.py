"""The oracle on the layer kinds and losses of SPEC sections 8 and 9, against the NumPy reference and
against numbers worked out by hand.

The oracle (``numeric``) writes conv2d, the pools, flatten, the norms and the new losses from the
definitions in MPFR and takes every gradient by central differences; the NumPy reference writes
the backward passes by hand (im2col, the batch-norm formula). Agreeing on every delta, every
moving statistic and every trace field checks both. The hand-worked cases check them against
neither: a convolution's orientation, TensorFlow's "same" padding, batch_norm's statistics and
moving averages, and each loss's value and slope.
"""

import ast
from pathlib import Path

import numpy as np
import pytest

import manualprop.oracle
from manualprop import concepts, harness, parse_case
from manualprop.engines import LayerTrace
from manualprop.oracle import NumericEngine, cost
from manualprop.reference.engine import NumpyEngine
from manualprop.verdict.compare import compare, tolerated

CASES = {
    "conv-valid-max-pool-scce": """
loss: scce
inputs: {random: normal, shape: [2, 5, 5, 2]}
targets: {random: classes}
layers:
  - {type: conv2d, filters: 3, kernel_size: 3, activation: tanh, bias: {random: normal, std: 0.1}}
  - {type: max_pool2d, pool_size: 2}
  - {type: flatten}
  - {units: 3, activation: softmax, bias: {random: normal, std: 0.1}}
""",
    "conv-same-strided-avg-pool-bce": """
loss: bce
inputs: {random: normal, shape: [2, 5, 6, 1]}
targets: {random: uniform, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 2, kernel_size: [2, 3], strides: 2, padding: same, activation: sigmoid, bias: {random: normal}}
  - {type: avg_pool2d, pool_size: 2, strides: 1}
  - {type: flatten}
  - {units: 2, activation: sigmoid}
""",
    "batch-norm-features-adam": """
loss: mse
inputs: {random: normal, shape: [4, 3]}
targets: {random: normal, shape: [4, 2]}
layers:
  - {units: 4, activation: tanh, bias: {random: normal, std: 0.1}}
  - type: batch_norm
    epsilon: 1.0e-3
    momentum: 0.9
    gamma: {random: uniform, low: 0.5, high: 1.5}
    beta: {random: normal, std: 0.2}
    moving_mean: {random: normal}
    moving_variance: {random: uniform, low: 0.5, high: 2}
  - {units: 2, activation: linear}
optimizer: {name: adam, epsilon: 1.0e-8}
steps: 3
""",
    "batch-norm-images-huber": """
loss: {name: huber, delta: 0.5}
inputs: {random: normal, shape: [3, 3, 3, 1]}
targets: {random: normal, shape: [3, 2], std: 2}
layers:
  - {type: conv2d, filters: 2, kernel_size: 2, activation: tanh}
  - {type: batch_norm, epsilon: 1.0e-2, momentum: 0.8, gamma: {random: uniform, low: 0.5, high: 1.5}}
  - {type: flatten}
  - {units: 2, activation: linear}
optimizer: {name: sgd, momentum: 0.9}
steps: 2
""",
    "layer-norm-features-cce": """
loss: cce
inputs: {random: normal, shape: [3, 4]}
targets: {random: one_hot, shape: [3, 3]}
layers:
  - {units: 5, activation: tanh}
  - {type: layer_norm, epsilon: 1.0e-5, gamma: {random: uniform, low: 0.5, high: 1.5}, beta: {random: normal, std: 0.2}}
  - {units: 3, activation: softmax}
""",
    "layer-norm-images-mse": """
loss: mse
inputs: {random: normal, shape: [2, 4, 4, 1]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: 2, activation: tanh}
  - {type: layer_norm, epsilon: 1.0e-3, gamma: {random: uniform, low: 0.5, high: 1.5}}
  - {type: avg_pool2d, pool_size: 3}
  - {type: flatten}
  - {units: 2, activation: tanh}
""",
}

# What each kind's trace holds (the design note's list): the oracle fills every one.
FIELDS = {
    "dense": ("Z", "A", "dA", "dZ", "dW", "db"),
    "conv2d": ("Z", "A", "dA", "dZ", "dW", "db"),
    "max_pool2d": ("A", "dA"),
    "avg_pool2d": ("A", "dA"),
    "flatten": ("A", "dA"),
    "batch_norm": ("mean", "var", "xhat", "A", "dA", "dxhat", "dgamma", "dbeta"),
    "layer_norm": ("mean", "var", "xhat", "A", "dA", "dxhat", "dgamma", "dbeta"),
}


def _case(name: str):
    return parse_case(f"dtype: float64\nseed: 11\nlr: 0.1\n{CASES[name]}", f"{name}.yaml")


@pytest.fixture(scope="module")
def runs():
    return {name: (case, NumericEngine().step(case), NumpyEngine().step(case)) for name in CASES for case in [_case(name)]}


def test_the_cases_cover_every_layer_kind_and_new_loss():
    cases = [_case(name) for name in CASES]
    assert {layer.kind for case in cases for layer in case.layers} == set(concepts.LAYER_TYPES)
    assert {case.loss for case in cases} >= {"binary_crossentropy", "sparse_categorical_crossentropy", "huber"}
    same = cases[1].layers[0]  # 5 rows, stride 2, window 2: padding 1, at the bottom; 6 columns, window 3: 1, at the right
    assert (same.padding, same.out_shape) == ("same", (3, 3, 2))


def _agree(case, name, mine, theirs, allowance, before=None):
    c = compare(name, "numeric", mine, "numpy", theirs, case.rtol, case.atol, reference=before, allowance=allowance)
    assert c.ok, c.message


@pytest.mark.parametrize("name", CASES)
def test_the_deltas_agree_with_the_numpy_reference(runs, name):
    case, oracle, reference = runs[name]
    assert list(oracle.deltas) == list(case.parameters())
    for param, before in case.parameters().items():
        _agree(case, param, oracle.deltas[param], reference.deltas[param], oracle.uncertainty[param], before)
        # the uncertainty is no excuse: far inside the float64 tolerance, and stated
        allowed = tolerated(case.rtol, case.atol, oracle.deltas[param], before)
        assert np.all(oracle.uncertainty[param] > 0) and np.all(oracle.uncertainty[param] <= 0.01 * allowed), param
    for t, (mine, theirs) in enumerate(zip(oracle.history, reference.history, strict=True), start=1):
        assert mine.loss == pytest.approx(theirs.loss, rel=1e-12), f"step {t}"
        for param, before in case.parameters().items():
            _agree(case, f"{param} at step {t}", mine.deltas[param], theirs.deltas[param], 2 * oracle.uncertainty[param], before)


@pytest.mark.parametrize("name", CASES)
def test_the_trace_agrees_with_the_numpy_reference(runs, name):
    case, oracle, reference = runs[name]
    assert oracle.trace_error is None
    last = len(case.layers) - 1
    for i, (layer, mine, theirs) in enumerate(zip(case.layers, oracle.trace, reference.trace, strict=True)):
        for field in FIELDS[layer.kind]:
            if field == "dA" and i == last and concepts.LOSSES[case.loss].on_logits:
                continue  # on the logits: the loss gradient starts at dZ
            if field == "db" and layer.bias is None:
                continue
            value, expected = getattr(mine, field), getattr(theirs, field)
            assert value is not None, f"layer {i} ({layer.kind}): the oracle has no {field}"
            allowance = mine.uncertainty[field]
            _agree(case, f"layer {i} {field}", value, expected, allowance)
            assert np.all(allowance <= 0.01 * tolerated(case.rtol, case.atol, value)), f"layer {i} {field}"


def test_below_a_batch_norm_the_samples_are_coupled(runs, monkeypatch):
    """dL/dA of the layer under a batch_norm: a sample's A moves every sample's output through the
    batch statistics, so the whole batch's loss is differenced. Taken sample by sample (as if no
    batch_norm lay above), the same trace would disagree with the reference."""
    case, oracle, reference = runs["batch-norm-features-adam"]
    _agree(case, "dA", oracle.trace[0].dA, reference.trace[0].dA, oracle.trace[0].uncertainty["dA"])
    apart = NumericEngine().step(case)
    monkeypatch.setattr(manualprop.oracle, "Norm", type("NoNorm", (), {}))  # no layer above counts as coupling
    c = compare("dA", "numeric", apart.trace[0].dA, "numpy", reference.trace[0].dA, case.rtol, case.atol)
    assert not c.ok and c.max_abs_diff > 1e-3


def test_moving_statistics_are_state_not_trained(runs):
    case, oracle, _ = runs["batch-norm-features-adam"]
    for record in oracle.history:
        assert set(record.state) == {name for name in case.parameters() if case.trainable(name)}
    assert "layers.1.moving_mean" in oracle.deltas and "layers.1.moving_variance" in oracle.deltas


# --- worked by hand, through no engine but the oracle ----------------------------------------


def _hand(text: str, name: str):
    return parse_case("dtype: float64\n" + text, f"{name}.yaml")


def test_a_valid_convolution_by_hand():
    """X (3x3, one channel), K = [[1, 0], [0, -1]]: Z[y, x] = X[y, x] - X[y + 1, x + 1], a
    cross-correlation. Z = [[0, -1], [-1, 0]] against T = [[1, 0], [0, 1]]: e = -1 everywhere,
    dL/dZ = 2 e / 4 = -1/2, dK[i, j] = -1/2 sum_(y, x) X[y + i, x + j] = [[-2, -3], [-2, -3]],
    db = -2; L = 1. SGD with lr 0.1: the deltas are -0.1 times those."""
    case = _hand(
        """
loss: mse
lr: 0.1
inputs: [[[[1], [2], [0]], [[0], [1], [3]], [[2], [1], [1]]]]
targets: [[1, 0, 0, 1]]
layers:
  - {type: conv2d, filters: 1, kernel_size: 2, activation: linear, kernel: [[[[1]], [[0]]], [[[0]], [[-1]]]], bias: [0]}
  - {type: flatten}
""",
        "conv-by-hand",
    )
    result = NumericEngine().step(case)
    assert result.loss == pytest.approx(1.0, rel=1e-15)
    np.testing.assert_allclose(result.trace[0].Z[0, :, :, 0], [[0, -1], [-1, 0]], atol=1e-15)
    np.testing.assert_allclose(result.deltas["layers.0.kernel"][:, :, 0, 0], [[0.2, 0.3], [0.2, 0.3]], rtol=1e-14)
    np.testing.assert_allclose(result.deltas["layers.0.bias"], [0.2], rtol=1e-14)
    np.testing.assert_allclose(result.trace[0].dW[:, :, 0, 0], [[-2, -3], [-2, -3]], rtol=1e-14)


def test_same_padding_puts_the_odd_row_and_column_at_the_bottom_and_right():
    """X 2x2, a 2x2 kernel, "same", stride 1: one row and one column of zeros, after the data
    (TensorFlow's rule). With K = [[1, 2], [4, 8]]: Z[0, 0] = X00 + 2 X01 + 4 X10 + 8 X11,
    Z[0, 1] = X01 + 4 X11, Z[1, 0] = X10 + 2 X11, Z[1, 1] = X11. Padding at the top and left would
    give Z[1, 1] = X00 + 2 X01 + 4 X10 + 8 X11 instead."""
    case = _hand(
        """
loss: mse
lr: 0.1
inputs: [[[[1], [10]], [[100], [1000]]]]
targets: [[0, 0, 0, 0]]
layers:
  - {type: conv2d, filters: 1, kernel_size: 2, padding: same, activation: linear, kernel: [[[[1]], [[2]]], [[[4]], [[8]]]], bias: false}
  - {type: flatten}
""",
        "same-by-hand",
    )
    z = NumericEngine().step(case).trace[0].Z[0, :, :, 0]
    np.testing.assert_array_equal(z, [[1 + 20 + 400 + 8000, 10 + 4000], [100 + 2000, 1000]])


BATCH_NORM_BY_HAND = """
loss: mse
lr: 0.1
inputs: [[1], [5]]
targets: [[0], [1]]
layers:
  - {type: batch_norm, epsilon: 0.41, momentum: 0.9, moving_mean: [0], moving_variance: [1]}
  - {units: 1, activation: linear, kernel: [[1]], bias: false}
"""


def test_batch_norm_by_hand():
    """x = (1, 5): mean 3, biased variance 4, sqrt(4 + 0.41) = 2.1, xhat = -+20/21; gamma 1, beta 0
    and a unit kernel: y = xhat. L = ((20/21)^2 + (20/21 - 1)^2) / 2; dL/dy = y - t, so
    dgamma = sum (y - t) xhat = 2 (20/21)^2 - 20/21 = 380/441, dbeta = sum (y - t) = -1.
    Moving statistics: 0.9 * 0 + 0.1 * 3 and 0.9 * 1 + 0.1 * 4: both move by 0.3."""
    result = NumericEngine().step(_hand(BATCH_NORM_BY_HAND, "bn-by-hand"))
    xhat = 20 / 21
    assert result.loss == pytest.approx((xhat**2 + (xhat - 1) ** 2) / 2, rel=1e-14)
    trace = result.trace[0]
    np.testing.assert_allclose([trace.mean[0], trace.var[0]], [3, 4], rtol=1e-15)
    np.testing.assert_allclose(trace.xhat[:, 0], [-xhat, xhat], rtol=1e-15)
    np.testing.assert_allclose(result.deltas["layers.0.gamma"], [-0.1 * 380 / 441], rtol=1e-14)
    np.testing.assert_allclose(result.deltas["layers.0.beta"], [0.1], rtol=1e-14)
    np.testing.assert_allclose(result.deltas["layers.0.moving_mean"], [0.3], rtol=1e-15)
    np.testing.assert_allclose(result.deltas["layers.0.moving_variance"], [0.3], rtol=1e-14)


def test_the_optimizer_leaves_the_moving_statistics_alone():
    """AdamW's weight decay would move anything it updates; the moving statistics still move by
    exactly momentum's share of the batch statistics, 0.3 each, whatever the optimizer."""
    text = BATCH_NORM_BY_HAND + "optimizer: {name: adamw, epsilon: 1.0e-8, weight_decay: 0.5}\n"
    result = NumericEngine().step(_hand(text.replace("lr: 0.1", "lr: 0.4"), "bn-adamw"))
    np.testing.assert_allclose(result.deltas["layers.0.moving_mean"], [0.3], rtol=1e-15)
    np.testing.assert_allclose(result.deltas["layers.0.moving_variance"], [0.3], rtol=1e-14)
    assert set(result.history[0].state) == {"layers.0.gamma", "layers.0.beta", "layers.1.kernel"}


# One sample, one input x = 2, one layer: the loss and dL/dW worked out by hand.
LOSSES_BY_HAND = {
    # z = 0: L = log 2, dL/dz = sigmoid(0) - t = -1/2, dW = x dL/dz = -1
    "bce": ("loss: bce\ntargets: [[1]]", "{units: 1, activation: sigmoid, kernel: [[0]], bias: false}", np.log(2), [[-1.0]]),
    # equal logits: L = log 3, dL/dz = 1/3 - onehot(2), dW = 2 dL/dz
    "scce": (
        "loss: scce\ntargets: [2]",
        "{units: 3, activation: softmax, kernel: [[0, 0, 0]], bias: false}",
        np.log(3),
        [[2 / 3, 2 / 3, -4 / 3]],
    ),
    # y = 3, e = 2 > delta: L = 0.5 (2 - 0.25), dL/dy = delta = 0.5, dW = 1
    "huber-linear-part": (
        "loss: {name: huber, delta: 0.5}\ntargets: [[1]]",
        "{units: 1, activation: linear, kernel: [[1.5]], bias: false}",
        0.875,
        [[1.0]],
    ),
    # y = 1.25, e = 0.25 <= delta: L = e^2 / 2, dL/dy = e, dW = 0.5
    "huber-square-part": (
        "loss: {name: huber, delta: 0.5}\ntargets: [[1]]",
        "{units: 1, activation: linear, kernel: [[0.625]], bias: false}",
        0.03125,
        [[0.5]],
    ),
}


@pytest.mark.parametrize("name", LOSSES_BY_HAND)
def test_each_new_loss_by_hand(name):
    loss, layer, value, d_w = LOSSES_BY_HAND[name]
    case = _hand(f"{loss}\nlr: 0.1\ninputs: [[2]]\nlayers:\n  - {layer}\n", name)
    result = NumericEngine().step(case)
    assert result.loss == pytest.approx(value, rel=1e-15)
    np.testing.assert_allclose(result.trace[0].dW, d_w, rtol=1e-15)
    np.testing.assert_allclose(result.deltas["layers.0.kernel"], -0.1 * np.array(d_w), rtol=1e-14)


# --- what the oracle refuses, and what it imports ------------------------------------------


def test_a_case_too_large_is_refused_with_the_reason_before_any_work():
    case = parse_case(
        """
loss: scce
lr: 0.1
inputs: {random: normal, shape: [32, 28, 28, 1]}
targets: {random: classes}
layers:
  - {type: conv2d, filters: 8, kernel_size: 3, activation: relu}
  - {type: flatten}
  - {units: 10, activation: softmax}
""",
        "mnist-sized.yaml",
    )
    assert cost.step_seconds(case) > 10 * cost.LIMIT_SECONDS
    with pytest.raises(cost.TooLarge, match=r"too large for the oracle: its step would take about \d+ s .* limit of 30 s"):
        NumericEngine().step(case)
    run = harness.run_engine(case, "numeric")
    assert run.status == "error" and "too large for the oracle" in run.reason


def test_a_large_trace_is_refused_and_the_step_still_stands(monkeypatch):
    case = _case("batch-norm-features-adam")
    monkeypatch.setattr(cost, "trace_seconds", lambda case: 10 * cost.LIMIT_SECONDS)
    result = NumericEngine().step(case)
    assert result.trace == [] and "too large for the oracle: its trace" in (result.trace_error or "")
    assert set(result.deltas) == set(case.parameters())


def test_the_oracle_imports_nothing_of_the_reference():
    """Its layers, losses and activations are its own: no module of manualprop.reference."""
    for path in Path(manualprop.oracle.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("reference" in name.split(".") for name in names), f"{path.name} imports {names}"


def test_every_trace_field_named_is_a_layer_trace_field():
    assert {f for fields in FIELDS.values() for f in fields} <= set(LayerTrace.__dataclass_fields__)
    assert set(FIELDS) == set(concepts.LAYER_TYPES)
