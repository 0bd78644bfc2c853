"""Tests that kill the mutants of the NumPy reference's layer kinds and new losses that the suite let
survive (docs/mutation.md, "Latest run"). Each test names, in its docstring, the mutants it kills, and
compares the engine with an independent reference: PyTorch, central finite differences, the
finite-difference oracle or values worked out by hand."""

import numpy as np
import torch

from manualprop import engines, parse_case
from manualprop.reference import layers, losses
from manualprop.reference.engine import NumpyEngine, backward, forward, gradients, loss_value

from finite_differences import gradient


def test_huber_without_delta_takes_the_declared_default_of_one():
    """Kills ``losses.x__huber_terms__mutmut_1`` and ``losses.x__huber_grad__mutmut_1`` (the default
    ``delta: float = 1.0`` -> ``2.0`` in ``_huber_terms`` and ``_huber_grad``). The engine always passes
    the case's delta, but the registry's functions are also called without it (tests/test_losses.py
    does, for every loss), and the declared default is 1.0 (concepts.py, SPEC section 9).

    By hand, with delta 1 and errors e = y - t = 0.5, -1.5, 3: the terms are 0.5 * 0.25 = 0.125 (|e| <= 1),
    1 * (1.5 - 0.5) = 1.0 and 1 * (3 - 0.5) = 2.5; the slopes e clipped to [-1, 1]: 0.5, -1, 1. With
    delta 2 they would be 0.125, 1.125, 4.0 and 0.5, -1.5, 2."""
    huber = losses.get("huber")
    y, t = np.array([[0.5, -1.5, 3.0]]), np.zeros((1, 3))
    np.testing.assert_array_equal(huber.terms(y, t), [[0.125, 1.0, 2.5]])
    np.testing.assert_array_equal(huber.grad(y, t), [[0.5, -1.0, 1.0]])
    # and PyTorch's HuberLoss at its own default delta (1.0)
    y_t = torch.tensor(y, requires_grad=True)
    total = torch.nn.HuberLoss(reduction="sum")(y_t, torch.tensor(t))
    total.backward()
    assert total.item() == float(huber.terms(y, t).sum())
    np.testing.assert_array_equal(y_t.grad.numpy(), huber.grad(y, t))


def test_sparse_categorical_crossentropy_of_a_float32_case_stays_float32():
    """Kills ``losses.x__one_hot__mutmut_2`` and ``_4`` (``np.eye(classes, dtype=dtype)`` -> ``dtype=None``
    / the dtype dropped): the one-hot targets come out in NumPy's default float64, so ``p - one_hot`` and
    every gradient below it are float64 for a float32 case, against the SPEC ("every engine computes in
    the case's dtype"); the values stay within float32's tolerance, so no comparison saw it.

    The gradient of the mean cross-entropy over class indices, against PyTorch's ``cross_entropy`` in
    float32, and its dtype."""
    scce = losses.get("sparse_categorical_crossentropy")
    z = np.array([[0.2, -1.0, 0.5], [1.5, 0.3, -0.7]], dtype=np.float32)
    t = np.array([2, 0], dtype=np.int64)
    grad = losses.gradient(scce, z, t, "mean", 1.0)
    z_t = torch.tensor(z, requires_grad=True)
    torch.nn.functional.cross_entropy(z_t, torch.tensor(t)).backward()
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, z_t.grad.numpy(), rtol=1e-6, atol=1e-7)


# -- conv2d --------------------------------------------------------------------------------------

TWO_CONVS = """
dtype: float64
seed: 4
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 4, 6, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 3, kernel_size: 2, activation: tanh, bias: {random: normal}}
  - {type: conv2d, filters: 2, kernel_size: [2, 3], padding: same, activation: tanh, bias: {random: normal}}
  - {type: flatten}
  - {units: 2, bias: {random: normal}}
"""


def test_a_conv_after_a_conv_on_images_wider_than_tall_passes_the_right_gradient_down():
    """Kills ``layers.x_conv_backward__mutmut_74`` (the rows of dA_prev cut as ``top : top +
    a_prev.shape[2]``, the width) and ``_76`` (the columns cut as ``left : left + a_prev.shape[3]``, the
    channels). Every conv2d of the suite was the first layer or had a square input with as many
    channels as columns, and a first layer's dA_prev is not used; here the second conv's input is
    (3, 5, 3): 3 rows, 5 columns, 3 channels, with "same" padding (one row at the bottom, one column on
    each side), so what it passes down decides the first conv's kernel and bias gradients.
    Those, and every other gradient, against central finite differences of the loss."""
    case = parse_case(TWO_CONVS, "two_convs.yaml")
    assert case.layers[1].in_shape == (3, 5, 3) and layers.padding_of(case.layers[1]) == ((0, 1), (1, 1))
    traces = forward(case)
    backward(case, traces)
    grads = gradients(traces)
    params = case.parameters()
    assert set(grads) == set(params)
    for name in params:

        def loss_at(value, name=name):
            moved = case.with_parameters({**params, name: value})
            return loss_value(moved, forward(moved))

        np.testing.assert_allclose(grads[name], gradient(loss_at, params[name]), rtol=1e-6, atol=1e-9, err_msg=name)


