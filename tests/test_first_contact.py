"""A new user's first contact: nothing unverified counts as passed, messages in the case's own
layout, bundled cases by name, install hints that name the extras, a closed pipe, and pytest in
a repository of one's own."""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from manualprop import cli, engines, harness, load_case
from manualprop.engines import StepResult
from manualprop.reference.engine import NumpyEngine

HAS_TORCH = importlib.util.find_spec("torch") is not None

# A 2-3-1 network whose first kernel is given as weight (out, in) = (3, 2).
WEIGHT = """
name: weight-layout
dtype: float64
loss: mse
lr: 0.1
inputs: [[1.0, 2.0], [0.5, -1.0]]
targets: [[0.5], [-0.25]]
layers:
  - units: 3
    activation: tanh
    weight: [[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]]
    bias: [0.0, 0.1, -0.1]
  - {units: 1, kernel: [[0.5], [-0.6], [0.7]]}
"""


class OneElementOff(NumpyEngine):
    """The NumPy engine with one element of the first kernel's delta nudged: (in, out) index (1, 0),
    which is weight[0][1] = -0.2 in the (out, in) layout of the case file."""

    name = "one-element-off"

    def step(self, case):
        result = super().step(case)
        deltas = dict(result.deltas)
        deltas["layers.0.kernel"] = deltas["layers.0.kernel"].copy()
        deltas["layers.0.kernel"][1, 0] += 1e-3
        return StepResult(result.loss, deltas, result.trace)


@pytest.fixture
def off_engine():
    engines.register(OneElementOff.name, OneElementOff)
    yield
    engines.unregister(OneElementOff.name)


@pytest.fixture
def weight_case(tmp_path):
    path = tmp_path / "weight.yaml"
    path.write_text(WEIGHT)
    return path


# -- nothing unverified counts as passed ------------------------------------------------------


