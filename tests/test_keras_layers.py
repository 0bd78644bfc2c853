"""The Keras engine's layer types and losses (SPEC sections 8 and 9), held against the NumPy reference
engine: deltas (batch norm's moving statistics included), the loss before each step and the optimizer's
state, under each case's tolerance, in float32 and float64; the per-layer trace in the reference's
layout; the trace pass leaving the model as the step left it; and the compiled-model cache keyed by
every field that changes the built model.

Keras computes Adam with epsilon on the uncorrected v (a known difference, pinned by a canary): the
cases stepped with Adam are held against the NumPy engine replaying Keras's formula
(:mod:`manualprop.reference.variants`), which differs from the SPEC in the optimizer only.
"""

import numpy as np
import pytest

from manualprop.casefile.case import Case, parse_case
from manualprop.engines import StepResult
from manualprop.reference import variants
from manualprop.reference.engine import NumpyEngine
from manualprop.reference.layers import padding_of
from manualprop.verdict.compare import compare

pytest.importorskip("keras")

IMAGES_TO_TWO = "  - {type: flatten}\n  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}\n"

# One small network per layer type or loss; the architectures are few because each builds and traces a model.
CASES = {
    # kernel 3x2, strides 2: 7x6 -> 3x3
    "conv2d-valid": """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [3, 7, 6, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 3, kernel_size: [3, 2], strides: 2, padding: valid, activation: tanh,
     kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
"""
    + IMAGES_TO_TWO,
    # 7x6, kernel 4x3, strides 2: out 4x3, total padding 3 rows and 1 column, the odd one at the bottom / right
    "conv2d-same": """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 7, 6, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 2, kernel_size: [4, 3], strides: 2, padding: same, activation: relu,
     kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
"""
    + IMAGES_TO_TWO,
    "max_pool2d": """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 7, 8, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 2, kernel_size: 2, activation: tanh, kernel: {random: normal, std: 0.5}}
  - {type: max_pool2d, pool_size: [2, 3], strides: [1, 2]}
"""
    + IMAGES_TO_TWO,
    "avg_pool2d": """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 8, 7, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 2, kernel_size: 2, activation: tanh, kernel: {random: normal, std: 0.5}}
  - {type: avg_pool2d, pool_size: 3, strides: 2}
"""
    + IMAGES_TO_TWO,
    # the layers before a batch norm have no bias: its gradient is zero, and Adam would scale rounding noise up
    "batch_norm-features": """
loss: mse
lr: 0.05
optimizer: {name: adam, epsilon: 1.0e-8}
steps: 3
inputs: {random: normal, shape: [5, 4]}
targets: {random: normal}
layers:
  - {units: 3, activation: tanh, kernel: {random: normal, std: 0.5}, bias: false}
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.8, gamma: {random: normal, mean: 1, std: 0.2},
     beta: {random: normal, std: 0.1}, moving_mean: {random: normal, std: 0.1}, moving_variance: {random: uniform, low: 0.5, high: 1.5}}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    "batch_norm-images": """
loss: mse
lr: 0.05
optimizer: {name: adam, epsilon: 1.0e-8}
steps: 3
inputs: {random: normal, shape: [3, 4, 4, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 3, kernel_size: 3, padding: same, kernel: {random: normal, std: 0.5}, bias: false}
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.9, gamma: {random: normal, mean: 1, std: 0.2},
     beta: {random: normal, std: 0.1}, moving_mean: {random: normal, std: 0.1}, moving_variance: {random: uniform, low: 0.5, high: 1.5}}
"""
    + IMAGES_TO_TWO,
    # SGD's weight decay reaches gamma and beta; the momentum state lines up with the trainable parameters
    "batch_norm-sgd": """
loss: mse
lr: 0.1
optimizer: {name: sgd, momentum: 0.9, weight_decay: 0.1}
steps: 2
inputs: {random: normal, shape: [4, 3]}
targets: {random: normal}
layers:
  - {type: batch_norm, epsilon: 1.0e-2, momentum: 0.5, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}}
  - {units: 2, activation: tanh, kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
""",
    "layer_norm-features": """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [3, 5]}
