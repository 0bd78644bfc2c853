"""Tests that kill mutants of the NumPy engine the rest of the suite let survive (docs/mutation.md).

Each test names the mutants it kills, as ``mutmut show`` names them. Every expected value comes
from an independent reference: central finite differences, the finite-difference oracle, or a
worked example whose numbers are derived by hand in the docstring.
"""

import re
import warnings
from collections.abc import Mapping

import numpy as np
import pytest

from manualprop import engines, parse_case
from manualprop.reference import activations, losses
from manualprop.reference.activations import Activation
from manualprop.reference.engine import NumpyEngine
from manualprop.reference.losses import Loss
from manualprop.reference.optimizers import Optimizer

from finite_differences import gradient

# -- a variant engine swaps its registries: every stage must use the swapped ones ----------------


class TripledTanhTenfoldMse(NumpyEngine):
    """A variant engine, as the engine's docstring invites: tanh replaced by f(z) = 3z, and MSE's
    terms by 10 (y - t)^2. Built without activations.elementwise, so that only the engine is tested."""

    name = "variant"
    activations: Mapping[str, Activation] = {
        **activations.ACTIVATIONS,
        "tanh": Activation(lambda z, alpha: 3 * z, lambda dA, z, a, alpha: 3 * dA, True),
    }
    losses: Mapping[str, Loss] = {**losses.LOSSES, "mse": Loss(lambda y, t: 10 * (y - t) ** 2, lambda y, t: 20 * (y - t), False)}


def test_a_variant_engine_runs_its_own_activation_and_loss_worked_example():
    """Kills engine.xǁNumpyEngineǁstep__mutmut_17 (forward(case) with the shipped activations) and
    __mutmut_24 (loss_value(case, traces) with the shipped losses).

    By hand: z = 2 * 1 + 0 = 2, a = 3z = 6, L = 10 (6 - 1)^2 = 250 (a mean over one term);
    dL/da = 20 (6 - 1) = 100, dZ = 3 * 100 = 300, dW = x dZ = 600, db = 300;
    deltas with lr 0.01: kernel -6, bias -3. (The shipped tanh and MSE would give
    L = (tanh 2 - 1)^2 = 0.0013.)
    """
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 0.01
inputs: [[2]]
targets: [[1]]
layers:
  - {units: 1, activation: tanh, kernel: [[1]], bias: [0]}
""",
        "variant.yaml",
    )
    result = TripledTanhTenfoldMse().step(case)
    assert result.loss == pytest.approx(250.0, rel=1e-12)
    assert result.trace[0].A.tolist() == [[6.0]]
    np.testing.assert_allclose(result.deltas["layers.0.kernel"], [[-6.0]], rtol=1e-12)
    np.testing.assert_allclose(result.deltas["layers.0.bias"], [-3.0], rtol=1e-12)


class CountingSgd(NumpyEngine):
    """A variant engine whose "sgd" scales step t's update by a state n that counts the steps:
    p <- p - lr * n * g, n = 1, 2, ... It uses none of manualprop.reference.optimizers' functions, so that
    only the engine is tested."""

    name = "variant"

    @staticmethod
    def _update(p, g, state, t, lr, hp):
        state["n"] = state["n"] + 1
        return p - lr * state["n"] * g

    optimizers: Mapping[str, Optimizer] = {"sgd": Optimizer(lambda p, hp: {"n": np.zeros_like(p)}, _update)}


def test_a_variant_engine_runs_its_own_optimizer_worked_example():
    """Kills engine.xǁNumpyEngineǁstep__mutmut_20 (run_steps(case, ...) without self.optimizers:
    the shipped SGD instead of a subclass's).

    By hand, L = (w x + b - t)^2 with x = 2, t = 1, w = 1, b = 0, lr = 0.01:
    step 1: z = 2, L = 1, dL/dz = 2 (2 - 1) = 2, dW = x dz = 4, db = 2; n = 1:
    w = 1 - 0.01 * 4 = 0.96, b = 0 - 0.01 * 2 = -0.02.
    step 2: z = 1.92 - 0.02 = 1.9, L = 0.81, dz = 1.8, dW = 3.6, db = 1.8; n = 2:
    w = 0.96 - 0.01 * 2 * 3.6 = 0.888, b = -0.02 - 0.01 * 2 * 1.8 = -0.056.
    Deltas: kernel -0.112, bias -0.056. (The shipped SGD gives -0.076 and -0.038.)
    """
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 0.01
steps: 2
inputs: [[2]]
targets: [[1]]
layers:
  - {units: 1, kernel: [[1]], bias: [0]}
""",
        "variant_optimizer.yaml",
    )
    result = CountingSgd().step(case)
    np.testing.assert_allclose(result.losses, [1.0, 0.81], rtol=1e-12)
    np.testing.assert_allclose(result.deltas["layers.0.kernel"], [[-0.112]], rtol=1e-12)
    np.testing.assert_allclose(result.deltas["layers.0.bias"], [-0.056], rtol=1e-12)
    assert [record.state["layers.0.kernel"]["n"].tolist() for record in result.history] == [[[1.0]], [[2.0]]]