def test_one_engine_without_golden_values_is_not_compared_and_exits_5(weight_case, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert cli.main(["run", str(weight_case), "--engines", "numpy", "--json", str(report)]) == cli.EXIT_NOTHING_COMPARED
    out = capsys.readouterr().out
    assert "NOT COMPARED weight-layout" in out and "only numpy ran and the case has no golden values" in out
    assert "1 cases: 0 passed, 0 failed, 0 invalid, 1 not compared" in out
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["compared"] is False and data["counts"] == {"not compared": 1}
    (case,) = data["cases"]
    assert case["ok"] is False and case["compared"] is False and case["verdict"] == "not compared"


def test_a_missing_engine_and_nothing_else_is_not_compared(weight_case, capsys, monkeypatch):
    class Missing:
        name = "missing"

        def unavailable(self):
            return 'frobnicate is not installed (install it with: pip install "manualprop[frobnicate]")'

    engines.register("missing", Missing)
    try:
        assert cli.main(["run", str(weight_case), "--engines", "missing"]) == cli.EXIT_NOTHING_COMPARED
    finally:
        engines.unregister("missing")
    out = capsys.readouterr().out
    assert "no engine ran" in out and "0 passed" in out and "1 not compared" in out


def test_a_run_where_some_cases_compared_counts_the_others_apart_and_exits_0(weight_case, tmp_path, capsys):
    alone = tmp_path / "alone.yaml"
    alone.write_text(WEIGHT + "engines: [numpy]\n")
    assert cli.main(["run", str(weight_case), str(alone), "--engines", "numpy,numeric"]) == cli.EXIT_OK
    assert "2 cases: 1 passed, 0 failed, 0 invalid, 1 not compared" in capsys.readouterr().out


def test_golden_values_alone_are_a_comparison(tmp_path, capsys):
    path = tmp_path / "golden.yaml"
    run = harness.run_case(load_case(_write(tmp_path / "w.yaml", WEIGHT)), ["numpy"])
    path.write_text(WEIGHT + f"expected: {{loss: {run.runs['numpy'].result.loss!r}}}\n")
    assert cli.main(["run", str(path), "--engines", "numpy"]) == cli.EXIT_OK
    assert "1 passed" in capsys.readouterr().out


def test_explain_with_nothing_to_compare_exits_5(weight_case, capsys):
    assert cli.main(["explain", str(weight_case), "--engines", "numpy"]) == cli.EXIT_NOTHING_COMPARED
    assert "not compared: only numpy ran" in capsys.readouterr().err


# -- the case's own layout --------------------------------------------------------------------


def test_a_weight_case_reports_its_worst_element_where_the_file_has_it(weight_case, tmp_path, capsys, off_engine):
    report = tmp_path / "r.json"
    assert cli.main(["run", str(weight_case), "--engines", "numpy,one-element-off", "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "layers.0.weight: numpy and one-element-off disagree (shown (out, in), as the case file gives it)" in out
    assert "worst element at index (0, 1) (before the step -0.2)" in out  # weight[0][1] in the file
    assert "  layers.0.weight  (3, 2)" in out and "  layers.1.kernel  (3, 1)" in out  # the table, in the file's layout
    assert "weight.yaml:11 (layers[0].weight)" in out
    (case,) = json.loads(report.read_text())["cases"]
    (worst,) = [c for c in case["comparisons"] if c["param"] == "layers.0.kernel"]
    assert worst["worst_index"] == [1, 0]  # the report keeps (in, out) and says how the file wrote it
    assert case["layout"] == {"layers.0.kernel": "weight (out, in)", "layers.1.kernel": "kernel (in, out)"}


def test_explain_shows_a_weight_layer_in_the_files_layout_and_the_golden_values(tmp_path, capsys):
    case = load_case(_write(tmp_path / "w.yaml", WEIGHT))
    delta = harness.run_case(case, ["numpy"]).runs["numpy"].result.deltas["layers.0.kernel"]
    golden = np.round(delta.T, 12).tolist()
    path = _write(tmp_path / "g.yaml", WEIGHT + f"expected: {{deltas: {{layers.0.weight: {golden}}}}}\n")
    assert cli.main(["explain", str(path), "--engines", "numpy", "--precision", "12"]) == 0
    out = capsys.readouterr().out
    section = out.split("layers.0.weight (out, in): delta")[1].split("\n\n")[0]
    rows = [line.replace("numpy", "").replace("expected", "").strip(" []") for line in section.splitlines()[1:]]
    shown = np.array([[float(x) for x in r.split()] for r in rows if r])
    assert shown.shape == (6, 2)  # numpy's (3, 2), then the golden values' (3, 2)
    np.testing.assert_allclose(shown[:3], delta.T, atol=1e-12)
    np.testing.assert_allclose(shown[3:], golden, atol=1e-12)
    assert "layer 0 backward: dW, (out, in) as the case gives weight" in out


def test_explain_names_each_gradient_once():
    case_text = WEIGHT
    from manualprop.casefile.case import parse_case
    from manualprop.verdict import explain

    result = harness.run_case(parse_case(case_text, "w.yaml"), ["numpy"])
    headings = {s.heading: s.formula for s in explain.sections(result)}
    assert headings["layer 1 backward: dZ, the error gradient at the output layer"] == "dZ = dL/dZ = dA * f'(Z)"
    assert not any("aggregated" in f for f in headings.values())


# -- golden values that every engine misses: one block -----------------------------------------


def test_engines_that_agree_against_a_golden_value_are_one_block(tmp_path, capsys):
    path = _write(tmp_path / "g.yaml", WEIGHT + "expected: {deltas: {layers.1.bias: [0.5]}}\n")
    assert cli.main(["run", str(path), "--engines", "numpy,numeric"]) == 1
    out = capsys.readouterr().out
    assert out.count("and expected disagree") == 1
    assert "numpy and numeric agree with each other, and the golden values differ from all of them" in out
    assert "layers.1.bias (deltas): numpy, numeric and expected disagree" in out


def test_an_engine_alone_against_golden_values_keeps_its_own_block(tmp_path, off_engine):
    case = load_case(_write(tmp_path / "w.yaml", WEIGHT))
    delta = harness.run_case(case, ["numpy"]).runs["numpy"].result.deltas["layers.0.kernel"]
    path = _write(tmp_path / "g.yaml", WEIGHT + f"expected: {{deltas: {{layers.0.weight: {delta.T.tolist()}}}}}\n")
    result = harness.run_case(load_case(path), ["numpy", "one-element-off"])
    groups = harness.golden_groups(result)
    assert [names for names, _ in groups] == [["one-element-off"]]


# -- names, hints, pipes ------------------------------------------------------------------------


def test_run_and_explain_accept_a_bundled_case_by_name(capsys):
    assert cli.main(["run", "seed004-batch-linear-linear", "--engines", "numpy", "-q"]) == 0  # it has golden values
    assert "1 passed" in capsys.readouterr().out
    assert cli.main(["explain", "seed004_batch_linear_linear", "--engines", "numpy"]) == 0
    assert "seed004-batch-linear-linear" in capsys.readouterr().out


def test_an_unknown_name_suggests_bundled_cases(capsys):
    assert cli.main(["explain", "seed004"]) == cli.EXIT_INVALID
    err = capsys.readouterr().err
    assert "no bundled case named 'seed004'; did you mean 'seed004-batch-linear-linear' or 'seed004-single-sigmoid'?" in err


def test_fuzz_without_hypothesis_exits_2_naming_the_extra(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hypothesis" else real(name, *a))
    assert cli.main(["fuzz", "--n", "1", "--out", str(tmp_path)]) == cli.EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert err == 'manualprop fuzz: needs hypothesis, which is not installed: pip install "manualprop[fuzz]"'


def test_the_all_extra_installs_what_every_command_needs():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("hypothesis") for r in extras["fuzz"])
    assert {"torch", "tf", "fuzz"} <= set(extras["all"][0].split("[")[1].rstrip("]").split(","))


def test_install_hints_name_the_extras(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "keras") else real(name, *a))
    torch_reason, keras_reason = engines.get("torch").unavailable(), engines.get("keras").unavailable()
    assert 'pip install "manualprop[torch]"' in torch_reason and "download.pytorch.org/whl/cpu" in torch_reason
    assert 'pip install "manualprop[tf]"' in keras_reason


def test_a_closed_pipe_ends_quietly():
    """`manualprop run | head -1`: the reader goes away after one line."""
    run = subprocess.Popen(
        [sys.executable, "-m", "manualprop.cli", "run", "--engines", "numpy,numeric"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run.stdout.readline()
    run.stdout.close()
    err = run.stderr.read().decode()
    assert run.wait(timeout=300) == cli.EXIT_PIPE_CLOSED
    assert err == ""


def test_report_says_what_it_wrote(tmp_path, weight_case, capsys):
    report = tmp_path / "r.json"
    cli.main(["run", str(weight_case), "--engines", "numpy,numeric", "--json", str(report)])
    capsys.readouterr()
    assert cli.main(["report", str(report), "--markdown", str(tmp_path / "t.md"), "--table-json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert f"wrote the Markdown table (1 case x 1 column) to {tmp_path / 't.md'}" in out
    assert f"wrote the table as JSON (1 case x 1 column) to {tmp_path / 't.json'}" in out


# -- pytest in a repository of one's own --------------------------------------------------------


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsx", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_fresh_folder_with_one_case_file_is_collected_by_pytest(tmp_path):
    """The README's set-up for a repository of one's own: manualprop installed, a file named
    *.case.yaml. No conftest.py, no ini file."""
    folder = tmp_path / "course"
    (folder / "homework").mkdir(parents=True)
    _write(folder / "homework" / "a7.case.yaml", WEIGHT + "engines: [numpy, numeric]\n")
    _write(folder / "homework" / "notes.yaml", "just: some yaml\n")  # not a case: not collected
    done = _pytest(folder, "--collect-only", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "homework/a7.case.yaml::weight-layout[numpy-vs-numeric]" in done.stdout and "notes.yaml" not in done.stdout
    done = _pytest(folder)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


def test_the_ini_option_collects_other_files_and_not_compared_is_a_skip(tmp_path):
    folder = tmp_path / "team"
    (folder / "checks").mkdir(parents=True)
    _write(folder / "pytest.ini", "[pytest]\nmanualprop_files = checks/*.yaml\n")
    _write(folder / "checks" / "alone.yaml", WEIGHT + "engines: [numpy]\n")
    done = _pytest(folder)
    assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout + done.stderr
    assert "not compared: the case selects numpy and has no golden values" in done.stdout


def test_pytest_prints_one_block_when_engines_agree_against_a_golden_value(tmp_path):
    folder = tmp_path / "course"
    folder.mkdir()
    _write(folder / "g.case.yaml", WEIGHT + "engines: [numpy, numeric]\nexpected: {deltas: {layers.1.bias: [0.5]}}\n")
    done = _pytest(folder)
    assert done.returncode == 1 and "1 failed, 1 passed" in done.stdout, done.stdout
    assert done.stdout.count("and expected disagree") == 1
    assert "numpy and numeric agree with each other" in done.stdout and "diagnosis: the golden values differ" in done.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# -- found in review: crashes and vanished differences under pytest, hints in the file's layout ----

CRASHING_CONFTEST = """
from manualprop import engines


class Crash:
    name = "crash"

    def unavailable(self):
        return None

    def step(self, case):
        raise RuntimeError("boom")


engines.register("crash", Crash)
"""


def test_pytest_fails_golden_values_that_a_crashed_engine_never_reached(tmp_path):
    folder = tmp_path / "course"
    folder.mkdir()
    _write(folder / "conftest.py", CRASHING_CONFTEST)
    _write(folder / "g.case.yaml", WEIGHT + "engines: [crash]\nexpected: {loss: 1.0}\n")
    _write(folder / "alone.case.yaml", WEIGHT.replace("weight-layout", "alone") + "engines: [crash]\n")
    done = _pytest(folder)
    assert done.returncode == 1 and "2 failed" in done.stdout, done.stdout
    assert "crash crashed in step" in done.stdout and "RuntimeError: boom" in done.stdout


def test_pytest_fails_a_known_difference_that_vanished_against_golden_values(tmp_path):
    loss = harness.run_case(load_case(_write(tmp_path / "w.yaml", WEIGHT)), ["numpy"]).runs["numpy"].result.loss
    folder = tmp_path / "course"
    folder.mkdir()
    _write(
        folder / "k.case.yaml",
        WEIGHT + f'engines: [numpy]\nknown_differences: {{numpy: "said to differ"}}\nexpected: {{loss: {loss!r}}}\n',
    )
    done = _pytest(folder)
    assert done.returncode == 1 and "numpy was declared to differ (said to differ), but it agrees" in done.stdout, done.stdout


class DoubledDeltas(NumpyEngine):
    """The NumPy engine with every delta doubled (lr taken twice)."""

    name = "doubled"

    def step(self, case):
        result = super().step(case)
        return StepResult(result.loss, {k: 2 * v for k, v in result.deltas.items()}, result.trace)


def test_hints_name_a_weight_parameter_as_the_file_does(weight_case, capsys):
    engines.register(DoubledDeltas.name, DoubledDeltas)
    try:
        assert cli.main(["run", str(weight_case), "--engines", "numpy,doubled"]) == 1
    finally:
        engines.unregister(DoubledDeltas.name)
    hints = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("hint:")]
    assert any("layers.0.weight" in h for h in hints), hints
    assert not any("layers.0.kernel" in h for h in hints), hints


def test_a_column_of_inputs_is_called_transposed_only_when_the_targets_agree():
    from manualprop.casefile.case import parse_case
    from manualprop.casefile.errors import CaseError

    column = WEIGHT.replace("inputs: [[1.0, 2.0], [0.5, -1.0]]", "inputs: [[1.0], [2.0]]")  # (2, 1): 1 sample of 2?
    with pytest.raises(CaseError) as backed:
        parse_case(column.replace("targets: [[0.5], [-0.25]]", "targets: [[0.5]]"), "c.yaml")
    assert "transposed?" in str(backed.value)
    with pytest.raises(CaseError) as unbacked:  # two rows of targets: the inputs hold two samples, not one
        parse_case(column, "c.yaml")
    assert "transposed?" not in str(unbacked.value)
