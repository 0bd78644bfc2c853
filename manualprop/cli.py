"""The command line: ``manualprop run``, ``manualprop schema``.

Exit status of ``run``: 0 every comparison holds; 1 some comparison failed (or an engine
crashed); 2 a case file or the command line was invalid (this wins over 1); 5 nothing at all was
compared (as pytest's "no tests ran"); 141 the output pipe closed (``manualprop run | head``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table

from . import __version__, engines, harness
from .reports import report
from .verdict.compare import Comparison
from .verdict.diagnose import Diagnosis
from .verdict.outcomes import Status, Verdict
from .verdict.results import CaseResult, failed, is_known, is_rounding

EXIT_OK, EXIT_MISMATCH, EXIT_INVALID, EXIT_NOTHING_COMPARED = 0, 1, 2, 5  # 5: as pytest's "no tests ran"
EXIT_PIPE_CLOSED = 128 + 13  # what a shell reports for a program ended by SIGPIPE


def _engine_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = engines.names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown engine {', '.join(unknown) or text!r}; registered: {', '.join(known)}")
    return names


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="manualprop", description="Cross-verify one SGD step between NumPy, PyTorch and Keras.")
    top.add_argument("--version", action="version", version=f"manualprop {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run case files through every engine and compare",
        description=(
            "Run each case through every installed engine, compare every pair and the golden values. "
            "With no PATH, the bundled cases run. Exit status: 0 all hold, 1 a mismatch, 2 an invalid case or command line."
        ),
    )
    run.add_argument("paths", nargs="*", metavar="PATH", help="case files or folders (searched for *.yaml, *.yml)")
    run.add_argument(
        "--engines", type=_engine_list, metavar="A,B", help=f"engines to run (registered: {', '.join(engines.names())})"
    )
    run.add_argument("--json", metavar="FILE", help="write the JSON report to FILE")
    run.add_argument("--label", metavar="NAME", help="name this run in the JSON report (a matrix cell, a machine)")
    run.add_argument("--show-deltas", action="store_true", help="print every parameter's delta from each engine side by side")
    run.add_argument("-q", "--quiet", action="store_true", help="print only failing cases and the summary")
    run.add_argument(
        "--watch",
        action="store_true",
        help=("after the run, re-run each case file when it is saved (engines kept warm); Ctrl-C ends it, exit status 0"),
    )

    agg = sub.add_parser(
        "report",
        help="aggregate JSON reports into a compatibility table",
        description=(
            "Aggregate JSON reports (one column each) into a table of cases x columns. With no output option, "
            "the Markdown table goes to standard output. Exit status: 0 no cell fails, 1 some cell fails, "
            "2 a report could not be read."
        ),
    )
    agg.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports written by manualprop run --json")
    agg.add_argument("--previous", metavar="TABLE.json", help="the previous table (from --table-json): changes are highlighted")
    agg.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    agg.add_argument("--html", metavar="FILE", help="write a self-contained HTML page with the table and a plot")
    agg.add_argument("--table-json", metavar="FILE", help="write the table as JSON, for the next --previous")

    explain = sub.add_parser(
        "explain",
        help="show the step layer by layer, each engine side by side",
        description=(
            "Run one case and show, layer by layer, the forward tensors, the loss, the backward tensors and the update "
            "from each engine side by side, with the first divergence marked."
        ),
    )
    explain.add_argument("case", metavar="CASE", help="a case file")
    explain.add_argument("--engines", type=_engine_list, metavar="A,B", help="engines to show (default: every installed one)")
    explain.add_argument("--markdown", action="store_true", help="print Markdown instead (to hand out)")
    explain.add_argument("--precision", type=int, default=8, metavar="N", help="decimals shown (default 8)")
    explain.add_argument("--watch", action="store_true", help="show it again each time the case file is saved; Ctrl-C ends it")

    fz = sub.add_parser(
        "fuzz",
        help="random cases through every engine; disagreements shrunk to case files",
        description=(
            "Run random cases (Hypothesis) through every installed engine. Each disagreement that is not a declared "
            "known difference is shrunk to a minimal case and written to --out, ready for cases/. "
            "Exit status: 0 no disagreement, 1 some were written."
        ),
    )
    fz.add_argument("--n", type=int, default=100, metavar="N", help="how many random cases (default 100)")
    fz.add_argument("--seed", type=int, default=0, metavar="S", help="the random seed (default 0): the same seed, the same cases")
    fz.add_argument(
        "--out", default="fuzz-findings", metavar="DIR", help="where minimal cases are written (default fuzz-findings/)"
    )
    fz.add_argument("--engines", type=_engine_list, metavar="A,B", help="engines to run (default: every installed one)")
    fz.add_argument(
        "--plain-sgd",
        dest="optimizers",
        action="store_false",
        help="one plain SGD step per case (by default each case draws its optimizer, hyperparameters and 1 to 5 steps)",
    )
    fz.add_argument(
        "--architectures",
        type=int,
        metavar="K",
        help=(
            "draw the cases over K architectures instead of a new one for each case: much faster with Keras, "
            "which reuses its compiled models; shrinking then goes to the simplest architecture of the K"
        ),
    )

    schema = sub.add_parser("schema", help="print the JSON Schema of a case file")
    schema.add_argument("-o", "--output", metavar="FILE", help="write it to FILE instead of standard output")
    return top


class Terminal(Console):
    """rich's Console, but a closed pipe raises BrokenPipeError for main() to end quietly
    (rich would exit with 1, which here means a mismatch)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = {"schema": _schema, "report": _report, "explain": _explain, "fuzz": _fuzz, "run": _run}[args.command]
    try:
        return command(args)
    except BrokenPipeError:  # `manualprop run | head`: the reader has gone, so end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return EXIT_PIPE_CLOSED


