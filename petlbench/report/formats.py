"""Output formats and table selections (kept apart so the CLI can import them without pandas)."""

from __future__ import annotations

FORMATS = ("latex", "html", "markdown", "csv")
TABLES = ("accuracy", "efficiency", "all")
#: ``--out`` suffix -> format, when ``--format`` is not given.
SUFFIXES = {".tex": "latex", ".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown",
            ".csv": "csv"}
