"""The right engine is blamed, and the hints agree with where the divergence starts.

Slips are made in the NumPy reference itself through its registries (no file is edited), and
faulty engines are registered through the public registry. The oracle shares nothing with the
NumPy engine, so a slip in the reference is blamed on the reference.
"""

import importlib.util
import json
import re

import numpy as np
import pytest

from manualprop import cli, engines, harness, parse_case
from manualprop.engines import StepResult
from manualprop.reference import activations
from manualprop.reference.engine import NumpyEngine

from test_golden import CASE as CASE_FOR_GOLDEN_VALUES

HAS_TORCH = importlib.util.find_spec("torch") is not None

CASE = """
dtype: float64
seed: 3
loss: mse
lr: 0.25
inputs: {random: uniform, shape: [4, 3], low: -1, high: 1}
targets: {random: normal}
layers:
  - {units: 3, activation: sigmoid, init: glorot_normal, bias: {random: normal, std: 0.1}}
  - {units: 3, activation: {name: leaky_relu, alpha: 0.2}, init: glorot_normal, bias: {random: normal, std: 0.1}}
  - {units: 2, activation: linear, init: glorot_normal}
"""


@pytest.fixture
def case_file(tmp_path):
    path = tmp_path / "slip.yaml"
    path.write_text(CASE)
    return path


def _sigmoid_slip(monkeypatch):
    """A sigmoid forward of 1 / (1 + e^z), its derivative a (1 - a) as before."""
    sigmoid = activations.ACTIVATIONS["sigmoid"]
    monkeypatch.setitem(
        activations.ACTIVATIONS,
        "sigmoid",
        activations.elementwise(lambda z, alpha: 1 / (1 + np.exp(z)), lambda z, a, alpha: a * (1 - a)),
    )
    return sigmoid


def _leaky_slip(monkeypatch):
    """leaky_relu with slope 0.01 in forward and backward, whatever alpha says: self-consistent."""
    monkeypatch.setitem(
        activations.ACTIVATIONS,
        "leaky_relu",
        activations.elementwise(lambda z, alpha: np.where(z > 0, z, 0.01 * z), lambda z, a, alpha: np.where(z > 0, 1.0, 0.01)),
    )


SLIPS = {"sigmoid forward": (_sigmoid_slip, 0, "A"), "leaky slope 0.01": (_leaky_slip, 1, "A")}


def _diagnosis(report):
    return json.loads(report.read_text())["cases"][0]["diagnosis"]


@pytest.mark.parametrize("slip", sorted(SLIPS))
def test_a_slip_in_the_reference_fails_against_the_oracle_alone(slip, case_file, tmp_path, monkeypatch):
    make, layer, quantity = SLIPS[slip]
    report = tmp_path / "r.json"
    assert cli.main(["run", str(case_file), "--engines", "numpy,numeric", "--json", str(report)]) == 0  # before the slip
    make(monkeypatch)
    assert cli.main(["run", str(case_file), "--engines", "numpy,numeric", "--json", str(report)]) == 1
    d = _diagnosis(report)
    assert (d["engine"], d["quantity"], d["layer"]) == ("numpy", quantity, layer), d  # one engine against the oracle


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("slip", sorted(SLIPS))
def test_a_slip_in_the_reference_is_blamed_on_the_reference_not_on_torch(slip, case_file, tmp_path, monkeypatch):
    make, layer, quantity = SLIPS[slip]
    make(monkeypatch)
    report = tmp_path / "r.json"
    assert cli.main(["run", str(case_file), "--engines", "numpy,torch", "--json", str(report)]) == 1
    d = _diagnosis(report)
    assert (d["engine"], d["quantity"], d["layer"], d["agreeing"]) == ("numpy", quantity, layer, ["torch"]), d
    assert d["oracle_distance"]["torch"] <= 1 < d["oracle_distance"]["numpy"]


# -- faulty engines, registered through the public registry -------------------------------------


class LearningRateTwiceOnBiases(NumpyEngine):
    """Applies the learning rate twice to the biases: p - lr * (lr * g)."""

    name = "lr-twice-on-biases"

    def step(self, case):
        result = super().step(case)
        deltas = {k: (v * case.dtype.type(case.lr) if k.endswith("bias") else v) for k, v in result.deltas.items()}
        return StepResult(result.loss, deltas, result.trace)