# -- a layer without bias has no bias gradient anywhere -------------------------------------------


def test_a_layer_without_bias_has_no_bias_gradient_in_the_trace_like_the_oracle():
    """Kills engine.x_backward__mutmut_50 (db summed even for a layer without bias): the trace, which
    explain and the diagnosis read, must agree with the finite-difference oracle, which has no bias
    delta to differentiate there."""
    case = parse_case(
        """
dtype: float64
loss: mse
lr: 0.1
inputs: [[1, 2], [-1, 0.5]]
targets: [[0.5], [-0.25]]
layers:
  - {units: 2, activation: tanh, kernel: [[1, -1], [0.5, 2]], bias: false}
  - {units: 1, kernel: [[1], [-1]], bias: [0.1]}
""",
        "nobias.yaml",
    )
    numpy_trace = NumpyEngine().step(case).trace
    oracle_trace = engines.get(engines.ORACLE).step(case).trace
    assert oracle_trace[0].db is None and oracle_trace[1].db is not None
    assert numpy_trace[0].db is None
    np.testing.assert_allclose(numpy_trace[1].db, oracle_trace[1].db, rtol=1e-6)


# -- non-finite values are the harness's to report, silently -------------------------------------

OVERFLOW = """
dtype: float64
loss: mse
lr: 0.1
inputs: [[1.0e+200]]
targets: [[0]]
layers:
  - {units: 1, kernel: [[1.0e+200]]}
"""

OVERFLOW_THEN_INF_MINUS_INF = """
dtype: float32
loss: mse
lr: 0.1
inputs: [[1.0e+30]]
targets: [[0, 0]]
layers:
  - {units: 2, activation: softmax, kernel: [[1.0e+30, 0]]}
"""


