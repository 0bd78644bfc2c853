"""The PyTorch adapter's layer kinds and losses (SPEC sections 8 and 9): real ``torch.nn`` modules,
run NCHW inside and reported in the case's layouts, checked against the NumPy reference engine
(engine against engine; the reference itself is checked against finite differences elsewhere).

Every delta and loss must agree within the case's tolerance under the project's one comparison
rule, except a batch norm's moving variance: PyTorch updates it with the unbiased batch variance,
which is checked here against the update written out from the reference's own (biased) variance."""

import numpy as np
import pytest

from manualprop import parse_case
from manualprop.reference.engine import NumpyEngine
from manualprop.verdict.compare import compare

pytest.importorskip("torch")

DTYPES = ["float32", "float64"]

# One small network per concern; {dtype} is filled in. Kernels are non-square with in != out, so a
# kernel read in the wrong layout would not even have the right shape; random inputs, so no ties in
# a max pool's window.
CASES = {
    # 6x7 input, 3x2 kernel, valid, strides 1; the kernel in Keras's (kh, kw, in, out) layout.
    "conv-valid-kernel": """
loss: mse
inputs: {random: normal, shape: [2, 6, 7, 2]}
targets: {random: normal, shape: [2, 3]}
layers:
  - {type: conv2d, filters: 3, kernel_size: [3, 2], activation: relu, kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
  - {type: flatten}
  - {units: 3, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    # "same" with strides 2: height 6 -> 3 (total padding 1: 0 on top, 1 at the bottom), width 7 ->
    # 4 with a 4-wide kernel (total 3: 1 on the left, 2 on the right). Weight in (out, in, kh, kw).
    "conv-same-odd-strides2-weight": """
loss: mse
inputs: {random: normal, shape: [2, 6, 7, 2]}
targets: {random: normal, shape: [2, 3]}
layers:
  - {type: conv2d, filters: 3, kernel_size: [3, 4], strides: 2, padding: same, activation: tanh, weight: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
  - {type: flatten}
  - {units: 3, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    # A pool of 3x2 with strides [2, 1]: overlapping windows along the width.
    "max-pool-strides": """
loss: mse
optimizer: {name: sgd, momentum: 0.9}
steps: 2
inputs: {random: normal, shape: [2, 7, 6, 2]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: 2, activation: tanh, kernel: {random: normal, std: 0.5}}
  - {type: max_pool2d, pool_size: [3, 2], strides: [2, 1]}
  - {type: flatten}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    "avg-pool-strides": """
loss: mse
inputs: {random: normal, shape: [2, 7, 6, 2]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: 2, activation: sigmoid, kernel: {random: normal, std: 0.5}}
  - {type: avg_pool2d, pool_size: [2, 3], strides: [1, 2]}
  - {type: flatten}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    # Flatten of the inputs themselves: the first dense kernel's delta is A_prev.T @ dZ with A_prev
    # in (h, w, c) order; a (c, h, w) flatten would permute its rows.
    "flatten-then-dense": """
loss: mse
inputs: {random: normal, shape: [3, 3, 4, 2]}
targets: {random: normal, shape: [3, 2]}
layers:
  - {type: flatten}
  - {units: 5, activation: tanh, kernel: {random: normal, std: 0.3}, bias: {random: normal, std: 0.1}}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    "batch-norm-features-adam": """
loss: mse
optimizer: {name: adam, epsilon: 0.1}
steps: 3
inputs: {random: normal, shape: [5, 4]}
targets: {random: normal, shape: [5, 2]}
layers:
  - {units: 3, activation: tanh, kernel: {random: normal, std: 0.7}, bias: {random: normal, std: 0.1}}
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.9, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}, moving_mean: {random: normal, std: 0.5}, moving_variance: {random: uniform, low: 0.5, high: 2}}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.5}}
""",
    "batch-norm-images-adam": """
