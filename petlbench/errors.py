"""User-facing errors.

Every mistake a user can make (a bad name, a bad value, a bad file) is raised as a
:class:`PetlbenchError` whose message is one line naming the thing, the cause and the
fix. The CLI prints that line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class PetlbenchError(Exception):
    """An error caused by user input; the message is meant to be shown as-is."""

    exit_code = 2


class NotMergeableError(PetlbenchError):
    """Raised by :func:`petlbench.merge` for methods whose change is not linear."""


def did_you_mean(name: str, choices: Iterable[str], what: str, list_all: bool = True,
                 label: str = "Registered") -> str:
    """Build a one-line "unknown X" message with close matches (and, with ``list_all``, every choice
    after ``label``)."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    known = f" {label}: {', '.join(choices) if choices else '(none)'}." if list_all else ""
    return f"unknown {what} {name!r}.{hint}{known}"


def read_user_text(path: Path, what: str, fix: str = "save it as UTF-8") -> str:
    """The UTF-8 text (a BOM allowed) of a file the user named, or one PetlbenchError line saying
    that it cannot be read or is not UTF-8 (``what`` names it, e.g. "--template 'x.j2'")."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise PetlbenchError(f"{what} cannot be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise PetlbenchError(f"{what} is not UTF-8 text (byte {exc.start}). Fix: {fix}.") from None