class SlightlyOff(NumpyEngine):
    """Every delta off by a relative 1e-8: past the float64 tolerance (rtol 1e-9), far from any slip."""

    name = "slightly-off"

    def step(self, case):
        result = super().step(case)
        return StepResult(result.loss, {k: v * (1 + 1e-8) for k, v in result.deltas.items()}, result.trace)


class Float32Slope(NumpyEngine):
    """TensorFlow's convention: a float64 model's leaky slope rounded to float32."""

    name = "float32-slope"

    def step(self, case):
        import dataclasses

        layers = tuple(dataclasses.replace(layer, alpha=float(np.float32(layer.alpha))) for layer in case.layers)
        return super().step(dataclasses.replace(case, layers=layers))


class WrongBackpropWeights(NumpyEngine):
    """Passes the gradient down through the top layer's W instead of W.T (square layers only)."""

    name = "backprop-through-W"

    def step(self, case):
        import dataclasses

        from manualprop.reference import engine as reference

        last = len(case.layers) - 1
        top = dataclasses.replace(case.layers[last], kernel=case.layers[last].kernel.T.copy())
        traces = reference.forward(case)  # the forward pass with the right kernel
        reference.backward(dataclasses.replace(case, layers=(*case.layers[:last], top)), traces)  # W.T.T = W below
        traces[last].dW = traces[last - 1].A.T @ traces[last].dZ
        deltas = {
            name: -case.lr * g
            for name, g in (
                *((f"layers.{i}.kernel", t.dW) for i, t in enumerate(traces)),
                *((f"layers.{i}.bias", t.db) for i, t in enumerate(traces)),
            )
        }
        return StepResult(reference.loss_value(case, traces), deltas, traces)


class CrashesInBackward(NumpyEngine):
    """A shape error in its backward pass."""

    name = "crashes-in-backward"

    def step(self, case):
        from manualprop.reference import engine as reference

        traces = reference.forward(case)
        traces[-1].dZ = np.zeros((1, 5))  # the wrong shape: dW = A_prev.T @ dZ cannot be formed
        reference.backward(case, traces, self.activations, self.losses)
        return StepResult(0.0, {}, traces)


class NotInstalled(NumpyEngine):
    name = "not-installed"

    def unavailable(self):
        return 'its framework is missing: pip install "not-installed"'


FAULTY = [LearningRateTwiceOnBiases, SlightlyOff, Float32Slope, WrongBackpropWeights, CrashesInBackward, NotInstalled]


@pytest.fixture
def faulty():
    for cls in FAULTY:
        engines.register(cls.name, cls)
    yield
    for cls in FAULTY:
        engines.unregister(cls.name)


BATCH4 = """
dtype: float64
seed: 5
loss: mse
lr: 0.25
inputs: {random: uniform, shape: [4, 3], low: -1, high: 1}
targets: {random: normal, shape: [4, 2]}
layers:
  - {units: 3, activation: tanh, init: glorot_normal, bias: {random: normal, std: 0.3}}
  - {units: 2, activation: linear, init: glorot_normal, bias: {random: normal, std: 0.3}}
"""


def test_the_learning_rate_applied_twice_is_blamed_without_a_reduction_hint(faulty):
    result = harness.run_case(parse_case(BATCH4, "lr.yaml"), ["numpy", "lr-twice-on-biases"])
    d = result.diagnosis
    assert (d.engine, d.quantity) == ("lr-twice-on-biases", "delta"), d.sentence
    assert "every intermediate agrees" in d.sentence
    text = " ".join(d.hints)
    assert "1/N" not in text and "mean" not in text and "sum" not in text, d.hints
    assert any("learning rate applied twice (lr = 0.25)" in h and "layers.0.bias, layers.1.bias" in h for h in d.hints), d.hints


def test_a_delta_off_by_a_relative_1e_8_gets_no_constant_factor_hint(faulty):
    result = harness.run_case(parse_case(BATCH4, "off.yaml"), ["numpy", "slightly-off"])
    d = result.diagnosis
    assert result.verdict == "fail" and d.engine == "slightly-off", d.sentence  # the oracle is precise enough in float64
    assert not any("factor" in h or "times the others" in h for h in d.hints), d.hints


