"""One nox session per cell of the nightly matrix (ci/matrix.json), so any cell runs locally:

    nox -l                                   # the cells
    nox -s tf2.21-torch2.13-py3.11           # one cell: its report lands in reports/<cell>.json

Each session installs the cell's torch and TensorFlow (and tf-keras for a Keras 2 cell), the
project with its dev extra, writes the JSON report of every bundled case, then runs the suite.
torch comes from ``torch_index_url`` in the matrix (CPU wheels); set MANUALPROP_TORCH_INDEX to
another index, or to nothing to use pip's own configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
MATRIX = json.loads((ROOT / "ci" / "matrix.json").read_text(encoding="utf-8"))
nox.options.sessions = []  # a bare `nox` lists nothing to run: name a cell


def requirement(package: str, version: str) -> str:
    """'torch', '2.13.0' -> 'torch==2.13.0'; the version 'newest' -> no pin."""
    return package if version == "newest" else f"{package}=={version}"


def cell_environment(cell: dict) -> dict[str, str]:
    """What a cell sets for its runs: Keras 2 through tf_keras when the cell names tf_keras."""
    return {"TF_USE_LEGACY_KERAS": "1"} if cell.get("tf_keras") else {}


def install_commands(cell: dict) -> list[list[str]]:
    """The pip install arguments of a cell, in order."""
    index = os.environ.get("MANUALPROP_TORCH_INDEX", MATRIX["torch_index_url"])
    torch = [requirement("torch", cell["torch"]), *(["--index-url", index] if index else [])]
    frameworks = [requirement("tensorflow-cpu", cell["tensorflow"])]
    if cell.get("tf_keras"):
        frameworks.append(requirement("tf-keras", cell["tf_keras"]))
    return [torch, frameworks, ["-e", ".[dev,report]"]]


def _session(cell: dict):
    def run_cell(session: nox.Session) -> None:
        for args in install_commands(cell):
            session.install(*args)
        env = cell_environment(cell)
        report = ROOT / "reports" / f"{cell['name']}.json"
        report.parent.mkdir(exist_ok=True)
        # The report is the product: a mismatch (exit 1) still writes it, and fails the session after.
        session.run("manualprop", "run", "-q", "--label", cell["name"], "--json", str(report), env=env, success_codes=[0, 1])
        session.run("python", "-m", "pytest", "-n", "2", "-q", env=env)
        if not json.loads(report.read_text(encoding="utf-8"))["ok"]:
            session.error(f"some comparison failed: see {report}")

    run_cell.__doc__ = f"python {cell['python']}, tensorflow-cpu {cell['tensorflow']}, torch {cell['torch']}" + (
        f", tf-keras {cell['tf_keras']} (Keras 2)" if cell.get("tf_keras") else ""
    )
    return nox.session(name=cell["name"], python=cell["python"])(run_cell)


for _cell in MATRIX["cells"]:
    _session(_cell)
