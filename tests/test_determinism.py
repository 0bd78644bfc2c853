"""The same case gives byte-identical deltas: run after run, and under pytest -n 0 and -n 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["seeds/cs4820_a7_tanh_softmax.yaml", "losses/cce_mean_float32_batch16.yaml", "shapes/deep_five_layers_float32.yaml"]


def cli_deltas(tmp_path: Path, name: str) -> dict:
    report = tmp_path / f"{name}.json"
    paths = [str(ROOT / "cases" / c) for c in CASES]
    done = subprocess.run(
        [sys.executable, "-m", "manualprop.cli", "run", *paths, "--json", str(report), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    cases = json.loads(report.read_text())["cases"]
    return {
        c["name"]: {e: json.dumps(r["deltas"], sort_keys=True) for e, r in c["engines"].items() if r["status"] == "ran"}
        for c in cases
    }


def test_two_runs_give_byte_identical_deltas(tmp_path):
    first, second = cli_deltas(tmp_path, "first"), cli_deltas(tmp_path, "second")
    assert first == second
    assert all(len(engines) >= 1 for engines in first.values())


def pytest_deltas(tmp_path: Path, workers: str) -> dict:
    project = tmp_path / f"project-{workers}"
    for case in CASES:
        (project / "cases" / case).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "cases" / case, project / "cases" / case)
    (project / "pytest.ini").write_text("[pytest]\nmanualprop_files = cases/*.yaml\n")  # these files are not named *.case.yaml
    out = project / "deltas"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", workers, f"--manualprop-deltas={out}"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {f"{p.parent.name}/{p.stem}": p.read_text() for p in sorted(out.glob("*/*.json"))}


def test_pytest_n0_and_n2_give_byte_identical_deltas_and_the_same_as_the_cli(tmp_path):
    serial, parallel = pytest_deltas(tmp_path, "0"), pytest_deltas(tmp_path, "2")
    assert serial and serial == parallel
    cli = cli_deltas(tmp_path, "cli")
    for key, text in serial.items():
        case, engine = key.split("/")
        assert json.loads(text) == json.loads(cli[case][engine])
