"""``manualprop explain CASE``: the step layer by layer, as the seed notebooks compute it by hand.

For each layer, the forward tensors (Z, A), then the loss, then backward from the last layer
(dA, dZ, dW, db), then the update (the updated parameters and the deltas), each engine side by
side. The first divergence, if any, is marked. ``--markdown`` gives the same as Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .case import Case
from . import engines
from .diagnose import Step, value
from .harness import CaseResult

FORMULA = {
    "Z": "Z = A_prev @ W + b",
    "A": "A = f(Z)",
    "dA": "dA = dL/dA: from the layer above, dA = dZ_next @ W_next.T",
    "dZ": "dZ = dL/dZ = dA * f'(Z)",
    "dW": "dW = A_prev.T @ dZ",
    "db": "db = dZ summed over the batch",
}


@dataclass
class Section:
    """One quantity to show: a heading, its formula, and each engine's value."""

    heading: str
    formula: str
    values: dict[str, np.ndarray | None]
    divergence: str | None = None  # "first divergence: in keras"


def sections(result: CaseResult) -> list[Section]:
    case: Case = result.case
    runs = [result.runs[n] for n in result.ran]
    d = result.diagnosis

    def section(heading, formula, step):
        mark = None
        if d is not None and d.step == step:
            mark = f"first divergence: in {d.engine}" if d.engine else "first divergence"
        shown = {r.engine: value(r, step) for r in runs}
        if result.oracle is not None and engines.ORACLE not in shown:
            shown[f"{engines.ORACLE} (oracle)"] = value(result.oracle, step)
        return Section(heading, formula, shown, mark)

    out: list[Section] = []
    last = len(case.layers) - 1
    on_logits = case.loss == "categorical_crossentropy"
    for i, layer in enumerate(case.layers):
        name = layer.activation if layer.activation != "leaky_relu" else f"leaky_relu, alpha {layer.alpha:g}"
        out.append(section(f"layer {i} ({name}) forward: Z", FORMULA["Z"], Step("Z", i, "Z")))
        out.append(section(f"layer {i} ({name}) forward: A", FORMULA["A"].replace("f", layer.activation, 1), Step("A", i, "A")))
    reduction = f"{case.reduction}, scale {case.scale:g}"
    loss = section("loss", f"{case.loss} ({reduction}) of the last A against the targets", Step("loss", None, "loss"))
    if case.expected is not None and case.expected.loss is not None:
        loss.values["expected"] = np.array(case.expected.loss)
    out.append(loss)
    for i in reversed(range(len(case.layers))):
        if i == last and on_logits:
            out.append(section(f"layer {i} backward: the error gradient at the output layer",
                               "dZ = dL/dZ = p * sum(t) - t (softmax with cross-entropy, on the logits), over N for a mean",
                               Step("loss gradient", i, "dZ")))
        else:
            label = "loss gradient" if i == last else "dA"
            formula = "dA = dL/dA, the loss gradient" if i == last else FORMULA["dA"]
            out.append(section(f"layer {i} backward: dA", formula, Step(label, i, "dA")))
            heading = "the error gradient at the output layer" if i == last else "the aggregated error gradient"
            out.append(section(f"layer {i} backward: dZ, {heading}", FORMULA["dZ"], Step("dZ", i, "dZ")))
        dW = section(f"layer {i} backward: dW", FORMULA["dW"], Step("dW", i, "dW"))
        if case.layers[i].layout == "weight":  # the case file's own layout, as nn.Linear.weight.grad
            dW = Section(f"layer {i} backward: dW, (out, in) as the case gives weight", "dW = dZ.T @ A_prev",
                         {n: None if v is None else v.T for n, v in dW.values.items()}, dW.divergence)
        out.append(dW)
        if case.layers[i].bias is not None:
            out.append(section(f"layer {i} backward: db", FORMULA["db"], Step("db", i, "db")))
    golden = case.expected
    for name, initial in case.parameters().items():
        delta = section(f"{name}: delta", f"delta = -lr * dL/dp (lr {case.lr:g})", Step("delta", None, name))
        updated = Section(f"{name}: updated", "p - lr * dL/dp", {
            n: None if v is None else initial.astype(np.float64) + v for n, v in delta.values.items()})
        if golden is not None and name in golden.updated:
            updated.values["expected"] = golden.updated[name]
        if golden is not None and name in golden.deltas:
            delta.values["expected"] = golden.deltas[name]
        out += [_in_file_layout(case, name, updated), _in_file_layout(case, name, delta)]
    return out


def _in_file_layout(case: Case, param: str, s: Section) -> Section:
    """A parameter's section named and laid out as the case file gives it (weight: (out, in))."""
    shown = case.shown_as(param)
    if shown == param:
        return s
    values = {n: None if v is None else case.in_file_layout(param, v) for n, v in s.values.items()}
    return Section(s.heading.replace(param, f"{shown} (out, in)", 1), s.formula, values, s.divergence)


def not_run(result: CaseResult) -> list[str]:
    """Every engine asked for that did not run, with its reason."""
    return [f"{name} did not run ({run.status}): {run.reason}" for name, run in result.runs.items() if run.status != "ran"]


def _array_text(a: np.ndarray | None, precision: int) -> str:
    if a is None:
        return "-"
    return np.array2string(np.asarray(a), precision=precision, suppress_small=False, max_line_width=10_000, floatmode="fixed")


def render_terminal(result: CaseResult, precision: int = 8):
    """Rich renderables: per quantity a heading with its formula, then each engine's value on
    its own lines, aligned, so that the engines' numbers stand one under the other."""
    from rich.console import Group
    from rich.markup import escape

    case = result.case
    parts = [f"[bold]{escape(case.name)}[/bold] ({escape(case.path)}, {case.dtype.name}, lr {case.lr:g}): {', '.join(result.ran)}"]
    parts += [f"[yellow]{escape(line)}[/yellow]" for line in not_run(result)]
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
            text = _array_text(v, precision).splitlines()
            parts.append("\n".join(f"  {(engine if k == 0 else ''):<{width}}  {escape(line)}" for k, line in enumerate(text)))
    return Group(*parts)


def render_markdown(result: CaseResult, precision: int = 8) -> str:
    """The same, as Markdown an instructor can hand out."""
    case = result.case
    lines = [f"# {case.name}", "", f"`{case.path}`, {case.dtype.name}, loss {case.loss} ({case.reduction}, scale {case.scale:g}), lr {case.lr:g}.",
             f"Engines: {', '.join(result.ran)}.", ""]
    if case.description:
        lines += [case.description, ""]
    missing = not_run(result)
    lines += [f"- {line}" for line in missing] + ([""] if missing else [])
    if result.diagnosis is not None:
        lines += [f"**Diagnosis:** {result.diagnosis.sentence}", ""] + [f"- hint: {h}" for h in result.diagnosis.hints]
        lines += [""] if result.diagnosis.hints else []
    for s in sections(result):
        lines += [f"## {s.heading}" + (f" ⟵ **{s.divergence}**" if s.divergence else ""), "", f"`{s.formula}`", ""]
        for engine, v in s.values.items():
            lines += [f"{engine}:", "```", _array_text(v, precision), "```"]
        lines.append("")
    return "\n".join(lines)
