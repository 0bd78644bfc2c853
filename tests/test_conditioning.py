"""The rounding of a gradient that is nearly nothing (terms that cancel, a saturated tanh, a sign
of y - t lost to rounding), through an update normalized by sqrt(v) or through several steps:
the allowance of manualprop.verdict.conditioning covers it, stays negligible elsewhere, and excuses
nothing that was computed exactly."""

from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from manualprop import harness, load_case
from manualprop.verdict import conditioning
from manualprop.verdict.compare import tolerated

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


def _without_allowance(case, history=None):
    params = case.parameters()
    return {
        **{n: np.zeros_like(p, dtype=np.float64) for n, p in params.items()},
        "loss": np.zeros(case.steps) if case.steps > 1 else 0.0,
    }


@pytest.mark.parametrize(
    "name, apart",
    [
        ("sgd_tanh_saturated_float32_three_steps", "layers.1.kernel"),  # plain SGD: 1 - a^2 at a ~ 1
        ("adam_mae_sign_rounded_away_float32", "loss"),  # the loss before step 2, moved by step 1's spread
    ],
)
def test_rounding_found_by_the_fuzzer_is_excused_and_only_by_the_allowance(name, apart, monkeypatch):
    case = load_case(CASES / "regressions" / f"{name}.yaml")
    assert harness.run_case(case, ["numpy", "torch"]).verdict == "pass"
    monkeypatch.setattr(conditioning, "allowance", _without_allowance)
    failing = [c.param for c in harness.run_case(case, ["numpy", "torch"]).comparisons if not c.ok]
    assert apart in failing


def test_the_state_carries_the_spread_of_earlier_gradients_to_the_exact_trajectory():
    """Adam's first step is lr sign(g) whatever g's rounding; the second step's m / sqrt(v) is
    not. The exact trajectory (the numeric engine, 128-bit) moves layers.0.kernel[0][3] 0.019 away
    from both float32 engines: the allowance reaches that far there, and is small elsewhere."""
    case = load_case(CASES / "regressions" / "adam_mae_sign_rounded_away_float32.yaml")
    runs = {name: harness.run_engine(case, name) for name in ("numpy", "numeric")}
    apart = np.abs(runs["numpy"].output.deltas["layers.0.kernel"] - runs["numeric"].output.deltas["layers.0.kernel"])
    allowed = conditioning.allowance(case, runs["numpy"].output.history)["layers.0.kernel"]
    assert apart[0, 3] > 0.01 and 2 * allowed[0, 3] >= apart[0, 3]
    assert np.median(allowed) < 1e-5


def test_what_is_computed_exactly_gets_no_allowance():
    """relu'(0) = 0 is a convention the frameworks share: a ReLU whose Z is exactly 0 (dyadic
    numbers, computed exactly) is not moved to either side of its kink, so an engine taking
    relu'(0) = 1 still fails; and a case with zero tolerance asks for the same bits."""
    relu = load_case(CASES / "activations" / "relu_zero_preactivation.yaml")
    initial = relu.parameters()
    allowed = conditioning.allowance(relu)
    assert all(np.all(allowed[n] < 0.05 * tolerated(relu.rtol, relu.atol, 0.0, p)) for n, p in initial.items())  # 1% measured
    exact = load_case(next(CASES.rglob("exact_dyadic_zero_tolerance.yaml")))
    assert not any(np.any(a) for a in conditioning.allowance(exact).values())


def test_an_engine_with_the_other_relu_convention_still_fails(monkeypatch):
    from manualprop.reference import activations

    relu = activations.ACTIVATIONS["relu"]
    monkeypatch.setitem(
        activations.ACTIVATIONS, "relu", activations.elementwise(relu.forward, lambda z, a, alpha: (z >= 0).astype(z.dtype))
    )
    result = harness.run_case(load_case(CASES / "activations" / "relu_zero_preactivation.yaml"), ["numpy", "torch"])
    assert result.verdict == "fail"


def test_a_nan_or_an_infinity_is_never_within_an_unbounded_allowance():
    from manualprop.verdict.compare import compare

    for a, b in [(np.inf, np.inf), (np.nan, np.nan), (np.inf, 1.0)]:
        assert not compare("p", "a", np.array([a]), "b", np.array([b]), 1e-4, 1e-6, allowance=np.inf).ok


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


def _with_steps(path: Path, steps: int):
    from manualprop import parse_case

    text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("steps:"))
    return parse_case(f"{text}\nsteps: {steps}\n", str(path))


def test_exact_parameters_stay_exact_over_the_steps():
    """A ReLU exactly at its kink stays there over three exact SGD steps (dyadic numbers, lr
    0.25): the parameters an engine holds after a step are exact too, so nothing is excused."""
    case = _with_steps(CASES / "activations" / "relu_zero_preactivation.yaml", 3)
    allowed = conditioning.allowance(case)
    assert all(np.all(allowed[n] < 0.01 * tolerated(case.rtol, case.atol, 0.0, p)) for n, p in case.parameters().items())


def test_a_gradient_that_is_exactly_zero_in_any_order_gets_no_allowance():
    """MAE over four samples, two signs each way: the output bias's gradient is +-1/4 summed, 0 in
    whatever order an engine adds it, so RMSprop's lr / epsilon slope there excuses nothing."""
    case = load_case(CASES / "optimizers" / "rmsprop_centered_float32.yaml")
    assert not conditioning.allowance(case)["layers.2.bias"].any()


def test_what_only_the_allowance_excuses_is_said(capsys):
    from manualprop import cli

    case = CASES / "regressions" / "adam_mae_sign_rounded_away_float32.yaml"
    assert cli.main(["run", str(case), "--engines", "numpy,torch"]) == 0
    out = capsys.readouterr().out
    assert "within what rounding can move there" in out and "not compared closer than that" in out
    excused = [c for c in harness.run_case(load_case(case), ["numpy", "torch"]).comparisons if "excused" in c.extra]
    assert excused and all(c.ok and c.extra["excused"]["beyond_tolerance"] > 1 for c in excused)
    assert "excused" in excused[0].to_json()


def test_an_engine_whose_slip_widens_its_own_estimate_is_held_to_the_other_one():
    """The allowance of a pair is the smaller of the two engines' own estimates: a student's tanh'
    = 1 - a (its trace, its gradients) on the saturated case still fails against PyTorch."""
    from manualprop import engines
    from manualprop.reference import activations
    from manualprop.reference.engine import NumpyEngine

    tanh = activations.ACTIVATIONS["tanh"]
    slipped = MappingProxyType(
        {**activations.ACTIVATIONS, "tanh": activations.elementwise(tanh.forward, lambda z, a, alpha: 1 - a)}
    )

    class Student(NumpyEngine):
        name = "student"
        activations = slipped

    engines.register("student", Student)
    try:
        case = load_case(CASES / "regressions" / "sgd_tanh_saturated_float32_three_steps.yaml")
        result = harness.run_case(case, ["student", "torch"])
    finally:
        engines.unregister("student")
    assert result.verdict == "fail"
