"""Start-up of ``manualprop run --engines numpy``: what it imports and builds, never how long it takes
(benchmarks/bench.py measures that). Each check runs in a fresh interpreter, as the command does."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

LITERAL_CASE = Path(__file__).resolve().parent.parent / "cases" / "seeds" / "cs4820_a7_tanh_softmax.yaml"

# Needed only by other commands, other engines, a disagreement, a generated array or a terminal.
NOT_AT_START = (
    "torch",
    "tensorflow",
    "keras",
    "gmpy2",
    "hypothesis",
    "matplotlib",
    "watchfiles",
    "numpy.random",
    "rich.progress",
    "manualprop.oracle",
    "manualprop.fuzz",
    "manualprop.verdict.explain",
    "manualprop.verdict.golden",
    "manualprop.verdict.hints",
    "manualprop.reports.fingerprint",
    "manualprop.reports.compat",
)


def _in_fresh_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_cli_loads_nothing_a_numpy_run_does_not_need_and_builds_no_validator():
    found = _in_fresh_python(
        textwrap.dedent(f"""
        import json, sys
        import manualprop.cli
        from manualprop.casefile import schema

        print(json.dumps({{"loaded": [m for m in {NOT_AT_START!r} if m in sys.modules],
                          "built": schema.CaseSpec.__pydantic_complete__}}))
    """)
    )
    assert found == {"loaded": [], "built": False}


def test_a_numpy_run_of_a_literal_case_imports_no_more_and_reads_the_entry_points_once():
    found = _in_fresh_python(
        textwrap.dedent(f"""
        import contextlib, io, json, sys
        import importlib.metadata as md

        calls, scan = [], md.entry_points
        md.entry_points = lambda **kw: calls.append(kw) or scan(**kw)
        from manualprop.cli import main

        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["run", {str(LITERAL_CASE)!r}, "--engines", "numpy"])
        print(json.dumps({{"rc": rc, "loaded": [m for m in {NOT_AT_START!r} if m in sys.modules], "scans": len(calls)}}))
    """)
    )
    assert found == {"rc": 0, "loaded": [], "scans": 1}