loss: mse
optimizer: {name: adam, epsilon: 0.1}
steps: 3
inputs: {random: normal, shape: [2, 4, 5, 2]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: [2, 3], activation: relu, kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.8, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}, moving_mean: {random: normal, std: 0.5}, moving_variance: {random: uniform, low: 0.5, high: 2}}
  - {type: flatten}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    "layer-norm-features": """
loss: mse
inputs: {random: normal, shape: [3, 4]}
targets: {random: normal, shape: [3, 2]}
layers:
  - {units: 5, activation: linear, kernel: {random: normal, std: 0.7}, bias: {random: normal, std: 0.1}}
  - {type: layer_norm, epsilon: 1.0e-5, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}}
  - {units: 2, activation: tanh, kernel: {random: normal, std: 0.5}}
""",
    # On images layer norm normalizes each position over its channels (the last axis of NHWC).
    "layer-norm-images": """
loss: mse
inputs: {random: normal, shape: [2, 4, 4, 2]}
targets: {random: normal, shape: [2, 2]}
layers:
  - {type: conv2d, filters: 3, kernel_size: [2, 3], activation: linear, kernel: {random: normal, std: 0.5}, bias: {random: normal, std: 0.1}}
  - {type: layer_norm, epsilon: 1.0e-3, gamma: {random: normal, mean: 1, std: 0.2}, beta: {random: normal, std: 0.1}}
  - {type: flatten}
  - {units: 2, activation: linear, kernel: {random: normal, std: 0.3}}
""",
    "bce": """
loss: bce
inputs: {random: normal, shape: [4, 3]}
targets: {random: uniform, shape: [4, 2], low: 0, high: 1}
layers:
  - {units: 4, activation: relu, kernel: {random: normal, std: 0.7}, bias: {random: normal, std: 0.1}}
  - {units: 2, activation: sigmoid, kernel: {random: normal, std: 0.7}, bias: [0.1, -0.2]}
""",
    "scce-sum": """
loss: {name: scce, reduction: sum}
inputs: {random: normal, shape: [5, 3]}
targets: {random: classes, shape: [5]}
layers:
  - {units: 4, activation: tanh, kernel: {random: normal, std: 0.7}}
  - {units: 3, activation: softmax, kernel: {random: normal, std: 0.7}, bias: [0.1, 0.0, -0.1]}
""",
    # delta 0.5 against errors of order 1: both the squared and the linear branch (checked below).
    "huber-delta": """
loss: {name: huber, delta: 0.5}
inputs: {random: normal, shape: [4, 3]}
targets: {random: normal, shape: [4, 3]}
layers:
  - {units: 4, activation: {name: leaky_relu, alpha: 0.1}, kernel: {random: normal, std: 0.7}, bias: {random: normal, std: 0.1}}
  - {units: 3, activation: linear, kernel: {random: normal, std: 0.7}}
""",
}


def make(name: str, dtype: str):
    return parse_case(f"name: {name}\ndtype: {dtype}\nseed: 3\nlr: 0.1\n" + CASES[name], f"{name}.yaml")


def torch_engine():
    from manualprop.adapters.torch_engine import TorchEngine

    return TorchEngine()


def unbiased_moving_variance(case, reference, i: int) -> np.ndarray:
    """PyTorch's running variance after the case's steps, written out from the reference's biased
    batch variance of each step: moving <- m moving + (1 - m) var n / (n - 1)."""
    layer = case.layers[i]
    n = case.inputs.shape[0] * int(np.prod(layer.in_shape[:-1]))  # the values per feature
    m = layer.momentum
    moving = layer.moving_variance.astype(np.float64)
    for record in reference.history:
        moving = m * moving + (1 - m) * record.trace[i].var.astype(np.float64) * n / (n - 1)
    return moving


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_each_layer_kind_and_loss_agrees_with_the_reference_engine(name, dtype):
    case = make(name, dtype)
    reference, result = NumpyEngine().step(case), torch_engine().step(case)
    initial = case.parameters()

    assert len(result.losses) == case.steps
    for t, (mine, theirs) in enumerate(zip(result.losses, reference.losses, strict=True)):
        assert compare("loss", "torch", mine, "numpy", theirs, case.rtol, case.atol).ok, (t, mine, theirs)
    assert result.deltas.keys() == reference.deltas.keys() == initial.keys()
    for param, delta in reference.deltas.items():
        mine = result.deltas[param]
        assert mine.shape == delta.shape and mine.dtype == np.dtype(dtype), param
        agreement = compare(param, "torch", mine, "numpy", delta, case.rtol, case.atol, reference=initial[param])
        if param.endswith("moving_variance"):
            assert not agreement.ok, f"{param}: PyTorch's unbiased running variance should differ from the biased one"
            i = int(param.split(".")[1])
            expected = unbiased_moving_variance(case, reference, i) - initial[param]
            unbiased = compare(param, "torch", mine, "unbiased", expected, case.rtol, case.atol, reference=initial[param])
            assert unbiased.ok, unbiased.message
        else:
            assert agreement.ok, agreement.message
            assert np.any(delta != 0), param  # a step that moves nothing would prove nothing


def test_huber_hits_both_branches():
    case = make("huber-delta", "float64")
    errors = np.abs(NumpyEngine().step(case).trace[-1].A - case.targets)
    assert (errors <= 0.5).any() and (errors > 0.5).any()


def test_the_torch_batch_norm_really_is_the_unbiased_one():
    """The check above is able to fail: the biased and the unbiased moving variance differ by far more
    than the tolerance in these cases."""
    for name in ("batch-norm-features-adam", "batch-norm-images-adam"):
        case = make(name, "float64")
        reference = NumpyEngine().step(case)
        biased = reference.deltas["layers.1.moving_variance"]
        unbiased = unbiased_moving_variance(case, reference, 1) - case.layers[1].moving_variance
        assert np.abs(biased - unbiased).min() > 1e-3


