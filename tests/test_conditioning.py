"""The rounding of a gradient that cancels to nothing, through an update normalized by sqrt(v):
the allowance of manualprop.conditioning covers it, and stays negligible elsewhere."""

from pathlib import Path

import numpy as np
import pytest

from manualprop import conditioning, harness, load_case
from manualprop.compare import tolerated

CASES = Path(__file__).resolve().parent.parent / "cases"
CANCELLING = CASES / "regressions" / "adam_mae_gradient_cancelling_float64.yaml"
torch = pytest.importorskip("torch")


def test_rounding_that_adam_amplifies_is_not_a_mismatch():
    result = harness.run_case(load_case(CANCELLING), ["numpy", "torch"])
    assert result.verdict == "pass", [c.message for c in result.comparisons if not c.ok]


def test_without_the_allowance_the_same_case_is_a_false_alarm(monkeypatch):
    zeros = lambda case, history=None: {n: np.zeros_like(p, dtype=np.float64) for n, p in case.parameters().items()}  # noqa: E731
    monkeypatch.setattr(conditioning, "allowance", zeros)
    result = harness.run_case(load_case(CANCELLING), ["numpy", "torch"])
    assert result.verdict == "fail"  # NumPy -2.1e-11, PyTorch 0 on a bias: the allowance is what tells them apart


def test_plain_sgd_and_momentum_get_no_allowance():
    case = load_case(CASES / "optimizers" / "sgd_momentum_float64.yaml")
    assert all(not a.any() for a in conditioning.allowance(case).values())


@pytest.mark.parametrize(
    "name", ["keras_adam_epsilon_uncorrected", "keras_rmsprop_epsilon_inside_sqrt", "keras_adagrad_epsilon_inside_sqrt"]
)
def test_the_allowance_is_negligible_where_keras_differs(name):
    """Keras's epsilon placements show where g is far from zero; there the allowance is a tiny
    fraction of the tolerance, so it hides none of them."""
    case = load_case(CASES / "canaries" / f"{name}.yaml")
    allowed = conditioning.allowance(case)
    apart = {c.param: c.max_abs_diff for c in harness.run_case(case, ["numpy", "torch"]).comparisons}
    for param, initial in case.parameters().items():
        assert np.all(allowed[param] < 0.1 * tolerated(case.rtol, case.atol, 0.0, initial))  # a tenth of the tolerance at most
        assert apart[param] <= tolerated(case.rtol, case.atol, 0.0, initial).max()  # NumPy and PyTorch agree without it
