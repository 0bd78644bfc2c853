"""The JSON report of ``manualprop run --json FILE`` (SPEC section 5)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..casefile.errors import format_path
from ..verdict.outcomes import Status, Verdict
from ..verdict.results import CaseResult, EngineRun


def _finite_or_text(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers are written as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_text(v) for v in value]
    return value


def _engine_json(run: EngineRun) -> dict:
    if run.status != Status.RAN:
        return {"status": run.status, "reason": run.reason}
    result = run.output
    entry = {
        "status": Status.RAN,
        "loss": result.loss,
        "deltas": {name: np.asarray(delta, dtype=np.float64).tolist() for name, delta in result.deltas.items()},
        "seconds": round(run.seconds, 6),
    }
    if len(result.history) > 1:
        entry["losses"] = result.losses  # the loss before each step (SPEC section 7)
    return entry | ({"non_finite": run.non_finite} if run.non_finite else {})


def case_json(result: CaseResult) -> dict:
    if result.error is not None:
        return {
            "name": Path(result.path).stem,
            "path": result.path,
            "ok": False,
            "verdict": result.verdict,
            "error": str(result.error),
            "problems": [{"field": format_path(p.path), "line": p.line, "message": p.message} for p in result.error.problems],
        }
    case = result.loaded
    expected = []
    for c in result.expected:
        entry = c.to_json()
        entry["engine"] = entry.pop("a")
        entry.pop("b")
        expected.append(entry)
    worst = result.worst
    return {
        "name": case.name,
        "path": result.path,
        "ok": result.ok and result.compared,  # nothing compared is never reported as passed
        "verdict": result.verdict,
        "compared": result.compared,
        **({"not_compared": result.why_not_compared()} if result.verdict == Verdict.NOT_COMPARED else {}),
        # Every kernel here is (in, out), a conv2d's (kh, kw, in, out) (SPEC sections 2 and 8); this
        # says how the case file wrote each kernel.
        "layout": {param: _layout(case, param) for param in case.parameters() if param.endswith(".kernel")},
        "worst": None if worst is None else {"ratio": worst.worst_ratio, "param": worst.param, "a": worst.a, "b": worst.b},
        "dtype": case.dtype.name,
        "engines": {name: _engine_json(run) for name, run in result.runs.items()},
        "comparisons": [c.to_json() for c in result.comparisons],
        "expected": expected,
        "known_differences": case.known_differences,
        "notes": result.notes,
        "diagnosis": None if result.diagnosis is None else result.diagnosis.to_json(),
    }


def _layout(case, param: str) -> str:
    conv = case.parameters()[param].ndim == 4
    if case.shown_as(param) != param:
        return "weight (out, in, kh, kw)" if conv else "weight (out, in)"
    return "kernel (kh, kw, in, out)" if conv else "kernel (in, out)"


def build(results: Iterable[CaseResult], environment: dict, label: str | None = None) -> dict:
    """The report; ``ok`` is true when no case failed and something was compared (exit status 0)."""
    results = list(results)
    cases = [case_json(r) for r in results]
    counts = Counter(r.verdict for r in results)
    compared = any(r.compared for r in results)
    ok = compared and not any(v.failing for v in counts)
    report = {"ok": ok, "compared": compared, "counts": dict(sorted(counts.items())), "environment": environment, "cases": cases}
    return report if label is None else {"label": label, **report}


def write(report: dict, path: str | Path) -> None:
    text = json.dumps(_finite_or_text(report), indent=1, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")
