"""What an engine's run and a case come to, as enums: a typo is an error, and the JSON report keeps
its strings (SPEC section 5), since a ``StrEnum`` member is the string it stands for.

This module imports nothing from the package: running (``harness``) and judging sit above it.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10 (a cell of the nightly matrix): the same behaviour, written out

    class StrEnum(str, Enum):
        """A member is the string it stands for, in str(), format() and comparisons."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Status(StrEnum):
    """One engine on one case: it ran (with a result), was skipped, or crashed (both with a reason)."""

    RAN = "ran"
    SKIPPED = "skipped"
    ERROR = "error"


class Verdict(StrEnum):
    """A case's outcome, as ``manualprop run`` prints it, the JSON report and the compatibility table keep it."""

    PASS = "pass"
    FAIL = "fail"
    KNOWN = "known"  # a declared known difference showed up
    NON_FINITE = "non-finite"  # a NaN or an infinity in an engine's results
    INVALID = "invalid"  # the case file did not load
    NOT_COMPARED = "not compared"  # fewer than two engines ran, and no golden values were checked

    @property
    def failing(self) -> bool:
        """Whether the verdict fails a run: the report's ``ok`` is false, the compatibility table has failed."""
        return self in (Verdict.FAIL, Verdict.NON_FINITE, Verdict.INVALID)
