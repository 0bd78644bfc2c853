"""Running cases through engines and deciding what agrees: shared by the CLI and pytest."""

from __future__ import annotations

import inspect
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from . import engines
from .casefile.case import Case, closest, display_path, load_case
from .casefile.errors import CaseError, format_path
from .concepts import GRADIENT_FIELD
from .engines import StepResult
from .verdict import conditioning
from .verdict.compare import Comparison, compare, missing
from .verdict.diagnose import Diagnosis, Step, diagnose, diagnose_expected, first_non_finite, precise_enough
from .verdict.outcomes import Status
from .verdict.results import CaseResult, EngineRun, failed, mark_known, vanished_differences

CASE_SUFFIXES = (".yaml", ".yml")


def bundled_cases() -> Path:
    """The project's own cases: installed beside the package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cases", here.parent / "cases"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the bundled cases are missing (looked in {here / 'cases'} and {here.parent / 'cases'})")


def find_cases(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Case files named directly, every *.yaml / *.yml below the folders named, and bundled
    cases named by their name (``seed004-batch-linear-linear``) or their file's stem."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix in CASE_SUFFIXES and p.is_file()))
        elif path.exists():
            found.append(path)
        else:
            found.append(bundled_case(str(raw)))
    return found


_NAME_LINE = re.compile(r"""^name:[ \t]*["']?([^"'#\n]*?)["']?[ \t]*(?:#.*)?$""", re.MULTILINE)


def bundled_case(name: str) -> Path:
    """The bundled case file called ``name`` (its ``name:`` or its file's stem); FileNotFoundError
    naming the closest ones when there is none."""
    by_name: dict[str, Path] = {}
    for path in sorted(bundled_cases().rglob("*")):
        if path.suffix in CASE_SUFFIXES:
            declared = _NAME_LINE.search(path.read_text(encoding="utf-8"))
            for key in (path.stem, declared[1] if declared else None):
                if key:
                    by_name.setdefault(key, path)
    if name in by_name:
        return by_name[name]
    names = {path: key for key, path in by_name.items()}  # one name a file: its name: where it has one
    close = [key for key in names.values() if name.lower() in key.lower()][:3]
    if not close and (near := closest(name, names.values())) is not None:
        close = [near]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f" (the bundled cases are in {bundled_cases()})"
    raise FileNotFoundError(f"no such file or folder, and no bundled case named {name!r}{hint}")


def select_engines(case: Case, requested: Iterable[str] | None = None) -> list[str]:
    """The engines to run: those requested that the case allows; else the case's own list; else the defaults."""
    if requested:
        return [n for n in requested if case.engines is None or n in case.engines]
    return list(case.engines) if case.engines is not None else engines.default_names()


def run_engine(case: Case, name: str) -> EngineRun:
    """One step of ``case`` in engine ``name``; a missing framework is a skip, a crash an error."""
    engine = engines.get(name)
    reason = engine.unavailable() or engines.refusal(engine, case)
    if reason:
        return EngineRun(name, Status.SKIPPED, reason=reason)
    start = time.perf_counter()
    try:
        result = engine.step(case)
    except Exception as err:  # an engine's failure is an outcome to report, not a crash
        reason = f"crashed {crash_site(err, engine)}: {type(err).__name__}: {err}"
        return EngineRun(name, Status.ERROR, reason=reason, seconds=time.perf_counter() - start)
    return EngineRun(
        name, Status.RAN, result=result, seconds=time.perf_counter() - start, non_finite=first_non_finite(case, result)
    )


def crash_site(err: BaseException, engine: object) -> str:
    """Where an engine crashed, as far as the traceback tells: the innermost frame in the engine's own
    code (its class's module, or any module of this package), else the innermost frame."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return "before its first line"
    own = {Path(inspect.getfile(cls)).resolve() for cls in type(engine).__mro__ if cls is not object and _has_file(cls)}
    package = Path(__file__).resolve().parent
    mine = [f for f in frames if Path(f.filename).resolve() in own or package in Path(f.filename).resolve().parents]
    frame = (mine or frames)[-1]
    return f"in {frame.name} ({Path(frame.filename).name}:{frame.lineno})"


def _has_file(cls: type) -> bool:
    try:
        inspect.getfile(cls)
    except TypeError:  # a built-in class
        return False
    return True


def oracle_for(case: Case, runs: dict[str, EngineRun], cache: dict | None = None) -> EngineRun | None:
    """The oracle's run: the one already made, or a new one (remembered in ``cache``)."""
    oracle = runs.get(engines.ORACLE)
    if oracle is None and engines.ORACLE in engines.names():
        key = (case.path, engines.ORACLE)
        oracle = cache.get(key) if cache is not None else None
        if oracle is None:
            oracle = run_engine(case, engines.ORACLE)
            if cache is not None:
                cache[key] = oracle
    return oracle if oracle is not None and oracle.status == Status.RAN else None


def settle(case: Case, comparisons: list[Comparison], runs: dict[str, EngineRun], oracle: EngineRun | None) -> list[Comparison]:
    """Pairs that disagree, but each lie within the tolerance of the float64 oracle where the oracle
    is precise enough to judge (its uncertainty under a tenth of the tolerance): rounding in an
    ill-conditioned step (tanh' = 1 - a^2 near saturation, a cancelling sum), not a mismatch.
    In float32 this is the triangle inequality at work: two engines each 55% of the tolerance
    from the truth can be 110% of it from each other."""
    if oracle is None:
        return comparisons
    return [_judged(case, c, runs, oracle) if failed(c) and oracle.engine not in (c.a, c.b) else c for c in comparisons]


def _judged(case: Case, c: Comparison, runs: dict[str, EngineRun], oracle: EngineRun) -> Comparison:
    a, b = runs.get(c.a), runs.get(c.b)
    if a is None or b is None or a.status != Status.RAN or b.status != Status.RAN:
        return c
    values: list[ArrayLike]
    precise: ArrayLike | None
    uncertainty: ArrayLike
    if c.param == "loss":
        # the loss before each step, as the comparison holds them
        values = [_losses(case, a.output), _losses(case, b.output)]
        precise, uncertainty, initial = _losses(case, oracle.output), 0.0, None
    else:
        da, db = a.output.deltas.get(c.param), b.output.deltas.get(c.param)
        precise, uncertainty = oracle.output.deltas.get(c.param), oracle.output.uncertainty.get(c.param, 0.0)
        initial = case.parameters()[c.param]
        if precise is None or da is None or db is None or np.shape(da) != np.shape(precise) or np.shape(db) != np.shape(precise):
            return c
        values = [da, db]
    step = Step("loss", None, "loss") if c.param == "loss" else Step("delta", None, c.param)
    if not precise_enough(case, step, precise, uncertainty):
        return c  # the oracle cannot tell rounding from a fault here
    ratios = [
        compare(c.param, name, v, oracle.engine, precise, case.rtol, case.atol, reference=initial, allowance=uncertainty)
        for name, v in zip((c.a, c.b), values, strict=True)
    ]
    if all(r.ok for r in ratios):
        return replace(c, extra={**c.extra, "rounding": {c.a: ratios[0].worst_ratio, c.b: ratios[1].worst_ratio}})
    return c


def arbitrate(case: Case, result: CaseResult) -> None:
    """On a disagreement that is not known, run the oracle (unless it ran): it excuses rounding,
    and what is left is diagnosed. When the engines agree and golden values do not, the golden
    values are diagnosed; when nothing else is, a crash is the finding."""
    contenders = [result.runs[n] for n in result.ran if n != engines.ORACLE]
    if any(failed(c) for c in result.comparisons):
        result.oracle = oracle_for(case, result.runs)
        result.comparisons = settle(case, result.comparisons, result.runs, result.oracle)
        if any(failed(c) for c in result.comparisons):
            result.diagnosis = diagnose(case, contenders, result.oracle)
    elif contenders and any(failed(c) for c in result.expected):

        def oracle() -> EngineRun | None:
            result.oracle = oracle_for(case, result.runs)
            return result.oracle

        result.diagnosis = golden_diagnosis(case, result.expected, contenders, oracle)
    if result.diagnosis is None:
        result.diagnosis = crash_finding(result)


def golden_diagnosis(
    case: Case, expected: list[Comparison], contenders: list[EngineRun], oracle: Callable[[], EngineRun | None]
) -> Diagnosis | None:
    """Engines that agree against golden values: the golden values are diagnosed. One engine alone
    is first held against the oracle (``oracle()`` runs it), which blames the engine if it is off."""
    checked = None
    if len(contenders) == 1:
        checked = oracle()
        found = diagnose(case, contenders, checked) if checked is not None else None
        if found is not None:
            return found
    return diagnose_expected(case, expected, contenders[0].output, [r.engine for r in contenders], checked is not None)


def crash_finding(result: CaseResult) -> Diagnosis | None:
    """An engine that crashed, as a finding: the engine, where it crashed, the exception's message."""
    crashed = [run for run in result.runs.values() if run.status == Status.ERROR]
    if not crashed:
        return None
    first = crashed[0]
    others = [n for n in result.ran if n != engines.ORACLE]
    sentence = f"{first.engine} {first.reason}" + (f"; {', '.join(others)} ran" if others else "")
    return Diagnosis("crash", None, first.engine, others, None, sentence)


def compare_pair(case: Case, a: EngineRun, b: EngineRun, rounding: dict[str, np.ndarray] | None = None) -> list[Comparison]:
    """The loss and every parameter's delta of two engines that ran, under the case's tolerance,
    widened by what each engine states of its own error and by ``rounding``, how far the rounding
    of an engine's gradients can move its delta (:mod:`manualprop.verdict.conditioning`), for each engine."""
    losses = _losses(case, a.output), _losses(case, b.output)
    moved = 2 * np.asarray((rounding or {}).get("loss", 0.0))
    results = [compare("loss", a.engine, losses[0], b.engine, losses[1], case.rtol, case.atol, allowance=moved)]
    for param, initial in case.parameters().items():
        da, db = a.output.deltas.get(param), b.output.deltas.get(param)
        if da is None or db is None:
            results.append(missing(param, a.engine, b.engine, case.rtol, case.atol, a.engine if da is None else b.engine))
            continue
        allowance = np.asarray(a.output.uncertainty.get(param, 0.0)) + np.asarray(b.output.uncertainty.get(param, 0.0))
        allowance = allowance + 2 * np.asarray((rounding or {}).get(param, 0.0))
        results.append(
            compare(
                param,
                a.engine,
                da,
                b.engine,
                db,
                case.rtol,
                case.atol,
                reference=initial,
                allowance=allowance,
                shown_as=case.shown_as(param),
            )
        )
    return [_located(case, c, _field_of(case.shown_as(c.param))) for c in results]


def _rounding(
    case: Case, runs: dict[str, EngineRun], pair: tuple[EngineRun, EngineRun], allowances: dict[str, dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """What rounding can move, for a pair: estimated from the NumPy reference's trace and from each
    engine of the pair whose trace is at hand (not computed for this: Keras's costs a second pass),
    and the smallest taken, so that an engine whose slip inflates its own estimate does not
    excuse itself."""
    reference = runs.get("numpy")
    own = [run for run in pair if run.engine not in (engines.ORACLE, "numpy") and _traced(case, run.output)]
    if reference is not None and reference.status == Status.RAN:
        own.append(reference)
    estimates = []
    for run in own:
        if run.engine not in allowances:
            allowances[run.engine] = conditioning.allowance(case, run.output.history)
        estimates.append(allowances[run.engine])
    if not estimates:
        return conditioning.allowance(case)
    return {name: np.minimum.reduce([np.asarray(e[name]) for e in estimates]) for name in estimates[0]}


def _traced(case: Case, result: StepResult) -> bool:
    """Whether every step of a run holds its whole trace already: each layer's output, and the
    gradient of each of its trainable parameters."""
    history = result.history or []
    needed = [[GRADIENT_FIELD[name] for name in layer.declared.params if name in layer.arrays()] for layer in case.layers]
    return bool(history) and all(
        record.has_trace
        and record.trace
        and len(record.trace) == len(needed)
        and all(
            t.A is not None and all(getattr(t, f) is not None for f in fields)
            for t, fields in zip(record.trace, needed, strict=True)
        )
        for record in history
    )


def _losses(case: Case, result: StepResult) -> np.ndarray:
    """The loss before the step; with several steps, the loss before each (index k: step k + 1)."""
    return np.array(result.loss) if case.steps == 1 else np.array(result.losses)


def _field_of(param: str) -> tuple:
    """'layers.1.weight' -> ("layers", 1, "weight"): where the case file defines the parameter."""
    parts = param.split(".")
    return ("layers", int(parts[1]), parts[2]) if len(parts) == 3 else ()


def _located(case: Case, c: Comparison, field: tuple) -> Comparison:
    """A failed comparison with the place in the case file that it concerns."""
    if c.ok or not field:
        return c
    where = f"{case.path}:{case.line_of(field)}" if case.line_of(field) else case.path
    return replace(c, message=f"{c.message}\n  in the case file: {where} ({format_path(field)})")


def check_expected(case: Case, run: EngineRun) -> list[Comparison]:
    """One engine's loss, updated parameters and deltas against the case's golden values."""
    exp = case.expected
    if exp is None or run.status != Status.RAN:
        return []
    results = []
    if exp.loss is not None:
        got = np.array(run.output.losses) if isinstance(exp.loss, list) else np.array(run.output.loss)
        results.append(compare("loss", run.engine, got, "expected", np.array(exp.loss), exp.rtol, exp.atol))
    params = case.parameters()
    for kind, table in (("updated", exp.updated), ("deltas", exp.deltas)):
        for param, value in table.items():
            delta = run.output.deltas.get(param)
            if delta is None:
                results.append(missing(param, run.engine, "expected", exp.rtol, exp.atol, run.engine))
                continue
            got = params[param].astype(np.float64) + delta if kind == "updated" else delta
            given = exp.given_as.get((kind, param), param)
            c = compare(
                param,
                run.engine,
                got,
                "expected",
                value,
                exp.rtol,
                exp.atol,
                allowance=run.output.uncertainty.get(param, 0.0),
                shown_as=given,
            )
            c = replace(c, extra={"kind": kind}, message=c.message.replace(f"{given}:", f"{given} ({kind}):", 1))
            results.append(_located(case, c, ("expected", kind, given)))
    return results


def golden_groups(result: CaseResult) -> list[tuple[list[str], list[Comparison]]]:
    """The golden values that fail, by engine, with engines that agree with each other (no failed
    comparison between them) and miss the same golden values in one group: one block to print
    instead of one per engine. Each group carries its first engine's comparisons."""
    failing: dict[str, list[Comparison]] = {}
    for c in result.expected:
        if failed(c):
            failing.setdefault(c.a, []).append(c)
    apart = {frozenset((c.a, c.b)) for c in result.comparisons if failed(c)}
    groups: list[tuple[list[str], list[Comparison]]] = []
    for name, comparisons in failing.items():
        keys = [(c.param, c.extra.get("kind")) for c in comparisons]
        for names, first in groups:
            if keys == [(c.param, c.extra.get("kind")) for c in first] and not any(frozenset((n, name)) in apart for n in names):
                names.append(name)
                break
        else:
            groups.append(([name], comparisons))
    return groups


def golden_block(names: list[str], comparisons: list[Comparison]) -> str:
    """One group's failures, its engines named together (the values shown are the first's)."""
    together = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    lines = (
        []
        if len(names) == 1
        else [f"{together} agree with each other, and the golden values differ from all of them (values shown: {names[0]}'s)"]
    )
    for c in comparisons:
        lines.append(c.message.replace(f" {c.a} and expected disagree", f" {', '.join(names)} and expected disagree", 1))
    return "\n".join(lines)


def run_case(case: Case, requested: Iterable[str] | None = None) -> CaseResult:
    """Every selected engine on ``case``, each pair compared, golden values checked."""
    result = CaseResult(case.path, case)
    for name in select_engines(case, requested):
        result.runs[name] = run_engine(case, name)
    ran = [result.runs[n] for n in result.ran]
    allowances: dict[str, dict[str, np.ndarray]] = {}
    for a, b in combinations(ran, 2):
        pair = compare_pair(case, a, b)
        if not all(c.ok for c in pair):  # is it the rounding of a gradient that is nearly nothing?
            pair = compare_pair(case, a, b, _rounding(case, result.runs, (a, b), allowances))
        result.comparisons.extend(pair)
    for run in ran:
        result.expected.extend(check_expected(case, run))
    result.comparisons = mark_known(case, result.comparisons)
    result.expected = mark_known(case, result.expected)
    result.vanished = vanished_differences(case, result)
    result.notes = list(result.vanished.values())
    arbitrate(case, result)
    return result


def run_paths(paths: Iterable[Path], requested: Iterable[str] | None = None) -> Iterator[CaseResult]:
    """Load and run each case file; a file that does not load yields a result with its error."""
    known = engines.names()
    for path in paths:
        try:
            case = load_case(path, known)
        except CaseError as err:
            yield CaseResult(display_path(path), error=err)
            continue
        yield run_case(case, requested)


def environment() -> dict:
    """The fingerprint of this process for the report: see :mod:`manualprop.reports.fingerprint`."""
    from .reports.fingerprint import environment as fingerprint

    return fingerprint()
