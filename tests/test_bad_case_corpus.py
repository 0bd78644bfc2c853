"""A corpus of malformed case files (tests/bad_cases/), run through the command line at once.

Each file's first line says what must be reported: ``# expect: LINE FIELD: WORDS`` (LINE ``-``
where YAML has none). Every file gets exit 2 and its message with file, line and field, within
seconds, with nothing executed and no traceback.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

CORPUS = Path(__file__).resolve().parent / "bad_cases"
FILES = sorted(CORPUS.glob("*.yaml"))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    where = tmp_path_factory.mktemp("corpus")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "manualprop.cli", "run", str(CORPUS), "--engines", "numpy", "--json", "r.json"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    cases = {Path(c["path"]).name: c for c in json.loads((where / "r.json").read_text())["cases"]}
    return done, seconds, cases, where


def test_the_corpus_is_wide():
    assert len(FILES) >= 25


def test_every_file_is_invalid_with_exit_2_no_traceback_nothing_executed_within_seconds(outcome):
    done, seconds, cases, where = outcome
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert not (where / "manualprop-corpus-executed").exists()
    assert seconds < 60
    assert set(cases) == {f.name for f in FILES}
    assert all(c["ok"] is False and c["verdict"] == "invalid" for c in cases.values())


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_the_message_names_the_file_the_line_and_the_field(outcome, path):
    done, _, cases, _ = outcome
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    line, rest = expect.split(" ", 1)
    field, words = rest.split(": ", 1)
    problems = cases[path.name]["problems"]
    assert any(str(p["line"]) == line or (line == "-" and p["line"] is None) for p in problems), problems
    match = [p for p in problems if p["field"] == field and words in p["message"]]
    assert match, problems
    shown = f"{path.name}:{line}: {field}: " if line != "-" else f"{path.name}: {field}: "
    assert shown in done.stdout
