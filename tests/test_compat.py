"""manualprop report: reports aggregated into the compatibility table, changes highlighted."""

import importlib.util
import json

import pytest

from manualprop import cli, engines, harness, parse_case
from manualprop.engines import StepResult
from manualprop.reference.engine import NumpyEngine
from manualprop.reports import compat, report

CASE = """
name: {name}
loss: mse
lr: 0.1
inputs: [[1.0, 2.0], [0.5, -1.0]]
targets: [[0.5], [0.0]]
layers:
  - {{units: 2, activation: tanh, kernel: [[0.1, -0.2], [0.3, 0.4]]}}
  - {{units: 1, kernel: [[0.5], [-0.6]]}}
"""


class NudgedEngine(NumpyEngine):
    """The NumPy engine with its first kernel's deltas nudged by a factor."""

    name = "nudged"
    factor = 1.0

    def step(self, case):
        result = super().step(case)
        deltas = dict(result.deltas)
        deltas["layers.0.kernel"] = deltas["layers.0.kernel"] * self.factor
        return StepResult(result.loss, deltas)


@pytest.fixture
def nudged():
    engines.register("nudged", NudgedEngine)
    yield NudgedEngine
    engines.unregister("nudged")
    NudgedEngine.factor = 1.0


def write_report(path, label, factor, names=("alpha", "beta")):
    NudgedEngine.factor = factor
    results = [harness.run_case(parse_case(CASE.format(name=n), f"{n}.yaml"), ["numpy", "nudged"]) for n in names]
    report.write(report.build(results, harness.environment(), label=label), path)
    return path


def test_cells_carry_the_verdict_and_the_worst_ratio(tmp_path, nudged):
    good = write_report(tmp_path / "good.json", "cell-a", 1.0)
    bad = write_report(tmp_path / "bad.json", "cell-b", 1.5)
    table = compat.aggregate([(p, compat.load_report(p)) for p in (good, bad)])
    assert [c.label for c in table.columns] == ["cell-a", "cell-b"]
    assert table.cases == ["alpha", "beta"]
    assert table.cells["alpha"]["cell-a"].verdict == "pass" and table.cells["alpha"]["cell-a"].worst_ratio == 0
    failing = table.cells["alpha"]["cell-b"]
    assert failing.verdict == "fail" and failing.worst_ratio > 1 and failing.worst == "layers.0.kernel numpy-nudged"
    markdown = compat.to_markdown(table)
    assert "| case | cell-a | cell-b |" in markdown
    assert "| alpha | ✅ 0% | ❌ " in markdown and "(layers.0.kernel numpy-nudged)" in markdown
    assert table.failed


def test_a_change_since_the_previous_table_is_highlighted(tmp_path, nudged):
    before = write_report(tmp_path / "before.json", "cell", 1.0)
    previous = compat.to_json(compat.aggregate([(before, compat.load_report(before))]))
    # A tiny nudge: still within tolerance, but the bits of nudged's deltas changed.
    after = write_report(tmp_path / "after.json", "cell", 1.0 + 1e-6)
    table = compat.aggregate([(after, compat.load_report(after))])
    compat.mark_changes(table, previous)
    assert table.cells["alpha"]["cell"].verdict == "pass"
    assert table.cells["alpha"]["cell"].change == "numbers changed in nudged"
    # A verdict change.
    worse = write_report(tmp_path / "worse.json", "cell", 2.0)
    table = compat.aggregate([(worse, compat.load_report(worse))])
    compat.mark_changes(table, previous)
    assert table.cells["alpha"]["cell"].change == "was pass 0%"
    assert "🔺 was pass" in compat.to_markdown(table) and "1 cell(s) changed" not in compat.to_markdown(table)


def test_no_change_is_said_too(tmp_path, nudged):
    first = write_report(tmp_path / "first.json", "cell", 1.0)
    table = compat.aggregate([(first, compat.load_report(first))])
    compat.mark_changes(table, compat.to_json(compat.aggregate([(first, compat.load_report(first))])))
    assert "No change since the previous table." in compat.to_markdown(table)


def test_the_html_page_is_self_contained(tmp_path, nudged):
    path = write_report(tmp_path / "r.json", "cell", 1.5)
    page = compat.to_html(compat.aggregate([(path, compat.load_report(path))]))
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert "src=" not in page and "<link" not in page and "<script" not in page
    if importlib.util.find_spec("matplotlib"):
        assert "<svg" in page


def test_the_report_command_writes_every_form_and_exits_by_the_verdicts(tmp_path, nudged, capsys):
    good = write_report(tmp_path / "good.json", "a", 1.0)
    bad = write_report(tmp_path / "bad.json", "b", 3.0)
    outputs = ["--markdown", str(tmp_path / "t.md"), "--html", str(tmp_path / "t.html"), "--table-json", str(tmp_path / "t.json")]
    assert cli.main(["report", str(good), *outputs]) == 0
    assert cli.main(["report", str(good), str(bad), "--previous", str(tmp_path / "t.json"), *outputs]) == 1
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["format"] == compat.FORMAT and set(table["cells"]["alpha"]) == {"a", "b"}
    assert "<svg" in (tmp_path / "t.html").read_text() or "install manualprop[report]" in (tmp_path / "t.html").read_text()
    assert cli.main(["report", str(good)]) == 0
    assert "| alpha | ✅ 0% |" in capsys.readouterr().out


def test_an_unreadable_report_exits_2(tmp_path, capsys):
    bad = tmp_path / "not-a-report.json"
    bad.write_text('{"cases": 3}')
    assert cli.main(["report", str(bad)]) == 2
    assert "not a manualprop report" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert cli.main(["report", str(tmp_path / "broken.json")]) == 2
