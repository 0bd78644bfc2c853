"""The errors a user sees: a case file that breaks the rules, with every problem located."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Path = tuple  # a field path such as ("layers", 1, "kernel")


def format_path(path: Sequence[object]) -> str:
    """("layers", 1, "kernel") -> "layers[1].kernel"."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a case file: where it is and what was expected against what was found."""

    path: Path
    message: str
    line: int | None = None

    def render(self, file: str) -> str:
        where = f"{file}:{self.line}" if self.line else file
        return f"{where}: {format_path(self.path)}: {self.message}"


class CaseError(ValueError):
    """A case file that cannot be run; ``problems`` lists every problem found."""

    def __init__(self, file: str, problems: Iterable[Problem]):
        self.file = file
        self.problems = list(problems)
        super().__init__("\n".join(p.render(file) for p in self.problems))