def missing_extra(module: str, extra: str, command: str) -> str | None:
    """The one line to print when ``command`` needs ``module``, which the extra ``extra`` installs."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return None
    return f'manualprop {command}: needs {module}, which is not installed: pip install "manualprop[{extra}]"'


def _fuzz(args: argparse.Namespace) -> int:
    err = Terminal(stderr=True, highlight=False, soft_wrap=True)
    missing = missing_extra("hypothesis", "fuzz", "fuzz")
    if missing:
        err.print(f"[red]{escape(missing)}[/red]")
        return EXIT_INVALID
    from .fuzz import fuzz

    out = Terminal(highlight=False, soft_wrap=True)
    if args.n < 1 or (args.architectures is not None and args.architectures < 1):
        err.print(
            f"[red]manualprop fuzz: --n and --architectures must be at least 1, got {args.n} and {args.architectures}[/red]"
        )
        return EXIT_INVALID
    _print_unavailable(out, args.engines)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("fuzzing"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} cases"),
        TextColumn("{task.fields[rate]:.1f} cases/s"),
        TextColumn("{task.fields[found]} disagreements"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with progress:
        task = progress.add_task("fuzz", total=args.n, rate=0.0, found=0)
        start = time.perf_counter()

        def update(summary):
            progress.update(
                task,
                completed=summary.cases,
                rate=summary.cases / max(time.perf_counter() - start, 1e-9),
                found=len(summary.findings),
            )

        summary = fuzz(args.n, args.seed, Path(args.out), args.engines, update, args.architectures, args.optimizers)
    out.print(f"{summary.cases} random cases in {summary.seconds:.1f} s ({summary.rate:.1f} cases/s), seed {args.seed}")
    if summary.closest_case:
        out.print(
            f"closest call among the cases that agreed: {summary.closest:.1%} of the tolerance ({escape(summary.closest_case)})"
        )
    for finding in summary.findings:
        out.print(f"[red]disagreement written to {escape(str(finding.path))}: {escape(finding.sentence)}[/red]")
    if summary.repeats:
        out.print(f"{summary.repeats} more finding(s) with the same diagnosis as one written were not written again")
    if not summary.findings:
        out.print("[green]no disagreement[/green]")
    return EXIT_MISMATCH if summary.findings else EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    if getattr(args, "watch", False):
        from .watch import watch_explain

        return watch_explain(args, _explain)
    from .casefile.case import load_case
    from .casefile.errors import CaseError
    from .verdict import explain

    out = Terminal(highlight=False, soft_wrap=True)
    try:
        found = harness.find_cases([args.case])
        if len(found) != 1:
            raise FileNotFoundError(f"{args.case} holds {len(found)} case files; explain shows one case")
        case = load_case(found[0], engines.names())
    except FileNotFoundError as e:
        Terminal(stderr=True, highlight=False, soft_wrap=True).print(f"[red]manualprop explain: {escape(str(e))}[/red]")
        return EXIT_INVALID
    except CaseError as e:
        out.print("\n".join(f"[red]{escape(p.render(e.file))}[/red]" for p in e.problems))
        return EXIT_INVALID
    _print_unavailable(out, args.engines)
    result = harness.run_case(case, args.engines)
    if args.markdown:
        sys.stdout.write(explain.render_markdown(result, args.precision))
    else:
        out.print(explain.render_terminal(result, args.precision))
    if not result.ok:
        return EXIT_MISMATCH
    if not result.compared:
        Terminal(stderr=True, highlight=False, soft_wrap=True).print(
            f"[yellow]not compared: {escape(result.why_not_compared())} (exit status {EXIT_NOTHING_COMPARED})[/yellow]"
        )
        return EXIT_NOTHING_COMPARED
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .reports import compat

    err = Terminal(stderr=True, highlight=False, soft_wrap=True)
    try:
        table = compat.aggregate((path, compat.load_report(path)) for path in args.reports)
        previous = None
        if args.previous:
            try:
                previous = json.loads(Path(args.previous).read_text(encoding="utf-8"))
            except FileNotFoundError:
                err.print(f"[yellow]no previous table at {escape(args.previous)}: nothing to compare with[/yellow]")
            if previous is not None:
                compat.mark_changes(table, previous, args.previous)  # its verdicts are read: an unknown one is a ReportError
    except compat.ReportError as e:
        err.print(f"[red]manualprop report: {escape(str(e))}[/red]")
        return EXIT_INVALID
    except json.JSONDecodeError as e:
        err.print(f"[red]manualprop report: {escape(args.previous)}:{e.lineno}: not JSON: {escape(e.msg)}[/red]")
        return EXIT_INVALID
    markdown = compat.to_markdown(table)
    outputs = {
        args.markdown: ("the Markdown table", lambda: markdown),
        args.html: ("the HTML page", lambda: compat.to_html(table)),
        args.table_json: ("the table as JSON", lambda: json.dumps(compat.to_json(table), indent=1) + "\n"),
    }
    size = (
        f"{len(table.cells)} case{'s' * (len(table.cells) != 1)} x {len(table.columns)} column{'s' * (len(table.columns) != 1)}"
    )
    for path, (what, render) in outputs.items():
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(render())
            Terminal(highlight=False, soft_wrap=True).print(f"wrote {what} ({size}) to {escape(path)}")
    if not (args.markdown or args.html or args.table_json):
        sys.stdout.write(markdown)
    return EXIT_MISMATCH if table.failed else EXIT_OK


def _schema(args: argparse.Namespace) -> int:
    from .casefile.schema import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "watch", False):
        from .watch import watch_run

        return watch_run(args, _run)
    # soft_wrap: a message or a path is never broken across lines, so it can be searched for.
    out = Terminal(highlight=False, soft_wrap=True)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Terminal(highlight=False, soft_wrap=True, width=120)  # logs and CI: room for three engine pairs
    err = Terminal(stderr=True, highlight=False, soft_wrap=True)
    try:
        paths = harness.find_cases(args.paths or [harness.bundled_cases()])
    except FileNotFoundError as e:
        err.print(f"[red]manualprop run: {escape(str(e))}[/red]")
        return EXIT_INVALID
    if not paths:
        err.print(f"[red]manualprop run: no case files (*.yaml, *.yml) in {escape(' '.join(args.paths))}[/red]")
        return EXIT_INVALID

    _print_unavailable(out, args.engines)
    results: list[CaseResult] = []
    progress = _progress_bar(err)
    with progress:
        task = progress.add_task("running cases", total=len(paths))
        for result in harness.run_paths(paths, args.engines):
            results.append(result)
            progress.advance(task)
            if not (args.quiet and result.ok):
                out.print(render_case(result, args.show_deltas))

    if args.json:
        report.write(report.build(results, harness.environment(), label=args.label), args.json)
    return _summary(out, results, args.json)


def _progress_bar(err: Console):
    """The run's transient progress bar on a terminal; elsewhere one that shows nothing and costs
    no import (rich.progress is a few ms of every start-up)."""
    if not err.is_terminal:
        return _NoProgress()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


class _NoProgress:
    """rich's Progress(disable=True), without importing it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def advance(self, *args: object, **kwargs: object) -> None:
        return None


