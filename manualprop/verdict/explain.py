"""``manualprop explain CASE``: the step layer by layer, as the seed notebooks compute it by hand.

For each layer, the forward tensors (Z, A), then the loss, then backward from the last layer
(dA, dZ, dW, db), then the update (the updated parameters and the deltas), each engine side by
side: the walk of :func:`manualprop.verdict.computation.walk`, the one ``diagnose`` searches, with each
quantity's heading and formula. The first divergence, if any, is marked. ``--markdown`` gives
the same as Markdown. An array of three or more axes (a batch of images, a conv kernel, a norm's
statistics per position) is shown as its shape and its axes' names, then one 2-D grid per image
and channel (h x w) or per kernel input and filter (kh x kw), the channels side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import engines
from . import computation
from .computation import Step, walk
from .outcomes import Status
from .results import CaseResult


@dataclass
class Section:
    """One quantity to show: a heading, its formula, and each engine's value."""

    heading: str
    formula: str
    values: dict[str, np.ndarray | None]
    divergence: str | None = None  # "first divergence: in keras"
    step: Step | None = None  # the quantity of the walk it shows
    dims: tuple[str, ...] = ()  # the names of its axes (images, conv kernels): shown grid by grid


def sections(result: CaseResult) -> list[Section]:
    case = result.loaded
    runs = [result.runs[n] for n in result.ran]
    d = result.diagnosis

    out: list[Section] = []
    for q in walk(case):
        mark = None
        if d is not None and d.step == q.at:
            mark = f"first divergence: in {d.engine}" if d.engine else "first divergence"
        shown = {r.engine: q.value(r) for r in runs}
        if result.oracle is not None and engines.ORACLE not in shown:
            shown[f"{engines.ORACLE} (oracle)"] = q.value(result.oracle)
        if q.expected is not None:
            shown["expected"] = q.expected
        if q.present is not None:
            shown = {n: None if v is None else q.present(v) for n, v in shown.items()}
        out.append(Section(q.heading, q.formula, shown, mark, q.at, q.dims))
    return out


def not_run(result: CaseResult) -> list[str]:
    """Every engine asked for that did not run, with its reason."""
    return [f"{name} did not run ({run.status}): {run.reason}" for name, run in result.runs.items() if run.status != Status.RAN]


def _array_text(a: np.ndarray | None, precision: int, dims: tuple[str, ...] = ()) -> str:
    """An array as numbers; an array of three or more axes (an image batch, a conv kernel) as a
    line with its shape, then its 2-D grids (h x w, kh x kw) side by side along its last other axis
    (the channels of each sample, the filters of each input channel)."""
    if a is None:
        return "-"
    a = np.asarray(a)
    if a.ndim <= 2:
        return _numbers(a, precision)
    names = dims if len(dims) == a.ndim else tuple(f"axis {k}" for k in range(a.ndim))
    grid = [k for k, n in enumerate(names) if n in ("h", "w", "kh", "kw")] or [a.ndim - 2, a.ndim - 1]
    others = [k for k in range(a.ndim) if k not in grid]
    down, across = others[:-1], others[-1]
    lines = [
        f"shape {a.shape} = ({', '.join(names)}): {' x '.join(names[k] for k in grid)} grids"
        + (f", per {', '.join(names[k] for k in down)}" if down else "")
        + f", {names[across]} by {names[across]} across"
    ]
    moved = np.moveaxis(a, [*others, *grid], range(a.ndim))  # down axes, the across axis, then the grid
    for index in np.ndindex(*moved.shape[: len(down)]):
        blocks = [_numbers(moved[(*index, j)], precision).splitlines() for j in range(moved.shape[len(down)])]
        width = max(len(line) for block in blocks for line in block)
        heads = [f"{names[across]} {j}" for j in range(len(blocks))]
        width = max(width, *(len(h) for h in heads))
        if down:
            lines.append(", ".join(f"{names[k]} {i}" for k, i in zip(down, index, strict=True)) + ":")
        lines.append("  ".join(h.ljust(width) for h in heads).rstrip())
        for row in range(max(len(b) for b in blocks)):
            lines.append("  ".join((b[row] if row < len(b) else "").ljust(width) for b in blocks).rstrip())
    return "\n".join(lines)