def test_an_overflowing_step_returns_inf_without_a_runtime_warning():
    """Kills engine.xǁNumpyEngineǁstep__mutmut_1 and __mutmut_4 (np.errstate without over="ignore").

    1e200 * 1e200 = 1e400 is past float64's largest number (1.8e308): Z is +inf, so is the loss,
    and the kernel's delta (p - 0.1 * inf) - p is -inf. The harness reports that as NON-FINITE;
    the engine must not also print NumPy's "overflow encountered" warning."""
    case = parse_case(OVERFLOW, "overflow.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = NumpyEngine().step(case)
    assert result.loss == np.inf
    assert result.deltas["layers.0.kernel"].tolist() == [[-np.inf]]


def test_inf_minus_inf_gives_nan_without_a_runtime_warning():
    """Kills engine.xǁNumpyEngineǁstep__mutmut_2 and __mutmut_5 (np.errstate without invalid="ignore").

    In float32, 1e30 * 1e30 overflows to +inf; softmax subtracts the row's largest logit,
    inf - inf = nan, and nan spreads to the loss and every delta."""
    case = parse_case(OVERFLOW_THEN_INF_MINUS_INF, "nan.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = NumpyEngine().step(case)
    assert np.isnan(result.loss)
    assert np.isnan(result.deltas["layers.0.kernel"]).all()


# -- activations.elementwise ------------------------------------------------------------------------

Z = np.array([[-1.3, -0.2, 0.4, 2.1], [0.7, -2.5, 1.1, 0.05]])


def test_elementwise_builds_da_times_f_prime_and_passes_alpha_on():
    """Kills activations.x_elementwise__mutmut_1 (dA / f') and __mutmut_4 (alpha dropped), also
    when the registries were built before the mutant was switched on: f(z) = alpha z^3 is built
    here, at run time, and its backward checked against central finite differences."""
    cube = activations.elementwise(lambda z, alpha: alpha * z**3, lambda z, a, alpha: 3 * alpha * z**2)
    upstream = np.random.default_rng(5).normal(size=Z.shape)
    alpha = 0.7

    def pulled_back(z):
        return float((cube.forward(z, alpha) * upstream).sum())

    np.testing.assert_allclose(
        cube.backward(upstream, Z, cube.forward(Z, alpha), alpha), gradient(pulled_back, Z), rtol=1e-6, atol=1e-9
    )


def jacobian_is_diagonal(act: Activation, alpha: float = 0.1) -> bool:
    """Whether d f(z)_j / d z_k vanishes for j != k, by central finite differences of f alone."""
    z = Z[:1]
    for j in range(z.shape[1]):
        column = gradient(lambda x, j=j: float(act.forward(x, alpha)[0, j]), z)[0]
        if np.any(np.abs(np.delete(column, j)) > 1e-9):
            return False
    return True


def test_the_elementwise_flag_says_whether_the_jacobian_is_diagonal():
    """Kills activations.x_elementwise__mutmut_10 (flag None) and __mutmut_14 (flag False): an
    activation built by elementwise() is flagged element-wise, and over the whole registry the flag
    agrees with finite differences: only softmax mixes a sample's outputs."""
    built = activations.elementwise(lambda z, alpha: np.sin(z), lambda z, a, alpha: np.cos(z))
    assert built.elementwise is True
    assert jacobian_is_diagonal(built)
    flags = {name: act.elementwise for name, act in activations.ACTIVATIONS.items()}
    assert flags == {name: jacobian_is_diagonal(act) for name, act in activations.ACTIVATIONS.items()}
    assert [name for name, flag in flags.items() if flag is not True] == ["softmax"]


# -- unknown names: the message lists the known ones, comma-separated --------------------------------


def known_names(message: str) -> list[str]:
    return re.search(r"Known: (.*)$", message).group(1).split(", ")


def test_an_unknown_activation_lists_every_known_one():
    """Kills activations.x_get__mutmut_3 ("XX, XX" as the separator)."""
    with pytest.raises(ValueError) as info:
        activations.get("swish")
    assert sorted(known_names(str(info.value))) == sorted(["linear", "sigmoid", "tanh", "relu", "leaky_relu", "softmax"])


def test_an_unknown_loss_lists_every_known_one_and_the_alias():
    """Kills losses.x_get__mutmut_7 ("XX, XX" as the separator)."""
    with pytest.raises(ValueError) as info:
        losses.get("hinge")
    known = ["mse", "mae", "categorical_crossentropy", "cce", "binary_crossentropy", "bce"]
    known += ["sparse_categorical_crossentropy", "scce", "huber"]
    assert sorted(known_names(str(info.value))) == sorted(known)


# -- the case's dtype, through every activation and loss ---------------------------------------------


@pytest.mark.parametrize("hidden", ["linear", "sigmoid", "tanh", "relu", "{name: leaky_relu, alpha: 0.2}"])
@pytest.mark.parametrize(
    "loss, last, targets",
    [
        ("mse", "linear", "{random: normal}"),
        ("{name: mae, reduction: sum, scale: 0.5}", "sigmoid", "{random: normal}"),
        ("categorical_crossentropy", "softmax", "{random: one_hot}"),
    ],
)
def test_a_float32_case_stays_float32_through_every_activation_and_loss(hidden, loss, last, targets):
    """The SPEC: every engine computes in the case's dtype. Catches a derivative that builds its
    mask in NumPy's default float64, e.g. relu's (z > 0).astype(None) for .astype(z.dtype), a
    mutant of a module-level lambda that mutmut itself does not generate (docs/mutation.md)."""
    case = parse_case(
        f"""
dtype: float32
seed: 3
loss: {loss}
lr: 0.1
inputs: {{random: uniform, shape: [4, 3], low: -1, high: 1}}
targets: {targets}
layers:
  - {{units: 5, activation: {hidden}, bias: {{random: normal, std: 0.5}}}}
  - {{units: 3, activation: {last}}}
""",
        "dtype.yaml",
    )
    result = NumpyEngine().step(case)
    arrays = {f"deltas {name}": delta for name, delta in result.deltas.items()}
    for i, trace in enumerate(result.trace):
        arrays.update(
            {f"layers.{i}.{q}": getattr(trace, q) for q in ("Z", "A", "dA", "dZ", "dW", "db") if getattr(trace, q) is not None}
        )
    assert {name: a.dtype.name for name, a in arrays.items()} == dict.fromkeys(arrays, "float32")
