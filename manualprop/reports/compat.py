"""Many JSON reports aggregated into one compatibility table: cases x columns (a column a report,
usually a cell of the nightly matrix), as Markdown, a self-contained HTML page and JSON.

Each cell says pass / fail / known difference / invalid / not compared, with the worst error as a
fraction of its tolerance. Given the previous table (its JSON), a cell whose verdict changed, or
whose deltas changed in any engine (compared bit for bit through a digest), is highlighted: that
is how a framework release that changes the numbers of a step shows up the next morning.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..verdict.outcomes import Status, Verdict

FORMAT = "manualprop-compat-1"
ICON = {
    Verdict.PASS: "✅",
    Verdict.FAIL: "❌",
    Verdict.KNOWN: "⚠️",
    Verdict.INVALID: "🚫",
    Verdict.NOT_COMPARED: "➖",
    Verdict.NON_FINITE: "💥",
}
COLOUR = {
    Verdict.PASS: "#d9f2d9",
    Verdict.FAIL: "#f8d0d0",
    Verdict.KNOWN: "#fbeec1",
    Verdict.INVALID: "#f8d0d0",
    Verdict.NOT_COMPARED: "#eeeeee",
    Verdict.NON_FINITE: "#f8d0d0",
}
VERSION_KEYS = ("python", "numpy", "torch", "tensorflow")


class ReportError(ValueError):
    """A file that is not a manualprop JSON report."""


@dataclass
class Cell:
    verdict: Verdict
    worst_ratio: float | None = None
    worst: str = ""  # the comparison closest to its tolerance: "layers.1.kernel numpy-keras"
    digests: dict[str, str] = field(default_factory=dict)  # engine -> digest of its deltas' bits
    change: str | None = None  # set against the previous table


@dataclass
class Column:
    label: str
    source: str
    environment: dict[str, Any]


@dataclass
class Table:
    columns: list[Column]
    cases: list[str]
    cells: dict[str, dict[str, Cell]]  # case -> column label -> cell
    previous: bool = False  # compared with a previous table

    @property
    def failed(self) -> bool:
        return any(c.verdict.failing for row in self.cells.values() for c in row.values())


def load_report(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot read it: {err}") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}:{err.lineno}: not JSON: {err.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list) or "environment" not in data:
        raise ReportError(f"{path}: not a manualprop report (expected the keys ok, environment, cases)")
    return data


def digest(deltas: dict[str, Any]) -> str:
    """A short digest of an engine's deltas, exact to the bit."""
    h = hashlib.sha256()
    for name in sorted(deltas):
        h.update(name.encode())
        h.update(np.asarray(deltas[name], dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _ratio(value: Any) -> float | None:
    if value is None:
        return None
    return float("inf") if value == "inf" else float(value)


def parse_verdict(text: Any, source: str | Path, case: str) -> Verdict:
    """A verdict read from a file (a report, a previous table); one this version does not know is a ``ReportError``."""
    try:
        return Verdict(text)
    except ValueError:
        known = ", ".join(repr(str(v)) for v in Verdict)
        raise ReportError(f"{source}: case {case!r}: unknown verdict {text!r} (expected one of {known})") from None


def cell_of(case: dict, source: str | Path = "a report") -> Cell:
    """A report's case entry as a table cell (``source`` names the report in an error)."""
    if case.get("verdict"):
        verdict = parse_verdict(case["verdict"], source, case.get("name", "?"))
    else:  # a report from before verdicts were written
        verdict = Verdict.PASS if case.get("ok") else Verdict.INVALID if "error" in case else Verdict.FAIL
    worst = case.get("worst") or {}
    label = f"{worst.get('param', '')} {worst.get('a', '')}-{worst.get('b', '')}".strip(" -") if worst else ""
    digests = {
        name: digest(run["deltas"]) for name, run in (case.get("engines") or {}).items() if run.get("status") == Status.RAN
    }
    return Cell(verdict, _ratio(worst.get("ratio")), label, digests)


def aggregate(reports: Iterable[tuple[str, dict]]) -> Table:
    """Reports (source path, data) in column order; the column label is the report's label or file stem."""
    columns: list[Column] = []
    cells: dict[str, dict[str, Cell]] = {}
    for source, data in reports:
        label = data.get("label") or Path(source).stem
        while label in {c.label for c in columns}:
            label += "'"
        columns.append(Column(label, str(source), data.get("environment", {})))
        for case in data["cases"]:
            cells.setdefault(case.get("name", "?"), {})[label] = cell_of(case, source)
    return Table(columns, sorted(cells), cells)


def mark_changes(table: Table, previous: dict, source: str | Path = "the previous table") -> None:
    """Set ``change`` on every cell that differs from the previous table's (its JSON form, read from ``source``)."""
    table.previous = True
    before = previous.get("cells", {})
    known_columns = {c["label"] for c in previous.get("columns", [])}
    for case, row in table.cells.items():
        for label, cell in row.items():
            old = before.get(case, {}).get(label)
            if old is None:
                cell.change = "new case" if label in known_columns else None
            elif parse_verdict(old["verdict"], source, case) != cell.verdict:
                cell.change = f"was {old['verdict']}" + (
                    f" {_ratio_text(old.get('worst_ratio'))}" if old.get("worst_ratio") is not None else ""
                )
            else:
                moved = sorted(e for e in cell.digests if e in old.get("digests", {}) and old["digests"][e] != cell.digests[e])
                if moved:
                    cell.change = f"numbers changed in {', '.join(moved)}"


def to_json(table: Table) -> dict:
    return {
        "format": FORMAT,
        "columns": [asdict(c) for c in table.columns],
        "cells": {
            case: {
                label: {k: v for k, v in asdict(cell).items() if k != "change"} | ({"change": cell.change} if cell.change else {})
                for label, cell in row.items()
            }
            for case, row in table.cells.items()
        },
    }


def _ratio_text(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if ratio == 0:
        return "0%"
    if ratio < 0.001:
        return "<0.1%"
    return f"{ratio:.1%}" if ratio <= 1 else f"{ratio:.3g}×"


def cell_text(cell: Cell | None, icons: bool = True) -> str:
    """'✅ 3.4%' (or 'pass 3.4%' without icons), with the failing comparison and any change."""
    if cell is None:
        return ""
    mark = ICON[cell.verdict] if icons else cell.verdict
    text = f"{mark} {_ratio_text(cell.worst_ratio) if cell.verdict != Verdict.INVALID else '' if not icons else Verdict.INVALID}".strip()
    if cell.verdict == Verdict.FAIL and cell.worst:
        text += f" ({cell.worst})"
    return f"**{text}** 🔺 {cell.change}" if cell.change else text


def to_markdown(table: Table) -> str:
    """The table for a job summary or a README: cases down, columns across, versions below."""
    lines = ["## manualprop compatibility table", ""]
    changed = sum(c.change is not None for row in table.cells.values() for c in row.values())
    if table.previous:
        lines += [
            f"{changed} cell(s) changed since the previous table (marked 🔺)."
            if changed
            else "No change since the previous table.",
            "",
        ]
    lines += [
        "Each cell: the verdict and the worst error as a fraction of its tolerance (100% is the edge).",
        "✅ pass, ❌ fail, ⚠️ known difference, 💥 NaN or infinity, 🚫 invalid case file, ➖ fewer than two engines ran.",
        "",
        "| case | " + " | ".join(c.label for c in table.columns) + " |",
        "|---|" + "---|" * len(table.columns),
    ]
    for case in table.cases:
        row = table.cells[case]
        lines.append(f"| {case} | " + " | ".join(cell_text(row.get(c.label)) for c in table.columns) + " |")
    lines += [
        "",
        "### Columns",
        "",
        "| column | " + " | ".join(VERSION_KEYS) + " | Keras used | BLAS | oneDNN |",
        "|---|" + "---|" * (len(VERSION_KEYS) + 3),
    ]
    for c in table.columns:
        lines.append(f"| {c.label} | " + " | ".join(_environment_row(c.environment)) + " |")
    return "\n".join(lines) + "\n"


def _environment_row(env: dict) -> list[str]:
    """The versions, the Keras API the run used, the BLAS and oneDNN of one column."""
    keras = ", ".join(env.get("keras_api") or []) or (f"keras {env['keras']}" if env.get("keras") else "–")
    return [
        *(str(env.get(k) or "–") for k in VERSION_KEYS),
        keras,
        _blas_text(env.get("blas")),
        str(env.get("TF_ENABLE_ONEDNN_OPTS", "–")),
    ]


def _blas_text(blas: Any) -> str:
    if isinstance(blas, list):
        return (
            ", ".join(
                f"{b.get('internal_api')} {b.get('version') or ''} ({b.get('num_threads')} threads)".replace("  ", " ")
                for b in blas
                if b.get("internal_api") != "openmp"
            )
            or "–"
        )
    if isinstance(blas, dict) and blas:
        return f"{blas.get('name', '')} {blas.get('version', '')}".strip()
    return "–"


def worst_plot_svg(table: Table) -> str | None:
    """The worst error / tolerance per case, one marker series per column, as an SVG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    height = 1.2 + 0.28 * len(table.cases)
    fig, ax = plt.subplots(figsize=(8, height))
    markers = "os^Dvx+*"
    floor = 1e-6
    for k, column in enumerate(table.columns):
        xs, ys = [], []
        for y, case in enumerate(table.cases):
            cell = table.cells[case].get(column.label)
            if cell is not None and cell.worst_ratio is not None:
                xs.append(min(max(cell.worst_ratio, floor), 1e6))
                ys.append(y + (k - (len(table.columns) - 1) / 2) * 0.12)
        ax.scatter(xs, ys, marker=markers[k % len(markers)], label=column.label, alpha=0.8, s=22)
    ax.axvline(1.0, color="#c00", linewidth=1)
    ax.text(1.0, -0.9, " tolerance", color="#c00", fontsize=8, va="center")
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, max(10.0, ax.get_xlim()[1]))
    ax.set_yticks(range(len(table.cases)), table.cases, fontsize=7)
    ax.set_ylim(len(table.cases) - 0.5, -1.2)
    ax.set_xlabel(f"worst error / tolerance (log scale; values under {floor:g} drawn at {floor:g})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def to_html(table: Table) -> str:
    """A self-contained page: the coloured table, the versions, and the plot."""
    e = html.escape
    head = "".join(f"<th>{e(c.label)}</th>" for c in table.columns)
    rows = []
    for case in table.cases:
        tds = []
        for c in table.columns:
            cell = table.cells[case].get(c.label)
            if cell is None:
                tds.append("<td></td>")
                continue
            tip = "; ".join(filter(None, [cell.verdict, cell.worst and f"worst: {cell.worst}", cell.change]))
            style = f"background:{COLOUR[cell.verdict]}" + (";outline:3px solid #d60;outline-offset:-3px" if cell.change else "")
            tds.append(
                f'<td style="{style}" title="{e(tip)}">{e(cell_text(cell, icons=False).replace("**", "").replace("🔺", "▲"))}</td>'
            )
        rows.append(f"<tr><th>{e(case)}</th>{''.join(tds)}</tr>")
    versions = "".join(
        f"<tr><th>{e(c.label)}</th>" + "".join(f"<td>{e(v)}</td>" for v in _environment_row(c.environment)) + "</tr>"
        for c in table.columns
    )
    svg = worst_plot_svg(table)
    plot = svg if svg else "<p>(install manualprop[report] for the plot)</p>"
    changed = sum(c.change is not None for row in table.cells.values() for c in row.values())
    note = (
        (
            f"<p>{changed} cell(s) changed since the previous table (outlined).</p>"
            if changed
            else "<p>No change since the previous table.</p>"
        )
        if table.previous
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>manualprop compatibility table</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; white-space: nowrap; }}
thead th {{ background: #f4f4f4; }}
</style></head><body>
<h1>manualprop compatibility table</h1>
{note}
<p>Each cell: the verdict and the worst error as a fraction of its tolerance (100% is the edge):
pass, fail, known (a declared known difference), invalid (the case file did not load), not compared
(fewer than two engines ran). An outlined cell changed since the previous table. Hover a cell for details.</p>
<table><thead><tr><th>case</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Worst error per case</h2>
{plot}
<h2>Columns</h2>
<table><thead><tr><th>column</th>{"".join(f"<th>{k}</th>" for k in VERSION_KEYS)}<th>Keras used</th><th>BLAS</th><th>oneDNN</th></tr></thead>
<tbody>{versions}</tbody></table>
</body></html>
"""