def _print_unavailable(out: Console, requested: list[str] | None) -> None:
    for name in requested or engines.default_names():
        reason = engines.get(name).unavailable()
        if reason:
            out.print(f"[yellow]skipping {name}: {escape(reason)}[/yellow]")


def _summary(out: Console, results: list[CaseResult], json_path: str | None) -> int:
    """The counts by verdict, and the exit status: 2 invalid, 1 failed, 5 nothing compared, else 0.
    A case on which nothing was compared is counted on its own, never as passed."""
    verdicts = [r.verdict for r in results]
    invalid = verdicts.count(Verdict.INVALID)
    failed = verdicts.count(Verdict.FAIL) + verdicts.count(Verdict.NON_FINITE)
    known, unseen = verdicts.count(Verdict.KNOWN), verdicts.count(Verdict.NOT_COMPARED)
    nothing = not any(r.compared for r in results)
    colour = "red" if invalid or failed else "yellow" if nothing or unseen else "green"
    counts = f"{verdicts.count(Verdict.PASS)} passed, {failed} failed, {invalid} invalid"
    counts += (f", {known} known differences" if known else "") + (f", {unseen} not compared" if unseen else "")
    out.print(f"[{colour}]{len(results)} cases: {counts}[/{colour}]")
    if json_path:
        out.print(f"JSON report written to {escape(json_path)}")
    if invalid:
        return EXIT_INVALID
    if failed:
        return EXIT_MISMATCH
    if nothing:
        out.print(
            "[yellow]nothing was compared: no case ran in two engines or had golden values checked "
            f"(exit status {EXIT_NOTHING_COMPARED})[/yellow]"
        )
        return EXIT_NOTHING_COMPARED
    return EXIT_OK


