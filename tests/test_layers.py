"""The NumPy reference's layer kinds (manualprop.reference.layers) against central finite differences
of its own forward pass (every trainable parameter and the input of each kind), and against values
written out by hand: TensorFlow's "same" padding, pooling windows, flatten order, batch norm's
moving statistics and the new losses."""

import json

import numpy as np
import pytest

from manualprop import parse_case
from manualprop.engines import LayerTrace
from manualprop.reference import layers, losses
from manualprop.reference.activations import ACTIVATIONS
from manualprop.reference.engine import NumpyEngine, backward, forward, gradients, loss_value

from finite_differences import gradient

# Each kind between layers that feed and read it, with strides, odd padding and windows that do not tile.
NETWORKS = {
    "conv2d same, strides 2, odd padding": (
        [3, 5, 6, 2],
        ["{type: conv2d, filters: 3, kernel_size: [2, 3], strides: 2, padding: same, activation: tanh, bias: {random: normal}}"],
    ),
    "conv2d valid, strides [1, 2]": (
        [2, 5, 5, 3],
        ["{type: conv2d, filters: 2, kernel_size: 3, strides: [1, 2], activation: sigmoid, bias: {random: normal}}"],
    ),
    "max_pool2d, strides 1": ([2, 4, 5, 2], ["{type: max_pool2d, pool_size: [2, 3], strides: 1}"]),
    "avg_pool2d, windows not tiling": ([2, 5, 5, 2], ["{type: avg_pool2d, pool_size: 2}"]),
    "batch_norm on images": (
        [3, 3, 2, 2],
        ["{type: batch_norm, epsilon: 1.0e-3, momentum: 0.9, gamma: {random: normal, mean: 1}, beta: {random: normal}}"],
    ),
    "batch_norm on features": (
        [4, 3],
        ["{units: 3, activation: tanh}", "{type: batch_norm, epsilon: 0.1, momentum: 0.5, gamma: {random: normal, mean: 1}}"],
    ),
    "layer_norm on features": (
        [3, 4],
        [
            "{units: 5, activation: tanh}",
            "{type: layer_norm, epsilon: 1.0e-3, gamma: {random: normal, mean: 1}, beta: {random: normal}}",
        ],
    ),
    "layer_norm on images": ([2, 2, 3, 4], ["{type: layer_norm, epsilon: 1.0e-2, gamma: {random: normal, mean: 1}}"]),
}


def network(shape, hidden, loss="mse", last="linear", targets="{random: normal}") -> str:
    images = len(shape) == 4
    body = "".join(f"  - {layer}\n" for layer in hidden) + ("  - {type: flatten}\n" if images else "")
    return f"""
dtype: float64
seed: 3
loss: {json.dumps(loss)}
lr: 0.1
inputs: {{random: normal, shape: {shape}}}
targets: {targets}
layers:
{body}  - {{units: 3, activation: {last}, bias: {{random: normal}}}}
"""


