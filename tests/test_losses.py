"""Each loss's gradient, under every reduction and a scale, against central finite differences."""

import numpy as np
import pytest

from manualprop.reference import losses

from finite_differences import gradient

RNG = np.random.default_rng(11)
Y = RNG.normal(size=(4, 3))
T_REGRESSION = Y + RNG.choice([-1.0, 1.0], size=Y.shape) * RNG.uniform(0.1, 1.0, size=Y.shape)  # never y == t
T_ONE_HOT = np.eye(3)[[0, 2, 1, 2]]


T_CLASSES = np.array([0, 2, 1, 2])


def targets(name):
    if name == "sparse_categorical_crossentropy":
        return T_CLASSES
    return T_ONE_HOT if losses.get(name).on_logits else T_REGRESSION


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gradient_matches_finite_differences(name, reduction, scale):
    loss, t = losses.get(name), targets(name)

    def value(y):
        return float(losses.reduce(loss.terms(y, t), reduction, scale))

    np.testing.assert_allclose(losses.gradient(loss, Y, t, reduction, scale), gradient(value, Y), rtol=1e-6, atol=1e-9)


def test_reductions_follow_the_spec():
    mse = losses.get("mse")
    # mean over every element for MSE; mean over samples for cross-entropy
    assert losses.reduce(mse.terms(Y, T_REGRESSION), "mean", 1.0) == pytest.approx(((Y - T_REGRESSION) ** 2).mean())
    assert losses.reduce(mse.terms(Y, T_REGRESSION), "sum", 0.5) == pytest.approx(0.5 * ((Y - T_REGRESSION) ** 2).sum())
    cce = losses.get("cce")
    p = np.exp(Y) / np.exp(Y).sum(axis=1, keepdims=True)
    assert losses.reduce(cce.terms(Y, T_ONE_HOT), "mean", 1.0) == pytest.approx(-np.log(p[T_ONE_HOT == 1]).mean())


def test_cross_entropy_on_logits_is_stable_where_probabilities_underflow():
    z = np.array([[800.0, 0.0]])
    t = np.array([[0.0, 1.0]])
    cce = losses.get("categorical_crossentropy")
    assert cce.terms(z, t)[0] == pytest.approx(800.0)
    np.testing.assert_allclose(cce.grad(z, t), [[1.0, -1.0]])


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Could not interpret loss identifier: 'hinge'.*mse"):
        losses.get("hinge")
