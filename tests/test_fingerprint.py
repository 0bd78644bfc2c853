"""The environment fingerprint in every report."""

import importlib.util
import json
import subprocess
import sys

import pytest

from manualprop import harness, parse_case
from manualprop.reports import fingerprint

CASE = "loss: mse\nlr: 0.1\ninputs: [[1.0]]\ntargets: [[2.0]]\nlayers: [{units: 1, kernel: [[0.5]]}]\n"


def test_numpy_alone_reports_versions_blas_and_settings_without_importing_frameworks(tmp_path):
    (tmp_path / "c.yaml").write_text(CASE)
    code = (
        "import json, sys; from manualprop.cli import main; "
        "main(['run', 'c.yaml', '--engines', 'numpy', '--json', 'r.json']); "
        "print(json.dumps([m for m in ('torch', 'tensorflow') if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    env = json.loads((tmp_path / "r.json").read_text())["environment"]
    assert {
        "python",
        "numpy",
        "torch",
        "tensorflow",
        "keras",
        "blas",
        "thread_variables",
        "cpu_count",
        "TF_ENABLE_ONEDNN_OPTS",
    } <= set(env)
    assert env["blas"], "the BLAS in use"
    assert "torch_threads" not in env  # torch was not imported, so not asked


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_after_a_torch_run_its_threads_and_tf32_settings_are_recorded():
    harness.run_case(parse_case(CASE, "c.yaml"), ["torch"])
    env = fingerprint.environment()
    assert env["torch_threads"] >= 1
    assert env["torch_float32_matmul_precision"] in ("highest", "high", "medium")
    assert isinstance(env["torch_tf32_matmul"], bool)