targets: {random: normal}
layers:
  - {units: 4, activation: tanh, kernel: {random: normal, std: 0.5}}
  - {type: layer_norm, epsilon: 1.0e-3, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    "layer_norm-images": """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 3, 4, 3]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 3, kernel_size: 2, padding: same, activation: tanh, kernel: {random: normal, std: 0.5}}
  - {type: layer_norm, epsilon: 1.0e-5, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}}
"""
    + IMAGES_TO_TWO,
    # sample 0's first logit is 30, target 0: on the logits its term is 30; from the sigmoid's output
    # (1 in float32), clipped, it would be -log(1e-7) = 16.1 with a zero gradient
    "binary_crossentropy": """
loss: {name: bce, reduction: sum}
lr: 0.1
inputs: [[3.0, 0.0, 1.0], [0.5, -1.0, 0.2], [-0.3, 0.8, -1.2]]
targets: [[0.0, 1.0], [1.0, 0.3], [0.6, 0.0]]
layers:
  - {units: 2, activation: sigmoid, kernel: [[10.0, 0.5], [0.2, -1.0], [0.0, 0.7]], bias: [0.0, 0.1]}
""",
    "sparse_categorical_crossentropy": """
loss: scce
lr: 0.1
inputs: {random: normal, shape: [4, 3]}
targets: [2, 0, 1, 2]
layers:
  - {units: 4, activation: tanh, kernel: {random: normal, std: 0.5}}
  - {units: 3, activation: softmax, kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
""",
    "huber": """
loss: {name: huber, delta: 0.5, reduction: sum}
lr: 0.1
inputs: {random: normal, shape: [4, 3]}
targets: {random: normal}
layers:
  - {units: 3, activation: linear, kernel: {random: normal, std: 1}, bias: {random: normal, std: 0.1}}
""",
}


def make(name: str, dtype: str, text: str | None = None) -> Case:
    return parse_case(f"dtype: {dtype}\nseed: 3\n" + (text or CASES[name]), f"{name}.yaml")


@pytest.fixture(scope="module")
def keras():
    from manualprop import engines

    engine = engines.get("keras")
    reason = engine.unavailable()
    if reason:
        pytest.skip(reason)
    return engine


def reference(case: Case) -> StepResult:
    """The NumPy engine; with Keras's own update where no setting gives the SPEC's (Adam's epsilon)."""
    found = [v for v in variants.of(case) if v.optimizer != "sgd"]  # SGD's decay is given as an L2 penalty
    return found[0].replay(case) if found else NumpyEngine().step(case)


def differences(case: Case, mine: StepResult, spec: StepResult) -> list[str]:
    """Every parameter and state after the last step and in each step, each loss, and the optimizer's
    state, that does not hold under the case's tolerance."""
    params = case.parameters()

    def deltas(where: str, a: dict, b: dict) -> list[str]:
        assert a.keys() == b.keys() == params.keys()
        return [
            f"{where}{x.message}"
            for n, p in params.items()
            if not (x := compare(n, "keras", a[n], "numpy", b[n], case.rtol, case.atol, reference=p)).ok
        ]

    problems = deltas("", mine.deltas, spec.deltas)
    assert len(mine.history) == len(spec.history) == case.steps
    for t, (a, b) in enumerate(zip(mine.history, spec.history, strict=True), 1):
        problems += deltas(f"step {t}: ", a.deltas, b.deltas)
        loss = compare("loss", "keras", np.array(a.loss), "numpy", np.array(b.loss), case.rtol, case.atol)
        problems += [] if loss.ok else [f"step {t}: {loss.message}"]
        assert a.state.keys() == b.state.keys(), (a.state.keys(), b.state.keys())
        for n, state in a.state.items():
            problems += [
                f"step {t} {n} {k}: {x.message}"
                for k, v in state.items()
                if not (x := compare(f"{n}.{k}", "keras", v, "numpy", b.state[n][k], case.rtol, case.atol)).ok
            ]
    return problems


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CASES))
def test_keras_steps_each_layer_type_and_loss_as_the_reference(keras, name, dtype):
    case = make(name, dtype)
    mine, spec = keras.step(case), reference(case)
    assert not differences(case, mine, spec)
    for n, delta in mine.deltas.items():
        assert delta.dtype == case.dtype, n
        assert np.abs(delta).max() > 0, n  # every parameter and statistic moves: the comparison means something


def test_the_cases_reach_what_they_are_here_for():
    """Same padding is odd in both directions; the Huber case meets both branches; bce's big logit is big."""
    (top, bottom), (left, right) = padding_of(make("conv2d-same", "float64").layers[0])
    assert bottom == top + 1 and right == left + 1
    huber = make("huber", "float64")
    error = np.abs(NumpyEngine().step(huber).trace[-1].A - huber.targets)
    assert (error <= 0.5).any() and (error > 0.5).any()
    bce = make("binary_crossentropy", "float32")
    assert NumpyEngine().step(bce).trace[-1].Z.max() >= 30


