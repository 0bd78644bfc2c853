"""What a run and a case come to: one engine's run, a case's result and its verdict, and which
comparisons count against a case (not the known differences, not what the oracle showed to be
rounding). Judging sits below running: :mod:`manualprop.harness` fills these, and diagnose,
explain and the reports read them; nothing here imports the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..casefile.case import Case
from ..casefile.errors import CaseError
from ..engines import StepResult
from .compare import Comparison
from .outcomes import Status, Verdict

if TYPE_CHECKING:
    from .diagnose import Diagnosis


@dataclass
class EngineRun:
    """One engine on one case: ``ran`` with a result, ``skipped`` or ``error`` with a reason."""

    engine: str
    status: Status
    result: StepResult | None = None
    reason: str | None = None
    seconds: float = 0.0
    non_finite: str | None = None  # where a NaN or an infinity first appeared: an outcome of its own

    @property
    def output(self) -> StepResult:
        """The result of a run that ran; asking it of a skipped or crashed run is a bug."""
        if self.result is None:
            raise RuntimeError(f"{self.engine} {self.status}: it has no result")
        return self.result


@dataclass
class CaseResult:
    """A case file's outcome: a load error, or the runs and every comparison made."""

    path: str
    case: Case | None = None
    error: CaseError | None = None
    runs: dict[str, EngineRun] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    expected: list[Comparison] = field(default_factory=list)
    oracle: EngineRun | None = None  # the finite-difference oracle, when it ran to arbitrate
    diagnosis: Diagnosis | None = None
    notes: list[str] = field(default_factory=list)  # failures of the case as a whole (a known difference that vanished)
    vanished: dict[str, str] = field(default_factory=dict)  # engine -> its note, for the known differences that vanished

    @property
    def loaded(self) -> Case:
        """The case of a file that loaded; asking it of a load error is a bug."""
        if self.case is None:
            raise RuntimeError(f"{self.path} did not load: it has no case")
        return self.case

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and all(run.status != Status.ERROR and not run.non_finite for run in self.runs.values())
            and not any(failed(c) for c in [*self.comparisons, *self.expected])
            and not self.notes
        )

    @property
    def verdict(self) -> Verdict:
        """pass, fail, known, non-finite, invalid, or "not compared" (fewer than two engines, no golden values)."""
        if self.error is not None:
            return Verdict.INVALID
        if any(run.non_finite for run in self.runs.values()):
            return Verdict.NON_FINITE
        if not self.ok:
            return Verdict.FAIL
        if any(is_known(c) for c in [*self.comparisons, *self.expected]):
            return Verdict.KNOWN
        return Verdict.PASS if self.compared else Verdict.NOT_COMPARED

    @property
    def compared(self) -> bool:
        """Whether anything was compared: two engines ran, or golden values were checked."""
        return self.error is None and (len(self.ran) >= 2 or bool(self.expected))

    def why_not_compared(self) -> str:
        """Why nothing was compared, in a sentence (for a case that loaded)."""
        ran = self.ran
        golden = "the case has no golden values" if self.loaded.expected is None else "its golden values need an engine that runs"
        if not ran:
            return f"no engine ran, and {golden}" if self.loaded.expected is not None else "no engine ran"
        return f"only {ran[0]} ran and {golden}: nothing to compare it with"

    @property
    def worst(self) -> Comparison | None:
        """The comparison closest to (or furthest past) its tolerance."""
        return max([*self.comparisons, *self.expected], key=lambda c: c.worst_ratio, default=None)

    @property
    def ran(self) -> list[str]:
        return [name for name, run in self.runs.items() if run.status == Status.RAN]


def is_known(c: Comparison) -> bool:
    """A failed comparison that the case declares as a known difference."""
    return bool(c.extra.get("known"))


def mark_known(case: Case, comparisons: list[Comparison]) -> list[Comparison]:
    """Failed comparisons involving an engine the case declares as different become known ones
    (only on the parameters the declaration names, when it names some)."""
    return [replace(c, extra={**c.extra, "known": True}) if not c.ok and _declared(case, c) else c for c in comparisons]


def _declared(case: Case, c: Comparison) -> bool:
    return any(
        name in (c.a, c.b) and (name not in case.known_params or c.param in case.known_params[name])
        for name in case.known_differences
    )


def vanished_differences(case: Case, result: CaseResult) -> dict[str, str]:
    """Known differences that did not show (strict, like pytest's xfail), by engine: each a change to look at."""
    notes = {}
    for name, reason in case.known_differences.items():
        involved = [
            c
            for c in [*result.comparisons, *result.expected]
            if name in (c.a, c.b) and (name not in case.known_params or c.param in case.known_params[name])
        ]
        if name in result.ran and involved and not any(is_known(c) for c in involved):
            notes[name] = (
                f"{name} was declared to differ ({reason}), but it agrees: the convention may have changed "
                f"in this version; look, then update or remove known_differences.{name}"
            )
    return notes


def is_rounding(c: Comparison) -> bool:
    """A failed comparison that the oracle showed to be rounding: both engines are close to it."""
    return bool(c.extra.get("rounding"))


def failed(c: Comparison) -> bool:
    """A comparison that counts against the case: not ok, and neither known nor rounding."""
    return not c.ok and not is_known(c) and not is_rounding(c)
