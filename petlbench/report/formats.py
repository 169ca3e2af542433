"""Output formats and table selections (kept apart so the CLI can import them without pandas)."""

from __future__ import annotations

FORMATS = ("latex", "html", "markdown", "csv")
TABLES = ("accuracy", "efficiency", "all")
#: Row orders of ``--order``: as given, by trainable parameters, by the headline mean.
ORDERS = ("given", "params", "mean")
#: ``--out`` suffix -> format, when ``--format`` is not given.
SUFFIXES = {".tex": "latex", ".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown",
            ".csv": "csv"}
