"""One shape for every data problem: ``path:line: cause. Fix: ...``.

Readers raise a :class:`DataError` for the first problem they meet, before any decoding or
training; ``petlbench data check`` collects every :class:`Problem` instead of stopping. Both
print the same line, so a user who sees the error in a training log can grep for it in the
check output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petlbench.errors import PetlbenchError

ERROR = "error"
WARNING = "warning"


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


@dataclass(frozen=True)
class Problem:
    """A located data problem. ``line`` is 1-based; ``None`` when the problem is the whole file."""

    path: str
    cause: str
    fix: str
    line: int | None = None
    severity: str = ERROR

    def location(self) -> str:
        return f"{self.path}:{self.line}" if self.line is not None else str(self.path)

    def format(self) -> str:
        """The one-line form users see: ``path:line: cause. Fix: fix.``"""
        prefix = "" if self.severity == ERROR else f"{self.severity}: "
        return f"{self.location()}: {prefix}{_sentence(self.cause)} Fix: {_sentence(self.fix)}"

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR


class DataError(PetlbenchError):
    """A problem with the user's data files; the message is ``path:line: cause. Fix: ...``."""

    def __init__(self, problem: Problem, more: int = 0) -> None:
        self.problem = problem
        self.more = more
        message = problem.format()
        if more:
            message += f" ({more} more problem{'s' if more != 1 else ''} in this split; `petlbench data check` lists them all.)"
        super().__init__(message)

    @property
    def path(self) -> str:
        return self.problem.path

    @property
    def line(self) -> int | None:
        return self.problem.line


def data_error(path: str | Path, cause: str, fix: str, line: int | None = None) -> DataError:
    """Shorthand for raising a single located problem."""
    return DataError(Problem(str(path), cause, fix, line))


def raise_first(problems: list[Problem]) -> None:
    """Raise the first error in ``problems`` (mentioning how many more there are), if any."""
    errors = [p for p in problems if p.is_error]
    if errors:
        raise DataError(errors[0], more=len(errors) - 1)
