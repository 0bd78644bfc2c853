"""Tests that kill the mutants of the NumPy reference's layer kinds and new losses that the suite let
survive (docs/mutation.md, "Latest run"). Each test names, in its docstring, the mutants it kills, and
compares the engine with an independent reference: PyTorch or values worked out by hand."""

import numpy as np
import torch

from manualprop.reference import losses


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