def test_a_float32_rounded_slope_is_printed_with_the_digits_that_differ(faulty):
    case = parse_case(CASE.replace("alpha: 0.2", "alpha: 0.1"), "slope.yaml")
    d = harness.run_case(case, ["numpy", "float32-slope"]).diagnosis
    assert (d.engine, d.quantity, d.layer) == ("float32-slope", "A", 1), d.sentence
    assert any("slope is 0.10000000149011612, not the case's 0.1 " in h for h in d.hints), d.hints


def test_a_da_divergence_names_the_upper_layer_and_its_weights(faulty):
    square = BATCH4.replace("units: 2, activation: linear", "units: 3, activation: linear").replace(
        "shape: [4, 2]", "shape: [4, 3]"
    )
    case = parse_case(square, "square.yaml")
    d = harness.run_case(case, ["numpy", "backprop-through-W"]).diagnosis
    assert (d.engine, d.quantity, d.layer, d.line) == ("backprop-through-W", "dA", 1, case.line_of(("layers", 1))), d.sentence
    assert d.sentence.startswith(f"layer 1 (linear, line {d.line}): ") and "passed down to layer 0" in d.sentence
    assert "W.T" in d.sentence


def _unmutated(text: str) -> str:
    """``text`` with mutmut's name for a function's original body (``x_backward__mutmut_orig``, the
    frame a crash is in when the suite runs on mutmut's copy, docs/mutation.md) put back to its name."""
    return re.sub(r"\bx_(\w+?)__mutmut_orig\b", r"\1", text)


def test_a_crash_is_a_finding_everywhere(faulty, tmp_path, capsys):
    path = tmp_path / "crash.yaml"
    path.write_text(BATCH4)
    report = tmp_path / "r.json"
    assert cli.main(["run", str(path), "--engines", "numpy,crashes-in-backward", "--json", str(report)]) == 1
    out = _unmutated(capsys.readouterr().out)
    assert "crashes-in-backward crashed in dense_backward (layers.py:" in out and "ValueError" in out
    d = _diagnosis(report)
    assert (
        d["quantity"] == "crash"
        and d["engine"] == "crashes-in-backward"
        and "in dense_backward (layers.py:" in _unmutated(d["sentence"])
    )
    assert cli.main(["explain", str(path), "--engines", "numpy,crashes-in-backward,not-installed"]) == 1
    out = _unmutated(capsys.readouterr().out)
    assert "crashes-in-backward did not run (error): crashed in dense_backward (layers.py:" in out
    assert 'not-installed did not run (skipped): its framework is missing: pip install "not-installed"' in out


