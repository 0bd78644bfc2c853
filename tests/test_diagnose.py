"""Faulty engines registered through the entry point are blamed, at the right layer and quantity."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from manualprop import cli, engines, harness, parse_case
from manualprop.verdict import results

import faulty_engines

FRAMEWORKS = [n for n, m in (("torch", "torch"), ("keras", "keras")) if importlib.util.find_spec(m)]

CASE = """
name: three-layers
dtype: float64
seed: 3
loss: mse
lr: 0.2
inputs: {random: uniform, shape: [4, 3], low: -1, high: 1}
targets: {random: normal}
layers:
  - units: 3
    activation: {name: leaky_relu, alpha: 0.1}
    kernel: [[0.9, -0.6, 0.3], [0.2, 0.8, -0.7], [-0.5, 0.4, 0.6]]
    bias: [0.05, -0.05, 0.1]
  - {units: 3, activation: tanh, init: glorot_normal, bias: {random: normal, std: 0.1}}
  - {units: 2, activation: linear, init: glorot_normal}
"""

# engine -> (quantity, layer, words of a hint or None)
EXPECTED = {
    "wrong-derivative": ("dZ", 1, None),
    "dropped-1/N": ("loss gradient", 2, "a factor of the batch size N = 4"),
    "transposed-kernel": ("Z", 0, None),
    "summed-loss": ("loss", None, None),
    "flipped-update": ("delta", None, "a sign flip"),
    "wrong-leaky-slope": ("A", 0, "leaky_relu slope is 0.01, not the case's 0.1"),
}


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    """A distribution that declares the faulty engines in the manualprop.engines group."""
    info = tmp_path / "faulty_engines-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faulty-engines\nVersion: 1.0\n")
    lines = [f"{cls.name} = faulty_engines:{cls.__name__}" for cls in [*faulty_engines.ALL, faulty_engines.TransposedDeltas]]
    (info / "entry_points.txt").write_text("[manualprop.engines]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for cls in [*faulty_engines.ALL, faulty_engines.TransposedDeltas]:
        engines.unregister(cls.name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_oracle_blames_the_faulty_engine_at_the_right_place(faulty, name):
    assert name in engines.names()  # found through the entry point
    case = parse_case(CASE, "three.yaml")
    result = harness.run_case(case, ["numpy", name])
    assert result.verdict == "fail"
    d = result.diagnosis
    quantity, layer, hint = EXPECTED[name]
    assert (d.engine, d.quantity, d.layer) == (name, quantity, layer), d.sentence
    assert result.oracle is not None and result.oracle.engine == "numeric"
    assert d.oracle_distance["numpy"] <= 1 < d.oracle_distance[name]
    assert f"differs first in {name}" in d.sentence
    if layer is not None:
        assert d.line == case.line_of(("layers", layer)) and f"line {d.line}" in d.sentence
    if hint:
        assert any(hint in h for h in d.hints), d.hints


def test_a_delta_reported_transposed_is_called_a_layout_slip(faulty):
    result = harness.run_case(parse_case(CASE, "three.yaml"), ["numpy", "transposed-deltas"])
    d = result.diagnosis
    assert (d.engine, d.quantity) == ("transposed-deltas", "delta")
    assert any("layers.0.kernel: transposed-deltas's delta matches after transposing: a layout slip" in h for h in d.hints), (
        d.hints
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.parametrize("name", ["wrong-derivative", "flipped-update"])
def test_with_three_engines_the_majority_blames_the_odd_one_out(faulty, name):
    result = harness.run_case(parse_case(CASE, "three.yaml"), ["numpy", "torch", name])
    assert result.diagnosis.engine == name and set(result.diagnosis.agreeing) == {"numpy", "torch"}


def test_the_report_and_the_terminal_carry_the_diagnosis(faulty, tmp_path, capsys):
    path = tmp_path / "three.yaml"
    path.write_text(CASE)
    report = tmp_path / "r.json"
    assert cli.main(["run", str(path), "--engines", "numpy,wrong-derivative", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert (
        "diagnosis: layer 1 (tanh, line 14): forward agrees; dZ differs first in wrong-derivative: the activation derivative"
        in out
    )
    assert "oracle (central differences, 128-bit): numpy" in out
    import json

    diagnosis = json.loads(report.read_text())["cases"][0]["diagnosis"]
    assert diagnosis["engine"] == "wrong-derivative" and diagnosis["quantity"] == "dZ" and diagnosis["layer"] == 1


def test_explain_marks_the_first_divergence(faulty, tmp_path, capsys):
    path = tmp_path / "three.yaml"
    path.write_text(CASE)
    assert cli.main(["explain", str(path), "--engines", "numpy,wrong-derivative"]) == 1
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if "<- first divergence" in line]
    assert len(marked) == 1 and marked[0].startswith("layer 1 backward: dZ") and "in wrong-derivative" in marked[0]


NON_FINITE = """
dtype: float32
loss: mse
lr: 0.1
inputs: [[1.0, 2.0]]
targets: [[0.0]]
layers:
  - {units: 2, kernel: [[1.0e20, 1.0e20], [1.0e20, 1.0e20]]}
  - {units: 1, kernel: [[1.0e20], [1.0e20]]}