def test_a_conv_without_bias_has_no_bias_gradient_in_the_trace_like_the_oracle():
    """Kills ``layers.x_conv_backward__mutmut_50`` (``db`` summed even for a conv2d without bias): the
    trace, which explain and the diagnosis read, must agree with the finite-difference oracle, which has
    no bias to differentiate there; and ``gradients`` then has no ``layers.0.bias``."""
    case = parse_case(
        """
dtype: float64
seed: 2
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 3, 3, 1]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 2, kernel_size: 2, activation: tanh, bias: false}
  - {type: flatten}
  - {units: 1, bias: {random: normal}}
""",
        "conv_without_bias.yaml",
    )
    numpy_trace = NumpyEngine().step(case).trace
    oracle_trace = engines.get(engines.ORACLE).step(case).trace
    assert oracle_trace[0].db is None and oracle_trace[2].db is not None
    assert numpy_trace[0].db is None
    np.testing.assert_allclose(numpy_trace[0].dW, oracle_trace[0].dW, rtol=1e-6)
    assert "layers.0.bias" not in gradients(numpy_trace)


def test_a_valid_conv_has_no_padding_on_any_side():
    """Kills ``layers.x_padding_of__mutmut_5`` and ``_7`` (a "valid" conv padded by one row at the bottom
    / one column at the right). The engine's own numbers do not change, since a valid conv's windows
    never reach past the input, but explain prints ``padding_of`` in the conv's Z formula and the
    diagnosis builds its "same padding on the other side" variant from it, so a valid conv would be
    explained with padding (0, 1) and offered a padding slip it cannot have. By hand: "valid" pads
    nothing (the first conv's output is 4 - 3 + 1 = 2 rows by (6 - 2) // 2 + 1 = 3 columns); "same" on
    those 2 rows, kernel 3, stride 1: 2 rows out, (2 - 1) * 1 + 3 - 2 = 2 rows of padding, one on each
    side; on 3 columns, kernel 2, stride 2: ceil(3 / 2) = 2 out, (2 - 1) * 2 + 2 - 3 = 1 column, at the
    right."""
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 0.1
inputs: {random: normal, shape: [1, 4, 6, 1]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 1, kernel_size: [3, 2], strides: [1, 2]}
  - {type: conv2d, filters: 1, kernel_size: [3, 2], strides: [1, 2], padding: same}
  - {type: flatten}
  - {units: 1}
""",
        "padding.yaml",
    )
    assert layers.padding_of(case.layers[0]) == ((0, 0), (0, 0))
    assert case.layers[1].in_shape == (2, 3, 1)
    assert layers.padding_of(case.layers[1]) == ((1, 1), (0, 1))


IMAGES_FLOAT32 = """
dtype: float32
seed: 6
loss: mse
lr: 0.1
inputs: {random: normal, shape: [2, 6, 5, 2]}
targets: {random: normal}
layers:
  - {type: conv2d, filters: 2, kernel_size: 2, activation: tanh, bias: {random: normal}}
  - {type: max_pool2d, pool_size: 2, strides: 1}
  - {type: conv2d, filters: 2, kernel_size: [2, 3], strides: [1, 2], padding: same, activation: tanh}
  - {type: avg_pool2d, pool_size: 2}
  - {type: flatten}
  - {units: 2, bias: {random: normal}}
"""


def test_a_float32_case_of_convs_and_pools_stays_float32_like_torch():
    """Kills ``layers.x__windows__mutmut_4`` and ``_6`` (the windows gathered into ``np.empty(...,
    dtype=None)`` / without a dtype: float64) and ``layers.x__unwindows__mutmut_7`` and ``_9`` (the
    gradient added back into ``np.zeros(shape, dtype=None)`` / without a dtype): a float32 case's conv
    Z, A and dW, or the dA a conv or pool passes down, come out float64, against the SPEC ("every engine
    computes in the case's dtype"); the values stay within float32's tolerance, so no comparison saw
    it. Also kills ``layers.x_padding_of__mutmut_17`` (the rows' "same" padding from the columns'
    stride): the second conv has strides (1, 2).

    Against PyTorch's engine on the same case: every trace field both fill has torch's dtype, float32,
    and its values, and so have the deltas."""
    case = parse_case(IMAGES_FLOAT32, "images_float32.yaml")
    numpy_result, torch_result = NumpyEngine().step(case), engines.get("torch").step(case)
    compared = 0
    for i, (ours, theirs) in enumerate(zip(numpy_result.trace, torch_result.trace, strict=True)):
        for field in ("Z", "A", "dA", "dZ", "dW", "db"):
            mine, reference = getattr(ours, field), getattr(theirs, field)
            if mine is None or reference is None:
                continue
            compared += 1
            assert (mine.dtype, reference.dtype) == (np.float32, np.float32), f"layers.{i}.{field}"
            np.testing.assert_allclose(mine, reference, rtol=2e-4, atol=2e-5, err_msg=f"layers.{i}.{field}")
    assert compared >= 14
    for name, delta in numpy_result.deltas.items():
        assert delta.dtype == np.float32, name
        np.testing.assert_allclose(delta, torch_result.deltas[name], rtol=2e-4, atol=2e-6, err_msg=name)