def test_batch_norm_moving_statistics_are_reported_and_never_given_to_the_optimizer(keras):
    case = make("batch_norm-sgd", "float64")
    result = keras.step(case)
    assert {"layers.0.moving_mean", "layers.0.moving_variance"} <= result.deltas.keys()
    assert set(result.history[-1].state) == {"layers.0.gamma", "layers.0.beta", "layers.1.kernel", "layers.1.bias"}
    # the change of the moving statistics in the first step, from the batch's mean and biased variance
    x, m = case.inputs, case.layers[0].momentum
    np.testing.assert_allclose(result.history[0].deltas["layers.0.moving_mean"], (1 - m) * (x.mean(axis=0) - 0), rtol=1e-12)
    np.testing.assert_allclose(result.history[0].deltas["layers.0.moving_variance"], (1 - m) * (x.var(axis=0) - 1), rtol=1e-12)


TRACED = ["conv2d-valid", "conv2d-same", "max_pool2d", "avg_pool2d", "batch_norm-images", "layer_norm-images"]
FIELDS = ("Z", "A", "dA", "dZ", "dW", "db", "mean", "var", "xhat", "dxhat", "dgamma", "dbeta")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", TRACED)
def test_the_trace_is_the_references_field_by_field(keras, name, dtype):
    """Every field the reference fills, in its layout, filled by Keras and equal within tolerance."""
    case = make(name, dtype)
    mine, spec = keras.step(case).trace, NumpyEngine().step(case).trace
    assert len(mine) == len(spec) == len(case.layers)
    for i, (a, b) in enumerate(zip(mine, spec, strict=True)):
        for field in FIELDS:
            expected = getattr(b, field)
            found = getattr(a, field)
            assert (found is None) == (expected is None), (i, field)
            if expected is not None:
                assert found.shape == expected.shape, (i, field, found.shape, expected.shape)
                x = compare(field, "keras", found, "numpy", expected, case.rtol, case.atol)
                assert x.ok, (i, x.message)


def test_reading_the_trace_leaves_the_model_as_the_step_left_it(keras):
    """The trace pass loads the parameters of the step it traces and calls batch norm in training
    mode (which moves its statistics): every value is put back after it."""
    from manualprop.adapters import keras_engine

    case = make("batch_norm-features", "float64")
    result = keras.step(case)
    layers = keras.compiled(keras_engine._import_keras(), case).layers  # the model the step ran
    after = keras_engine._parameters(case, layers)
    for record in result.history:
        assert record.trace  # computed now, on the parameters each step started from
    held = keras_engine._parameters(case, layers)
    assert held.keys() == after.keys()
    for name in after:
        np.testing.assert_array_equal(held[name], after[name], err_msg=name)
    spec = reference(case)
    for t, (a, b) in enumerate(zip(result.history, spec.history, strict=True)):
        for field in ("mean", "var", "dgamma"):  # each step's own statistics and gradients
            x = compare(field, "keras", getattr(a.trace[1], field), "numpy", getattr(b.trace[1], field), case.rtol, case.atol)
            assert x.ok, (t, x.message)


# Cases that differ from a base case in one field that changes the built model, the sample's shape
# and each layer's shapes kept: a cache key without it would serve the wrong model.
ONE_FIELD = [
    ("huber", "delta: 0.5", "delta: 2.0"),
    ("batch_norm-sgd", "momentum: 0.5", "momentum: 0.9"),
    ("batch_norm-sgd", "epsilon: 1.0e-2", "epsilon: 0.5"),
]
POOL = """
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 5, 5, 1]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 1, kernel_size: 1, activation: tanh, kernel: [[[[0.7]]]]}
  - {type: max_pool2d, pool_size: 2, strides: 2}
"""


def test_every_field_that_changes_the_model_is_in_its_cache_key(keras):
    from manualprop.adapters.keras_engine import KerasEngine

    pairs = [(CASES[name], CASES[name].replace(old, new)) for name, old, new in ONE_FIELD]
    pairs.append((POOL + IMAGES_TO_TWO, POOL.replace("strides: 2", "strides: 3") + IMAGES_TO_TWO))  # both 2x2 out
    engine = KerasEngine()
    for first, second in pairs:
        assert first != second
        a, b = make("first", "float64", first), make("second", "float64", second)
        assert a.layers[-1].in_shape == b.layers[-1].in_shape
        assert not differences(a, engine.step(a), reference(a))
        built = len(engine.models)
        assert not differences(b, engine.step(b), reference(b))
        assert len(engine.models) == built + 1  # a model of its own
        assert any(not np.allclose(engine.step(a).deltas[n], engine.step(b).deltas[n]) for n in a.parameters())
