"""Statuses and verdicts are enums: every verdict is styled everywhere it is shown, the JSON keeps the
strings, and a verdict read from a file that this version does not know is an error naming the file."""

import ast
import json
from pathlib import Path

import pytest

import manualprop
from manualprop import cli, harness, parse_case
from manualprop.reports import compat, report
from manualprop.verdict.outcomes import Status, Verdict

CASE = """
name: tiny
loss: mse
lr: 0.1
inputs: [[1.0, 2.0]]
targets: [[0.5]]
layers:
  - {units: 1, kernel: [[0.5], [-0.6]]}
"""


def test_the_strings_are_those_of_the_spec():
    assert [str(s) for s in Status] == ["ran", "skipped", "error"]
    assert {str(v) for v in Verdict} == {"pass", "fail", "known", "non-finite", "invalid", "not compared"}
    with pytest.raises(ValueError):
        Verdict("passed")


@pytest.mark.parametrize("table", [cli.VERDICT_STYLE, compat.ICON, compat.COLOUR], ids=["style", "icon", "colour"])
def test_every_verdict_is_shown_by_every_table(table):
    assert set(table) == set(Verdict)


def test_failing_verdicts_are_those_that_fail_a_run():
    assert {v for v in Verdict if v.failing} == {Verdict.FAIL, Verdict.NON_FINITE, Verdict.INVALID}


def test_outcomes_sit_below_the_rest_of_the_package():
    tree = ast.parse((Path(manualprop.__file__).parent / "verdict" / "outcomes.py").read_text(encoding="utf-8"))
    imported = [
        n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("manualprop"))
    ]
    imported += [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name.startswith("manualprop") for a in n.names)]
    assert not imported, "manualprop/verdict/outcomes.py must import nothing from the package"


def test_the_json_report_keeps_the_strings(tmp_path):
    result = harness.run_case(parse_case(CASE, "tiny.yaml"), ["numpy"])
    assert result.verdict is Verdict.NOT_COMPARED and result.runs["numpy"].status is Status.RAN
    path = tmp_path / "r.json"
    report.write(report.build([result], {}), path)
    text = path.read_text(encoding="utf-8")
    assert '"verdict": "not compared"' in text and '"status": "ran"' in text and '"not compared": 1' in text
    assert cli._verdict(result) == "[bold yellow]NOT COMPARED[/bold yellow]"


def _report_with_verdict(path: Path, verdict: str) -> Path:
    result = harness.run_case(parse_case(CASE, "tiny.yaml"), ["numpy"])
    data = report.build([result], {})
    data["cases"][0]["verdict"] = verdict
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_an_unknown_verdict_in_a_report_is_rejected_naming_the_file(tmp_path, capsys):
    path = _report_with_verdict(tmp_path / "odd.json", "passed")
    with pytest.raises(compat.ReportError, match=r"odd\.json: case 'tiny': unknown verdict 'passed' \(expected one of 'pass'"):
        compat.aggregate([(path, compat.load_report(path))])
    assert cli.main(["report", str(path)]) == 2
    assert "odd.json" in capsys.readouterr().err


def test_an_unknown_verdict_in_the_previous_table_is_rejected_naming_it(tmp_path, capsys):
    path = _report_with_verdict(tmp_path / "r.json", "pass")
    previous = tmp_path / "previous.json"
    assert cli.main(["report", str(path), "--table-json", str(previous)]) == 0
    table = json.loads(previous.read_text(encoding="utf-8"))
    assert table["cells"]["tiny"]["r"]["verdict"] == "pass"  # the table's JSON keeps the string too
    table["cells"]["tiny"]["r"]["verdict"] = "PASS"
    previous.write_text(json.dumps(table), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["report", str(path), "--previous", str(previous)]) == 2
    err = capsys.readouterr().err
    assert "previous.json" in err and "unknown verdict 'PASS'" in err


def test_a_report_without_verdicts_is_still_read(tmp_path):
    cases = [{"name": "a", "ok": True}, {"name": "b", "ok": False, "error": "bad"}, {"name": "c", "ok": False}]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"ok": False, "environment": {}, "cases": cases}), encoding="utf-8")
    table = compat.aggregate([(path, compat.load_report(path))])
    assert {name: row["old"].verdict for name, row in table.cells.items()} == {"a": "pass", "b": "invalid", "c": "fail"}
