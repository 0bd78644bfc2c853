"""Case files as pytest items (pytest's "non-python tests" pattern).

The repository's conftest.py loads this plugin, so ``pytest`` collects every ``*.yaml`` /
``*.yml`` below a folder named ``cases``: one item per pair of engines, named like
``cs4820-a7-tanh-softmax[numpy-vs-torch]``, and one per engine for golden values
(``[keras-vs-expected]``). A failure is reported in the case's terms (parameter, worst
element, both values, tolerance), a missing framework is a skip with its reason, and a case
file that does not load is one failing item that lists its problems.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from . import engines, harness
from .case import Case, load_case
from .compare import Comparison
from .diagnose import diagnose
from .errors import CaseError

# Engine runs are shared by the items of a case within one process (one pytest-xdist worker).
_runs: dict[tuple[str, str], harness.EngineRun] = {}


_deltas_dir: Path | None = None  # --manualprop-deltas: where each engine's deltas are written


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--manualprop-deltas", metavar="DIR", default=None,
                     help="write each engine's deltas per case to DIR/<case>/<engine>.json (to check determinism)")


def pytest_configure(config: pytest.Config) -> None:
    global _deltas_dir
    option = config.getoption("--manualprop-deltas", default=None)
    _deltas_dir = Path(option) if option else None


def _run(case: Case, name: str) -> harness.EngineRun:
    key = (case.path, name)
    if key not in _runs:
        _runs[key] = run = harness.run_engine(case, name)
        if _deltas_dir is not None and run.status == "ran":
            folder = _deltas_dir / case.name
            folder.mkdir(parents=True, exist_ok=True)
            deltas = {k: v.astype("float64").tolist() for k, v in sorted(run.result.deltas.items())}
            (folder / f"{name}.json").write_text(json.dumps(deltas), encoding="utf-8")
    return _runs[key]


def _needed(run: harness.EngineRun) -> None:
    if run.status == "skipped":
        pytest.skip(f"{run.engine}: {run.reason}")
    if run.status == "error":
        raise CaseFailure(f"{run.engine} {run.reason}")
    if run.non_finite:
        raise CaseFailure(f"{run.engine} produced a non-finite value: {run.non_finite}")


def is_case_file(file_path: Path, rootpath: Path) -> bool:
    """A *.yaml / *.yml file below a folder named ``cases`` inside the rootdir."""
    try:
        folders = file_path.relative_to(rootpath).parts[:-1]
    except ValueError:
        folders = file_path.parts[:-1]
    return file_path.suffix in harness.CASE_SUFFIXES and "cases" in folders


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    if is_case_file(file_path, parent.config.rootpath):
        return CaseFile.from_parent(parent, path=file_path)
    return None


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
            for name in selected:
                yield ExpectedItem.from_parent(self, name=f"{case.name}[{name}-vs-expected]", case=case, engines=(name,))


class _CaseItem(pytest.Item):
    def __init__(self, *, case: Case | None = None, engines: tuple[str, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.engines = engines

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (CaseFailure, CaseError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        line = (self.case.lines.get(()) or 1) - 1 if self.case else 0
        return self.path, line, self.name

    def fail_on(self, comparisons: list[Comparison], runs: list[harness.EngineRun]) -> None:
        """Fail in the case's terms; a declared known difference is an xfail, strict like pytest's."""
        known = {n: r for n, r in self.case.known_differences.items() if n in self.engines}
        bad = [c for c in comparisons if not c.ok and not harness.is_rounding(c)]
        if known:
            if bad:
                pytest.xfail("known difference: " + "; ".join(f"{n}: {r}" for n, r in known.items()))
            raise CaseFailure(f"case {self.case.name}: " + "\n".join(
                f"{n} was declared to differ ({r}), but it agrees: the convention may have changed" for n, r in known.items()))
        if bad:
            header = f"case {self.case.name} ({self.case.path}, {self.case.dtype.name}): {len(bad)} of {len(comparisons)} comparisons fail"
            raise CaseFailure("\n".join([header, *(c.message for c in bad), *self.diagnosis(runs, comparisons)]))

    def diagnosis(self, runs: list[harness.EngineRun], comparisons: list[Comparison]) -> list[str]:
        """The first divergence and the oracle's verdict for engines that disagree; for golden values
        that fail, where they went wrong (or the engine, if the oracle finds it off)."""
        oracle = lambda: harness.oracle_for(self.case, {}, _runs)  # noqa: E731
        contenders = [r for r in runs if r.engine != engines.ORACLE]
        if isinstance(self, ExpectedItem):
            found = harness.golden_diagnosis(self.case, comparisons, contenders, oracle)
        else:
            found = diagnose(self.case, contenders, oracle())
        if found is None:
            return []
        lines = [f"diagnosis: {found.sentence}"]
        if found.oracle_distance:
            lines.append("oracle (central differences, 128-bit): " + ", ".join(
                f"{n} {d:.3g}x its tolerance away" for n, d in sorted(found.oracle_distance.items(), key=lambda kv: kv[1])))
        return lines + [f"hint: {h}" for h in found.hints]


class PairItem(_CaseItem):
    def runtest(self):
        a, b = (_run(self.case, name) for name in self.engines)
        _needed(a)
        _needed(b)
        comparisons = harness.compare_pair(self.case, a, b)
        if any(harness.failed(c) for c in comparisons):  # the oracle may show it is rounding
            oracle = harness.oracle_for(self.case, {a.engine: a, b.engine: b}, _runs)
            comparisons = harness.settle(self.case, comparisons, {a.engine: a, b.engine: b}, oracle)
        self.fail_on(comparisons, [a, b])


class ExpectedItem(_CaseItem):
    def runtest(self):
        run = _run(self.case, self.engines[0])
        _needed(run)
        self.fail_on(harness.check_expected(self.case, run), [run])


class InvalidCaseItem(_CaseItem):
    def __init__(self, *, error: CaseError, **kwargs):
        super().__init__(**kwargs)
        self.error = error

    def runtest(self):
        raise self.error