def check_against_finite_differences(case) -> None:
    traces = forward(case)
    backward(case, traces)
    grads = gradients(traces)
    params = case.parameters()
    trainable = [name for name in params if case.trainable(name)]
    assert set(grads) == set(trainable)
    for name in trainable:

        def loss_at(value, name=name):
            moved = case.with_parameters({**params, name: value})
            return loss_value(moved, forward(moved))

        np.testing.assert_allclose(grads[name], gradient(loss_at, params[name]), rtol=1e-6, atol=1e-9, err_msg=name)
    # the gradient each kind passes down, dL/dA_prev, at the input of the second layer
    if len(case.layers) > 1:
        a_first = traces[0].A

        def loss_from(a):
            trace = [LayerTrace(A=a)]
            out = a
            for layer in case.layers[1:]:
                t = LayerTrace()
                out = layers.KINDS[layer.kind].forward(layer, out, t, ACTIVATIONS)
                trace.append(t)
            return loss_value(case, trace)

        np.testing.assert_allclose(traces[0].dA, gradient(loss_from, a_first), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_kind_matches_finite_differences(name):
    shape, hidden = NETWORKS[name]
    check_against_finite_differences(parse_case(network(shape, hidden), f"{name}.yaml"))


@pytest.mark.parametrize(
    "loss, last, targets",
    [
        ("binary_crossentropy", "sigmoid", "{random: uniform}"),
        ("sparse_categorical_crossentropy", "softmax", "{random: classes}"),
        ({"name": "huber", "delta": 0.3}, "linear", "{random: normal, std: 2}"),
        ({"name": "huber", "delta": 0.3, "reduction": "sum", "scale": 0.5}, "linear", "{random: normal, std: 2}"),
        ({"name": "bce", "reduction": "sum"}, "sigmoid", "{random: uniform}"),
    ],
)
def test_the_new_losses_match_finite_differences(loss, last, targets):
    text = network([4, 3], ["{units: 4, activation: tanh}"], loss, last, targets)
    check_against_finite_differences(parse_case(text, "loss.yaml"))


def test_same_padding_puts_the_odd_row_at_the_bottom_and_the_odd_column_at_the_right():
    # 4 rows, kernel 2, stride 1: one row of padding in all, at the bottom (TensorFlow's rule)
    assert layers.same_padding(4, 2, 1) == (0, 1)
    # 5 columns, kernel 2, stride 2: out 3, total (3 - 1) * 2 + 2 - 5 = 1, at the right
    assert layers.same_padding(5, 2, 2) == (0, 1)
    assert layers.same_padding(5, 3, 1) == (1, 1)
    assert layers.same_padding(6, 3, 2) == (0, 1)
    assert layers.same_padding(2, 1, 2) == (0, 0)


def test_a_same_convolution_of_ones_counts_the_kernel_cells_inside_the_image():
    """A 3x3 image of ones, a 2x2 kernel of ones, same: each output sums the cells its window covers
    inside the image; the padding row and column are at the bottom and right, so the last row and
    column of the output see only 2 cells and the corner 1."""
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 1
inputs: [[[[1], [1], [1]], [[1], [1], [1]], [[1], [1], [1]]]]
targets: [[0]]
layers:
  - {type: conv2d, filters: 1, kernel_size: 2, padding: same, kernel: [[[[1]], [[1]]], [[[1]], [[1]]]]}
  - {type: flatten}
  - {units: 1, kernel: [[1], [1], [1], [1], [1], [1], [1], [1], [1]]}
""",
        "same.yaml",
    )
    z = forward(case)[0].Z[0, :, :, 0]
    np.testing.assert_array_equal(z, [[4, 4, 2], [4, 4, 2], [2, 2, 1]])


def test_max_pool_sends_the_gradient_to_the_largest_value_and_avg_pool_shares_it():
    x = np.array([1.0, 5.0, 3.0, 2.0, 4.0, 0.0, 7.0, 6.0, 8.0]).reshape(1, 3, 3, 1)
    text = """
dtype: float64
loss: mse
lr: 1
inputs: {x}
targets: [[0]]
layers:
  - {{type: {kind}, pool_size: 2, strides: 1}}
  - {{type: flatten}}
  - {{units: 1}}
"""
    for kind, expected_a, expected_d in [
        ("max_pool2d", [5, 5, 7, 8], [[0, 20, 0], [0, 0, 0], [14, 0, 16]]),  # 5 is the largest of two windows
        ("avg_pool2d", [3, 3, 4.75, 4.5], None),
    ]:
        case = parse_case(text.format(x=x.tolist(), kind=kind), f"{kind}.yaml")
        traces = forward(case)
        np.testing.assert_array_equal(traces[0].A.reshape(-1), expected_a)
        traces[0].dA = 2 * traces[0].A  # an upstream gradient of 2 A
        d_prev = layers.KINDS[kind].backward(case.layers[0], x, traces[0], ACTIVATIONS)[0, :, :, 0]
        if expected_d is not None:  # each window's largest gets its window's dA
            np.testing.assert_array_equal(d_prev, expected_d)
        else:  # each of the 4 windows shares 2 A / 4 over its cells
            share = 2 * np.array(expected_a).reshape(2, 2) / 4
            expected = np.zeros((3, 3))
            for i in range(2):
                for j in range(2):
                    expected[i : i + 2, j : j + 2] += share[i, j]
            np.testing.assert_allclose(d_prev, expected)


def test_flatten_orders_height_width_channels():
    x = np.arange(12.0).reshape(1, 2, 3, 2)  # value = 6 h + 2 w + c
    layer = parse_case(network([1, 2, 3, 2], []), "f.yaml").layers[0]
    flat = layers.flatten_forward(layer, x, LayerTrace(), ACTIVATIONS)
    np.testing.assert_array_equal(flat[0], np.arange(12.0))  # (h, w, c) order is row-major NHWC


def test_batch_norm_moving_statistics_use_the_biased_variance_and_keras_momentum():
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 0.1
inputs: [[1.0], [2.0], [6.0]]
targets: [[0], [0], [0]]
layers:
  - {type: batch_norm, epsilon: 1.0e-3, momentum: 0.75, moving_mean: [1.0], moving_variance: [2.0]}
""",
        "bn.yaml",
    )
    result = NumpyEngine().step(case)
    # mean 3, biased variance (4 + 1 + 9) / 3 = 14/3; moving <- 0.75 moving + 0.25 stat
    np.testing.assert_allclose(result.deltas["layers.0.moving_mean"], [0.25 * (3 - 1)])
    np.testing.assert_allclose(result.deltas["layers.0.moving_variance"], [0.25 * (14 / 3 - 2)])