def test_pytest_reports_a_crash_with_where_it_happened(faulty, tmp_path):
    import subprocess
    import sys

    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "crash.case.yaml").write_text(BATCH4 + "engines: [numpy, crashes-in-backward]\n")
    (tmp_path / "conftest.py").write_text(
        "import sys\nsys.path.insert(0, {!r})\nimport test_blame\nfrom manualprop import engines\n"
        "engines.register('crashes-in-backward', test_blame.CrashesInBackward)\n"
        'pytest_plugins = ["manualprop.pytest_plugin"]\n'.format(str(__import__("pathlib").Path(__file__).parent))
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout
    assert "crashes-in-backward crashed in dense_backward (layers.py:" in done.stdout


def test_one_engine_against_the_oracle_alone_gets_a_diagnosis(faulty):
    d = harness.run_case(parse_case(BATCH4, "alone.yaml"), ["lr-twice-on-biases", "numeric"]).diagnosis
    assert d is not None and d.engine == "lr-twice-on-biases" and d.quantity == "delta"


def test_when_the_vote_and_the_oracle_disagree_nobody_is_blamed(faulty, monkeypatch):
    """Two engines share a slip (the same wrong slope), the third is right: the majority blames the
    right one, the oracle the other two. The diagnosis says so rather than pick."""
    monkeypatch.setattr(Float32Slope, "step", lambda self, case: _with_slope(case, 0.01))
    engines.register("wrong-slope-too", type("WrongSlopeToo", (Float32Slope,), {"name": "wrong-slope-too"}))
    try:
        result = harness.run_case(parse_case(CASE, "vote.yaml"), ["numpy", "float32-slope", "wrong-slope-too"])
    finally:
        engines.unregister("wrong-slope-too")
    d = result.diagnosis
    assert d.engine is None and d.quantity == "A", d.sentence
    assert "the majority blames numpy" in d.sentence and "float32-slope, wrong-slope-too" in d.sentence


def _with_slope(case, alpha):
    import dataclasses

    layers = tuple(dataclasses.replace(layer, alpha=alpha) for layer in case.layers)
    return NumpyEngine().step(dataclasses.replace(case, layers=layers))


class DroppedOneOverN(NumpyEngine):
    """The MSE gradient without its 1/N, in a float32 case with large weights and small deltas."""

    name = "dropped-1/N-f32"

    def step(self, case):
        import dataclasses

        return super().step(dataclasses.replace(case, scale=case.scale * case.inputs.shape[0]))


def test_a_factor_n_is_found_in_float32_despite_the_rounding_of_small_deltas():
    case = parse_case(
        BATCH4.replace("float64", "float32")
        .replace("shape: [4, 3]", "shape: [16, 3]")
        .replace("shape: [4, 2]", "shape: [16, 2]")
        .replace("lr: 0.25", "lr: 0.001")
        .replace("bias: {random: normal, std: 0.3}", "bias: {random: uniform, low: 20, high: 40}"),
        "n32.yaml",
    )
    engines.register(DroppedOneOverN.name, DroppedOneOverN)
    try:
        d = harness.run_case(case, ["numpy", DroppedOneOverN.name]).diagnosis
    finally:
        engines.unregister(DroppedOneOverN.name)
    assert d.engine == DroppedOneOverN.name and d.quantity == "loss", d.sentence
    assert any("a factor of the batch size N = 16" in h for h in d.hints), d.hints


# -- golden values that fail while the engines agree --------------------------------------------

GOLDEN = CASE_FOR_GOLDEN_VALUES


def _golden_case(section: str, key: str, values) -> str:
    rows = repr(np.asarray(values, dtype=np.float64).tolist())
    return GOLDEN + f"expected:\n  {section}: {{{key}: {rows}}}\n"


def _right():
    """What the engines compute (the NumPy engine, held against the oracle by the harness itself)."""
    case = parse_case(GOLDEN, "golden.yaml")
    return case, NumpyEngine().step(case)


def test_a_golden_weight_written_transposed_gets_a_hint_that_says_so(tmp_path):
    case, step = _right()
    updated = case.layers[1].kernel + step.deltas["layers.1.kernel"]  # (in, out): right under kernel:, wrong under weight:
    path = tmp_path / "golden.yaml"
    path.write_text(_golden_case("updated", "layers.1.weight", updated))
    report = tmp_path / "r.json"
    assert cli.main(["run", str(path), "--engines", "numpy", "--json", str(report)]) == 1
    d = _diagnosis(report)
    assert d["engine"] == "expected" and d["quantity"] == "golden values", d
    assert any("transposed" in h and "(in, out) layout" in h and "layers.1.kernel:" in h for h in d["hints"]), d["hints"]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_deltas_written_as_plus_the_gradient_get_a_hint_naming_the_learning_rate_and_the_sign(tmp_path, capsys):
    case, step = _right()
    gradient = -step.deltas["layers.0.bias"] / case.lr
    path = tmp_path / "golden.yaml"
    path.write_text(_golden_case("deltas", "layers.0.bias", gradient))
    report = tmp_path / "r.json"
    assert cli.main(["run", str(path), "--engines", "numpy,torch", "--json", str(report)]) == 1
    d = _diagnosis(report)
    assert d["engine"] == "expected" and d["agreeing"] == ["numpy", "torch"], d
    assert any("sign is flipped" in h and "learning rate 0.1" in h for h in d["hints"]), d["hints"]
    assert "hint: layers.0.bias (deltas): the sign is flipped" in capsys.readouterr().out
