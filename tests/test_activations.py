"""Each activation's backward against central finite differences of its forward."""

import numpy as np
import pytest

from manualprop.reference import activations

from finite_differences import gradient

# Points kept away from the kinks of relu and leaky_relu, where no derivative exists.
Z = np.array([[-2.1, -0.7, 0.3, 1.9], [0.05, -0.05, 3.2, -4.0], [0.6, 0.1, -1.3, 0.8]])


@pytest.mark.parametrize("name", sorted(activations.ACTIVATIONS))
@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_backward_matches_finite_differences(name, alpha):
    act = activations.get(name)
    upstream = np.random.default_rng(7).normal(size=Z.shape)  # a dL/dA to pull back through f

    def loss(z):
        return float((act.forward(z, alpha) * upstream).sum())

    a = act.forward(Z, alpha)
    np.testing.assert_allclose(act.backward(upstream, Z, a, alpha), gradient(loss, Z), rtol=1e-6, atol=1e-8)


def test_softmax_backward_is_the_full_jacobian_not_its_diagonal():
    act = activations.get("softmax")
    a = act.forward(Z, 0.0)
    upstream = np.random.default_rng(3).normal(size=Z.shape)
    diagonal_only = upstream * a * (1 - a)
    assert not np.allclose(act.backward(upstream, Z, a, 0.0), diagonal_only, rtol=1e-3)


def test_relu_and_leaky_relu_derivatives_at_zero_follow_the_frameworks():
    z = np.zeros((1, 2))
    ones = np.ones((1, 2))
    assert np.all(activations.get("relu").backward(ones, z, z, 0.0) == 0)
    assert np.all(activations.get("leaky_relu").backward(ones, z, z, 0.1) == np.float64(0.1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_softmax_stay_finite_for_large_inputs(dtype):
    z = np.array([[-1000.0, 0.0, 1000.0]], dtype=dtype)
    for name in ("sigmoid", "softmax"):
        a = activations.get(name).forward(z, 0.0)
        assert a.dtype == dtype
        assert np.all(np.isfinite(a))


def test_unknown_activation_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Could not interpret activation function identifier: 'swish'.*tanh"):
        activations.get("swish")