def test_moving_statistics_follow_each_step_of_several():
    """Three steps: each step's statistics are the batch's at the parameters of that step (the
    statistics of a batch norm right after the inputs do not move; after a trained dense layer they do)."""
    text = network([4, 3], ["{units: 2, activation: linear}", "{type: batch_norm, epsilon: 1.0e-3, momentum: 0.5}"])
    case = parse_case(text + "steps: 3\noptimizer: {name: adam, epsilon: 1.0e-8}\n", "bn3.yaml")
    result = NumpyEngine().step(case)
    moving, total = case.parameters()["layers.1.moving_mean"], 0
    params = case.parameters()
    for record in result.history:
        here = case.with_parameters(params)
        trace = forward(here)[1]
        np.testing.assert_allclose(record.deltas["layers.1.moving_mean"], 0.5 * (trace.mean - moving), rtol=1e-12)
        moving = moving + record.deltas["layers.1.moving_mean"]
        total = total + record.deltas["layers.1.moving_mean"]
        params = {name: params[name] + record.deltas[name] for name in params}
    np.testing.assert_allclose(result.deltas["layers.1.moving_mean"], total, rtol=1e-12)


def test_bce_terms_are_stable_for_large_logits_and_huber_switches_at_delta():
    z = np.array([[-800.0, 0.0, 800.0]])
    t = np.array([[1.0, 0.5, 0.0]])
    terms = losses.LOSSES["binary_crossentropy"].terms(z, t)
    np.testing.assert_allclose(terms, [[800.0, np.log(2), 800.0]])
    y, t = np.array([[0.2, -2.0, 3.0]]), np.zeros((1, 3))
    huber = losses.LOSSES["huber"]
    np.testing.assert_allclose(huber.terms(y, t, delta=1.0), [[0.02, 1.5, 2.5]])
    np.testing.assert_allclose(huber.grad(y, t, delta=1.0), [[0.2, -1.0, 1.0]])


def test_sparse_cross_entropy_equals_categorical_with_one_hot_targets():
    z = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    classes = np.array([2, 1])
    one_hot = np.eye(3)[classes]
    sparse, dense = losses.LOSSES["sparse_categorical_crossentropy"], losses.LOSSES["categorical_crossentropy"]
    np.testing.assert_allclose(sparse.terms(z, classes), dense.terms(z, one_hot))
    np.testing.assert_allclose(sparse.grad(z, classes), dense.grad(z, one_hot))
    assert sparse.per_sample and dense.per_sample and not losses.LOSSES["binary_crossentropy"].per_sample
