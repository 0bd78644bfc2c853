"""The command line: exit statuses, the JSON report's keys, skips, and the schema command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from manualprop import cli, engines
from manualprop.engines import StepResult
from manualprop.reference.engine import NumpyEngine

GOOD = """
name: tiny
loss: mse
lr: 0.1
inputs: [[1.0, 2.0]]
targets: [[0.5]]
layers:
  - {units: 2, activation: tanh, kernel: [[0.1, -0.2], [0.3, 0.4]], bias: [0.0, 0.1]}
  - {units: 1, kernel: [[0.5], [-0.6]]}
"""


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


class SignFlipEngine(NumpyEngine):
    """The NumPy engine with its update sign flipped: p + lr * g."""

    name = "signflip"

    def step(self, case):
        result = super().step(case)
        return StepResult(result.loss, {k: -v for k, v in result.deltas.items()})


class ForgetfulEngine(NumpyEngine):
    """The NumPy engine, losing the last bias on the way out."""

    name = "forgetful"

    def step(self, case):
        result = super().step(case)
        result.deltas.pop(f"layers.{len(case.layers) - 1}.bias")
        return result


class CrashingEngine:
    name = "crashing"

    def unavailable(self):
        return None

    def step(self, case):
        raise RuntimeError("boom")


class MissingEngine:
    name = "missing"

    def unavailable(self):
        return "frobnicate is not installed (install it with: pip install frobnicate)"

    def step(self, case):
        raise AssertionError("a skipped engine must not run")


@pytest.fixture
def extra_engines():
    for cls in (SignFlipEngine, ForgetfulEngine, CrashingEngine, MissingEngine):
        engines.register(cls.name, cls)
    yield
    for cls in (SignFlipEngine, ForgetfulEngine, CrashingEngine, MissingEngine):
        engines.unregister(cls.name)


def test_all_hold_exits_0_and_writes_the_spec_report(good, tmp_path, capsys, extra_engines):
    out = tmp_path / "report.json"
    assert cli.main(["run", str(good), "--engines", "numpy,numeric,missing", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert {"python", "numpy", "torch", "tensorflow", "keras"} <= set(report["environment"])
    (case,) = report["cases"]
    assert case["name"] == "tiny" and case["path"].endswith("good.yaml") and case["dtype"] == "float32"
    assert case["engines"]["numpy"]["status"] == "ran"
    assert set(case["engines"]["numpy"]["deltas"]) == {"layers.0.kernel", "layers.0.bias", "layers.1.kernel", "layers.1.bias"}
    assert np.shape(case["engines"]["numpy"]["deltas"]["layers.1.kernel"]) == (2, 1)  # (in, out)
    assert case["engines"]["missing"] == {"status": "skipped", "reason": MissingEngine().unavailable()}
    assert "skipping missing: frobnicate is not installed (install it with: pip install frobnicate)" in capsys.readouterr().out


def test_a_disagreement_exits_1_and_names_the_parameter(good, tmp_path, capsys, extra_engines):
    out = tmp_path / "report.json"
    assert cli.main(["run", str(good), "--engines", "numpy,signflip", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "layers.0.kernel: numpy and signflip disagree" in text
    assert "in the case file: " in text and "good.yaml:8 (layers[0].kernel)" in text
    comparisons = json.loads(out.read_text())["cases"][0]["comparisons"]
    keys = {"param", "a", "b", "max_abs_diff", "max_rel_diff", "atol", "rtol", "ok"}
    assert all(keys <= set(c) for c in comparisons)
    assert {c["param"] for c in comparisons if not c["ok"]} >= {"layers.0.kernel", "layers.1.bias"}


def test_an_engine_that_returns_too_few_deltas_fails(good, capsys, extra_engines):
    assert cli.main(["run", str(good), "--engines", "numpy,forgetful"]) == 1
    assert "layers.1.bias: forgetful returned no delta for it" in capsys.readouterr().out


def test_an_engine_that_crashes_exits_1_with_its_reason(good, capsys, extra_engines):
    assert cli.main(["run", str(good), "--engines", "numpy,crashing"]) == 1
    assert "crashing crashed in step (test_cli.py:" in (out := capsys.readouterr().out) and "RuntimeError: boom" in out


def test_a_wrong_golden_value_exits_1(tmp_path, capsys):
    path = tmp_path / "golden.yaml"
    path.write_text(GOOD + "expected:\n  loss: 0.123\n")
    assert cli.main(["run", str(path), "--engines", "numpy"]) == 1
    assert "loss: numpy and expected disagree" in capsys.readouterr().out


def test_a_right_golden_value_exits_0(tmp_path):
    # loss = (0.5 * tanh(0.7) - 0.6 * tanh(0.7) - 0.5)^2, with z = [0.1*1 + 0.3*2, -0.2*1 + 0.4*2 + 0.1]
    output = 0.5 * np.tanh(0.7) - 0.6 * np.tanh(0.7)
    path = tmp_path / "golden.yaml"
    path.write_text(GOOD + f"expected:\n  loss: {float((output - 0.5) ** 2)!r}\n")
    assert cli.main(["run", str(path), "--engines", "numpy"]) == 0


def test_invalid_wins_over_mismatch(good, tmp_path, extra_engines):
    (tmp_path / "bad.yaml").write_text(GOOD.replace("lr: 0.1", "lr: -1"))
    assert cli.main(["run", str(tmp_path), "--engines", "numpy,signflip"]) == 2


def test_unknown_engine_on_the_command_line_exits_2(good, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", str(good), "--engines", "numpy,jax"])
    assert exit_.value.code == 2
    assert "unknown engine 'jax'; registered: numpy, torch, keras" in capsys.readouterr().err


def test_no_arguments_runs_the_bundled_cases_from_any_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "manualprop.cli", "run", "--engines", "numpy", "--json", "r.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["cases"]) >= 15
    assert all(c["engines"]["numpy"]["status"] == "ran" for c in report["cases"])


def test_numpy_alone_imports_no_framework(good):
    code = (
        "import sys; from manualprop.cli import main; "
        f"rc = main(['run', {str(good)!r}, '--engines', 'numpy']); "
        "loaded = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert rc == 5 and not loaded, (rc, loaded)"  # 5: one engine, no golden values: nothing compared
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_show_deltas_prints_each_engines_arrays(good, capsys):
    assert cli.main(["run", str(good), "--engines", "numpy,numeric", "--show-deltas"]) == 0
    assert "layers.0.kernel delta" in capsys.readouterr().out


def test_schema_describes_the_case_file(capsys):
    assert cli.main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"loss", "lr", "inputs", "targets", "layers"} <= set(schema["required"])
    assert schema["additionalProperties"] is False


def test_the_bundled_cases_validate_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    from manualprop.casefile import yamlsafe
    from manualprop.casefile.schema import json_schema
    from manualprop.harness import bundled_cases

    validator = jsonschema.Draft202012Validator(json_schema())
    paths = sorted(Path(bundled_cases()).rglob("*.yaml"))
    assert paths
    for path in paths:
        validator.validate(yamlsafe.load(path.read_text())[0])