"""


def test_a_non_finite_value_is_an_outcome_of_its_own_located_where_it_first_appears(tmp_path, capsys):
    result = harness.run_case(parse_case(NON_FINITE, "overflow.yaml"), ["numpy", "numeric"])
    assert result.verdict == "non-finite" and not result.ok
    assert result.runs["numpy"].non_finite == "inf first in layers.1.Z (forward)"
    path = tmp_path / "overflow.yaml"
    path.write_text(NON_FINITE)
    assert cli.main(["run", str(path), "--engines", "numpy"]) == 1
    assert "numpy: a non-finite value: inf first in layers.1.Z (forward)" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_overflow_is_located_too():
    result = harness.run_case(parse_case(NON_FINITE, "overflow.yaml"), ["torch"])
    assert result.runs["torch"].non_finite == "inf first in layers.1.Z (forward)"


def test_a_declared_known_difference_is_reported_as_known(faulty, tmp_path, capsys):
    path = tmp_path / "known.yaml"
    path.write_text(CASE + 'known_differences: {flipped-update: "adds the gradient: a documented convention"}\n')
    assert cli.main(["run", str(path), "--engines", "numpy,flipped-update"]) == 0
    out = capsys.readouterr().out
    assert "KNOWN three-layers" in out and "known difference, flipped-update: adds the gradient" in out
    assert "1 known differences" in out


def test_a_known_difference_that_vanishes_fails_strictly(faulty, tmp_path, capsys):
    path = tmp_path / "vanished.yaml"
    path.write_text(CASE + 'known_differences: {numeric: "said to differ"}\n')
    assert cli.main(["run", str(path), "--engines", "numpy,numeric"]) == 1
    assert "numeric was declared to differ (said to differ), but it agrees" in capsys.readouterr().out


def test_pytest_reports_known_differences_as_xfail_and_vanished_ones_as_failures(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "vanished.case.yaml").write_text(
        CASE + 'engines: [numpy, numeric]\nknown_differences: {numeric: "said to differ"}\n'
    )
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["manualprop.pytest_plugin"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout
    assert "numeric was declared to differ (said to differ), but it agrees" in done.stdout


REGRESSION = Path(__file__).resolve().parent.parent / "cases" / "regressions" / "float32_tanh_saturation.yaml"


def test_float32_rounding_that_the_oracle_explains_is_not_a_mismatch(monkeypatch):
    """Two guards excuse this rounding: the allowance of manualprop.verdict.conditioning (the engines then
    agree outright), and, without it, the oracle finding each engine within the tolerance."""
    from manualprop import load_case
    from manualprop.verdict import conditioning

    case = load_case(REGRESSION)
    assert harness.run_case(case, ["numpy", "numeric", *FRAMEWORKS]).verdict == "pass"
    none = {n: np.zeros_like(p, dtype=np.float64) for n, p in case.parameters().items()} | {"loss": np.zeros(())}
    monkeypatch.setattr(conditioning, "allowance", lambda case, history=None: none)
    result = harness.run_case(case, ["numpy", "numeric", *FRAMEWORKS])
    apart = [c for c in result.comparisons if not c.ok]
    assert apart and all(results.is_rounding(c) for c in apart)  # apart by more than the tolerance ...
    assert result.ok and result.verdict == "pass"  # ... yet each within it of the float64 oracle


def test_the_oracle_does_not_excuse_a_real_fault_in_float32(faulty):
    case = parse_case(CASE.replace("dtype: float64", "dtype: float32"), "three32.yaml")
    result = harness.run_case(case, ["numpy", "wrong-derivative"])
    assert result.verdict == "fail" and result.diagnosis.engine == "wrong-derivative"
    assert not any(results.is_rounding(c) for c in result.comparisons if c.param == "layers.1.kernel")