VERDICT_STYLE = {
    Verdict.PASS: "bold green",
    Verdict.FAIL: "bold red",
    Verdict.INVALID: "bold red",
    Verdict.NOT_COMPARED: "bold yellow",
    Verdict.KNOWN: "bold yellow",
    Verdict.NON_FINITE: "bold red",
}


def _verdict(result: CaseResult) -> str:
    style = VERDICT_STYLE[result.verdict]
    return f"[{style}]{result.verdict.upper()}[/{style}]"


def render_case(result: CaseResult, show_deltas: bool = False) -> RenderableType:
    """A case's verdict, losses, per-parameter table and the details of every mismatch."""
    if result.error is not None:
        lines = [f"{_verdict(result)} {escape(result.path)}"]
        lines += [f"  [red]{escape(p.render(result.path))}[/red]" for p in result.error.problems]
        return "\n".join(lines)
    case = result.loaded
    ran = result.ran
    title = f"{_verdict(result)} [bold]{escape(case.name)}[/bold] ({escape(result.path)}, {case.dtype.name})"
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("  parameter", no_wrap=True)
    table.add_column("shape")
    table.add_column("max|delta|", justify="right")
    pairs = [(a, b) for i, a in enumerate(ran) for b in ran[i + 1 :]]
    for a, b in pairs:
        table.add_column(f"{a}-{b}", justify="right")
    if pairs:
        table.add_column("worst/tol", justify="right")
    by_key = {(c.param, c.a, c.b): c for c in result.comparisons}
    first = result.runs[ran[0]].result if ran else None
    rows = [("loss", "()", "")]
    for param, initial in case.parameters().items():
        size = f"{np.abs(first.deltas[param]).max():.3g}" if first is not None and param in first.deltas and initial.size else ""
        rows.append((param, str(case.in_file_layout(param, initial).shape), size))
    for param, shape, size in rows:
        cells = [by_key.get((param, a, b)) for a, b in pairs]
        worst = max((c.worst_ratio for c in cells if c is not None), default=0.0)
        table.add_row(f"  {case.shown_as(param)}", shape, size, *[_cell(c) for c in cells], *([_ratio(worst)] if pairs else []))
    losses = ", ".join(f"{n} {result.runs[n].output.loss:.9g}" for n in ran)
    parts: list[RenderableType] = [title, f"  loss: {losses}" if ran else "  [yellow]no engine ran[/yellow]"]
    if result.verdict == Verdict.NOT_COMPARED:
        parts.append(f"  [yellow]not compared: {escape(result.why_not_compared())}[/yellow]")
    if ran:
        parts.append(table)
    for name, run in result.runs.items():
        if run.status == Status.ERROR:
            parts.append(f"  [red]{name} {escape(run.reason or '')}[/red]")
        if run.non_finite:
            parts.append(f"  [red]{name}: a non-finite value: {escape(run.non_finite)}[/red]")
    for name, reason in case.known_differences.items():
        if name in ran:
            parts.append(f"  [yellow]known difference, {name}: {escape(reason)}[/yellow]")
    for note in result.notes:
        parts.append(f"  [red]{escape(note)}[/red]")
    if result.expected:
        bad = [c for c in result.expected if not c.ok]
        checked = ", ".join(sorted({c.a for c in result.expected}))
        status = "[green]hold[/green]" if not bad else f"[red]{len(bad)} of {len(result.expected)} fail[/red]"
        parts.append(f"  golden values in {checked}: {status}")
    for c in result.comparisons:
        if failed(c):
            parts.append(f"[red]{escape(_indent(c.message))}[/red]")
        elif is_rounding(c):
            near = ", ".join(f"{n} {r:.0%}" for n, r in c.extra["rounding"].items())
            parts.append(
                f"  [yellow]{escape(case.shown_as(c.param))}: {c.a} and {c.b} are {c.worst_ratio:.3g}x the tolerance apart, but each is "
                f"within it of the float64 oracle ({near}): rounding in an ill-conditioned step, not a mismatch[/yellow]"
            )
    for c in result.comparisons:
        if c.ok and "excused" in c.extra:
            excused = c.extra["excused"]
            parts.append(
                f"  [yellow]{escape(case.shown_as(c.param))}: {c.a} and {c.b} are up to {excused['beyond_tolerance']:.3g}x the "
                f"tolerance apart on {excused['elements']} of {c.total} values, within what rounding can move there "
                f"(manualprop/verdict/conditioning.py): not compared closer than that[/yellow]"
            )
    for names, comparisons in harness.golden_groups(result):
        parts.append(f"[red]{escape(_indent(harness.golden_block(names, comparisons)))}[/red]")
    if result.diagnosis is not None and result.diagnosis.quantity != "crash":  # a crash is printed above
        parts.extend(_diagnosis_lines(result.diagnosis))
    if show_deltas:
        parts.extend(_delta_tables(result))
    return Group(*parts)


