"""Case files as pytest items (pytest's "non-python tests" pattern).

Installed, manualprop registers this plugin through pytest's ``pytest11`` entry point (as
pytest-xdist does), so ``pytest`` in any repository collects the files that are clearly cases:
by default those named ``*.case.yaml`` / ``*.case.yml``, or whatever the ini option
``manualprop_files`` lists (this repository: every YAML file below ``cases/``). Each case gives
one item per pair of engines, named like ``cs4820-a7-tanh-softmax[numpy-vs-torch]``, and one
item for its golden values (``[expected]``). A failure is reported in the case's terms
(parameter, worst element, both values, tolerance), a missing framework is a skip with its
reason, a case on which nothing can be compared is a skip that says why, and a case file that
does not load is one failing item that lists its problems.

The case runs once (every engine, the arbitration and the diagnosis of :mod:`manualprop.harness`,
as ``manualprop run`` does) and its items report their part of that one result.
"""

from __future__ import annotations

import fnmatch
import json
from itertools import combinations
from pathlib import Path

import pytest

from . import engines, harness
from .casefile.case import Case, load_case
from .casefile.errors import CaseError
from .verdict.compare import Comparison
from .verdict.outcomes import Status
from .verdict.results import CaseResult, EngineRun, failed, is_known

DEFAULT_FILES = "*.case.yaml *.case.yml"
_RESULTS = pytest.StashKey[dict]()  # case path -> CaseResult, per process (per pytest-xdist worker)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "manualprop_files",
        type="args",
        default=DEFAULT_FILES.split(),
        help=(
            "case files to collect: glob patterns matched against the file name, or, when a pattern has a '/', "
            f"against the path from the rootdir ('*' crosses folders). Default: {DEFAULT_FILES}"
        ),
    )
    parser.addoption(
        "--manualprop-deltas",
        metavar="DIR",
        default=None,
        help="write each engine's deltas per case to DIR/<case>/<engine>.json (to check determinism)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}


def is_case_file(file_path: Path, rootpath: Path, patterns: list[str]) -> bool:
    """A YAML file that a pattern of ``manualprop_files`` names."""
    if file_path.suffix not in harness.CASE_SUFFIXES:
        return False
    try:
        relative = file_path.relative_to(rootpath).as_posix()
    except ValueError:
        relative = file_path.as_posix()
    return any(fnmatch.fnmatch(relative if "/" in p else file_path.name, p) for p in patterns)


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    config = parent.config
    if is_case_file(file_path, config.rootpath, config.getini("manualprop_files")):
        return CaseFile.from_parent(parent, path=file_path)
    return None


def case_result(config: pytest.Config, case: Case) -> CaseResult:
    """The case run once in this process, shared by its items."""
    results = config.stash[_RESULTS]
    if case.path not in results:
        results[case.path] = result = harness.run_case(case)
        option = config.getoption("--manualprop-deltas", default=None)
        if option:
            _write_deltas(Path(option) / case.name, result)
    return results[case.path]


def _write_deltas(folder: Path, result: CaseResult) -> None:
    for name, run in result.runs.items():
        if run.status == Status.RAN and name != engines.ORACLE:
            folder.mkdir(parents=True, exist_ok=True)
            deltas = {k: v.astype("float64").tolist() for k, v in sorted(run.output.deltas.items())}
            (folder / f"{name}.json").write_text(json.dumps(deltas), encoding="utf-8")


class CaseFailure(Exception):
    """A failed comparison, described in the case's own terms."""


class CaseFile(pytest.File):
    def collect(self):
        try:
            case = load_case(self.path, engines.names())
        except CaseError as err:
            yield InvalidCaseItem.from_parent(self, name=f"{self.path.stem}[valid-case-file]", error=err)
            return
        selected = harness.select_engines(case)
        for a, b in combinations(selected, 2):
            yield PairItem.from_parent(self, name=f"{case.name}[{a}-vs-{b}]", case=case, engines=(a, b))
        if case.expected is not None:
            yield ExpectedItem.from_parent(self, name=f"{case.name}[expected]", case=case, engines=tuple(selected))
        elif len(selected) < 2:
            yield NotComparedItem.from_parent(self, name=f"{case.name}[not-compared]", case=case, engines=tuple(selected))


class _CaseItem(pytest.Item):
    def __init__(self, *, case: Case | None = None, engines: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.engines = engines

    @property
    def loaded(self) -> Case:
        """The item's case: every item has one but an invalid case file's."""
        if self.case is None:
            raise RuntimeError(f"{self.name}: an invalid case file has no case")
        return self.case

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (CaseFailure, CaseError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        line = (self.case.lines.get(()) or 1) - 1 if self.case else 0
        return self.path, line, self.name

    def result(self) -> CaseResult:
        return case_result(self.config, self.loaded)

    def header(self, what: str) -> str:
        case = self.loaded
        return f"case {case.name} ({case.path}, {case.dtype.name}): {what}"

    def known(self, result: CaseResult, comparisons: list[Comparison]) -> None:
        """A declared known difference is an xfail when it shows, and a failure when it vanished
        (strict, like pytest's xfail; the harness decides which, as for ``manualprop run``)."""
        vanished = [note for name, note in result.vanished.items() if name in self.engines]
        if vanished:
            raise CaseFailure(self.header("\n".join(vanished)))
        if any(is_known(c) for c in comparisons) and not any(failed(c) for c in comparisons):
            known = {n: r for n, r in self.loaded.known_differences.items() if n in self.engines}
            pytest.xfail("known difference: " + "; ".join(f"{n}: {r}" for n, r in known.items()))

    def diagnosis(self, result: CaseResult) -> list[str]:
        """The case's diagnosis: the first divergence and who is blamed, or where golden values went wrong."""
        found = result.diagnosis
        if found is None or found.quantity == "crash":
            return []
        lines = [f"diagnosis: {found.sentence}"]
        if found.oracle_distance:
            lines.append(
                "oracle (central differences, 128-bit): "
                + ", ".join(
                    f"{n} {d:.3g}x its tolerance away" for n, d in sorted(found.oracle_distance.items(), key=lambda kv: kv[1])
                )
            )
        return lines + [f"hint: {h}" for h in found.hints]


def _needed(run: EngineRun) -> None:
    if run.status == Status.SKIPPED:
        pytest.skip(f"{run.engine}: {run.reason}")
    if run.status == Status.ERROR:
        raise CaseFailure(f"{run.engine} {run.reason}")
    if run.non_finite:
        raise CaseFailure(f"{run.engine} produced a non-finite value: {run.non_finite}")


class PairItem(_CaseItem):
    def runtest(self):
        result = self.result()
        for name in self.engines:
            _needed(result.runs[name])
        comparisons = [c for c in result.comparisons if {c.a, c.b} == set(self.engines)]
        self.known(result, comparisons)
        bad = [c for c in comparisons if failed(c)]
        if bad:
            what = f"{len(bad)} of {len(comparisons)} comparisons fail"
            raise CaseFailure("\n".join([self.header(what), *(c.message for c in bad), *self.diagnosis(result)]))


class ExpectedItem(_CaseItem):
    """The golden values against every engine that ran: engines that agree with each other and
    miss the same golden values are reported together, in one block."""

    def runtest(self):
        result = self.result()
        runs = [result.runs[n] for n in self.engines]
        for run in runs:
            if run.status != Status.SKIPPED:
                _needed(run)  # a crash or a non-finite value fails, as in manualprop run
        if not any(run.status == Status.RAN for run in runs):
            pytest.skip("no engine ran to check the golden values against: " + "; ".join(f"{r.engine}: {r.reason}" for r in runs))
        self.known(result, result.expected)
        groups = harness.golden_groups(result)
        if groups:
            bad = sum(len(comparisons) for _, comparisons in groups)
            lines = [self.header(f"the golden values fail ({bad} comparison{'s' if bad > 1 else ''})")]
            lines += [harness.golden_block(names, comparisons) for names, comparisons in groups]
            raise CaseFailure("\n".join([*lines, *self.diagnosis(result)]))


class NotComparedItem(_CaseItem):
    def runtest(self):
        for name in self.engines:
            _needed(self.result().runs[name])  # a crash or a non-finite value still fails
        selected = ", ".join(self.engines) or "no engine"
        pytest.skip(f"not compared: the case selects {selected} and has no golden values, so nothing can be compared")


class InvalidCaseItem(_CaseItem):
    def __init__(self, *, error: CaseError, **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def runtest(self):
        raise self.error