TRACE_FIELDS = {
    "conv2d": ("Z", "A", "dA", "dZ", "dW", "db"),
    "dense": ("Z", "A", "dA", "dZ", "dW", "db"),
    "max_pool2d": ("A", "dA"),
    "avg_pool2d": ("A", "dA"),
    "flatten": ("A", "dA"),
    "batch_norm": ("mean", "var", "xhat", "A", "dA", "dgamma", "dbeta"),
    "layer_norm": ("mean", "var", "xhat", "A", "dA", "dgamma", "dbeta"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name",
    [
        "conv-same-odd-strides2-weight",
        "max-pool-strides",
        "flatten-then-dense",
        "batch-norm-images-adam",
        "layer-norm-images",
        "bce",
    ],
)
def test_the_trace_matches_the_reference_field_by_field(name, dtype):
    """Every field in the reference's layout (NHWC images, (kh, kw, in, out) kernels), so that a
    trace comparison localizes a disagreement instead of failing on the layout.

    Values are compared at the first step, where both engines start from the same numbers; at a
    later step each engine's trace is at its own parameters, which after Adam steps in float32
    differ by rounding (about 4e-7 here), enough to move a small trace element by more than the
    tolerance: there only the layout (every field there, of the reference's shape) is checked."""
    case = make(name, dtype)
    reference, result = NumpyEngine().step(case), torch_engine().step(case)
    for t, (mine, theirs) in enumerate(zip(result.history, reference.history, strict=True)):
        assert mine.trace is not None
        for i, (layer, got, want) in enumerate(zip(case.layers, mine.trace, theirs.trace, strict=True)):
            last_on_logits = i == len(case.layers) - 1 and name == "bce"
            for field in TRACE_FIELDS[layer.kind]:
                expected = getattr(want, field)
                if last_on_logits and field == "dA":  # the loss takes the logits: neither engine has dA
                    assert expected is None and got.dA is None
                    continue
                found = getattr(got, field)
                where = f"step {t} layer {i} ({layer.kind}) {field}"
                assert found is not None and found.shape == expected.shape, (where, None if found is None else found.shape)
                if t == 0:
                    agreement = compare(where, "torch", found, "numpy", expected, case.rtol, case.atol)
                    assert agreement.ok, agreement.message


def test_a_conv_trace_is_nhwc_and_its_padding_on_the_bottom_and_right():
    """TensorFlow's rule by hand: a one-channel 2x3 image of ones, a 2x2 kernel of ones, strides 2,
    same: the output is 1x2; the last window hangs over the right edge by one column, so it sums
    2 values where the first sums 4 (the padding on the left instead would give 2 and 4)."""
    text = """
dtype: float64
loss: mse
lr: 0.1
inputs: [[[[1], [1], [1]], [[1], [1], [1]]]]
targets: [[0, 0]]
layers:
  - {type: conv2d, filters: 1, kernel_size: 2, strides: 2, padding: same, activation: linear, kernel: [[[[1]], [[1]]], [[[1]], [[1]]]], bias: false}
  - {type: flatten}
"""
    trace = torch_engine().step(parse_case(text, "by-hand.yaml")).trace
    assert trace[0].Z.shape == (1, 1, 2, 1)
    np.testing.assert_array_equal(trace[0].Z[0, 0, :, 0], [4.0, 2.0])


def test_the_build_cache_tells_layer_settings_apart():
    """Cases that differ only in a setting baked into the modules (padding, strides, epsilon,
    momentum, huber's delta) each get their own modules and their own results."""
    engine = torch_engine()
    base = make("conv-same-odd-strides2-weight", "float64")
    engine.step(base)
    for name, old, new in [
        ("conv-same-odd-strides2-weight", "momentum: 0.8", "momentum: 0.8"),  # the same: reused
        ("batch-norm-features-adam", "momentum: 0.9", "momentum: 0.5"),
        ("batch-norm-features-adam", "epsilon: 1.0e-3, momentum", "epsilon: 1.0e-1, momentum"),
        ("huber-delta", "delta: 0.5", "delta: 0.25"),
    ]:
        for text in (CASES[name], CASES[name].replace(old, new)):
            case = parse_case(f"name: {name}\ndtype: float64\nseed: 3\nlr: 0.1\n" + text, f"{name}.yaml")
            reference, result = NumpyEngine().step(case), engine.step(case)
            for param, delta in reference.deltas.items():
                if not param.endswith("moving_variance"):
                    agreement = compare(param, "torch", result.deltas[param], "numpy", delta, case.rtol, case.atol)
                    assert agreement.ok, (name, new, agreement.message)
    assert len(engine.models) == 6  # conv once; batch norm three times; huber twice