def _diagnosis_lines(d: Diagnosis) -> list[str]:
    lines = [f"  [bold]diagnosis:[/bold] {escape(d.sentence)}"]
    if d.oracle_distance:
        distances = ", ".join(
            f"{name} {_ratio(ratio, plain=True)} of its tolerance away"
            for name, ratio in sorted(d.oracle_distance.items(), key=lambda kv: kv[1])
        )
        lines.append(f"  oracle (central differences, 128-bit): {escape(distances)}")
    lines += [f"  hint: {escape(h)}" for h in d.hints]
    return lines


def _cell(c: Comparison | None) -> str:
    if c is None:
        return ""
    if not c.ok and is_known(c):
        return f"[yellow]{c.max_abs_diff:.1e} known[/yellow]"
    if is_rounding(c):
        return f"[yellow]{c.max_abs_diff:.1e} ~[/yellow]"
    return f"{c.max_abs_diff:.1e}" if c.ok else f"[red]{c.max_abs_diff:.1e}[/red]"


def _ratio(ratio: float, plain: bool = False) -> str:
    if ratio <= 1:
        return f"{ratio:.1%}"
    return f"{ratio:.3g}x" if plain else f"[red]{ratio:.3g}x[/red]"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _delta_tables(result: CaseResult) -> list[Table]:
    tables = []
    ran = result.ran
    case = result.loaded
    for param in case.parameters():
        table = Table(title=f"{case.shown_as(param)} delta", title_justify="left", show_edge=False)
        for name in ran:
            table.add_column(name)
        deltas = [result.runs[n].output.deltas.get(param) for n in ran]
        table.add_row(
            *[
                "(none)" if d is None else np.array2string(case.in_file_layout(param, d), precision=8, max_line_width=60)
                for d in deltas
            ]
        )
        tables.append(table)
    return tables


if __name__ == "__main__":
    raise SystemExit(main())