def _numbers(a: np.ndarray, precision: int) -> str:
    return np.array2string(np.asarray(a), precision=precision, suppress_small=False, max_line_width=10_000, floatmode="fixed")


def overview(result: CaseResult) -> list[str]:
    """With several steps, or an optimizer with state: the optimizer's settings and each engine's
    loss before every step, before the quantities one by one."""
    case = result.loaded
    if case.steps == 1 and computation.plain_sgd(case):
        return []
    lines = [f"optimizer: {computation.settings_text(case)}, {case.steps} step{'s' if case.steps > 1 else ''}"]
    for name in result.ran:
        losses = ", ".join(f"{loss:.9g}" for loss in result.runs[name].output.losses)
        lines.append(f"loss before each step, {name}: {losses}")
    return lines


def render_terminal(result: CaseResult, precision: int = 8):
    """Rich renderables: per quantity a heading with its formula, then each engine's value on
    its own lines, aligned, so that the engines' numbers stand one under the other."""
    from rich.console import Group
    from rich.markup import escape

    case = result.loaded
    parts = [
        f"[bold]{escape(case.name)}[/bold] ({escape(case.path)}, {case.dtype.name}, lr {case.lr:g}): {', '.join(result.ran)}"
    ]
    parts += [f"[yellow]{escape(line)}[/yellow]" for line in not_run(result)]
    parts += [escape(line) for line in overview(result)]
    if result.diagnosis is not None:
        parts.append(f"[red]diagnosis: {escape(result.diagnosis.sentence)}[/red]")
        parts += [f"[red]hint: {escape(h)}[/red]" for h in result.diagnosis.hints]
    shown = sections(result)
    width = max((len(n) for s in shown for n in s.values), default=0)
    for s in shown:
        title = f"\n[bold]{escape(s.heading)}[/bold]   [dim]{escape(s.formula)}[/dim]"
        if s.divergence:
            title += f"   [red]<- {escape(s.divergence)}[/red]"
        parts.append(title)
        for engine, v in s.values.items():
            text = _array_text(v, precision, s.dims).splitlines()
            parts.append("\n".join(f"  {(engine if k == 0 else ''):<{width}}  {escape(line)}" for k, line in enumerate(text)))
    return Group(*parts)


def render_markdown(result: CaseResult, precision: int = 8) -> str:
    """The same, as Markdown an instructor can hand out."""
    case = result.loaded
    lines = [
        f"# {case.name}",
        "",
        f"`{case.path}`, {case.dtype.name}, loss {case.loss} ({case.reduction}, scale {case.scale:g}), lr {case.lr:g}.",
        f"Engines: {', '.join(result.ran)}.",
        "",
    ]
    if case.description:
        lines += [case.description, ""]
    missing = not_run(result)
    lines += [f"- {line}" for line in missing] + ([""] if missing else [])
    summary = overview(result)
    lines += [f"- {line}" for line in summary] + ([""] if summary else [])
    if result.diagnosis is not None:
        lines += [f"**Diagnosis:** {result.diagnosis.sentence}", ""] + [f"- hint: {h}" for h in result.diagnosis.hints]
        lines += [""] if result.diagnosis.hints else []
    for s in sections(result):
        lines += [f"## {s.heading}" + (f" ⟵ **{s.divergence}**" if s.divergence else ""), "", f"`{s.formula}`", ""]
        for engine, v in s.values.items():
            lines += [f"{engine}:", "```", _array_text(v, precision, s.dims), "```"]
        lines.append("")
    return "\n".join(lines)
