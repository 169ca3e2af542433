"""Output formats and table selections (kept apart so the CLI can import them without pandas),
and the CSV cell rule that keeps spreadsheets from running a record's text as a formula."""

from __future__ import annotations

import re
from typing import Any

FORMATS = ("latex", "html", "markdown", "csv")
TABLES = ("accuracy", "efficiency", "all")
#: Row orders of ``--order``: as given, by trainable parameters, by the headline mean.
ORDERS = ("given", "params", "mean")
#: ``--out`` suffix -> format, when ``--format`` is not given.
SUFFIXES = {".tex": "latex", ".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown",
            ".csv": "csv"}

#: First characters that make a spreadsheet (Excel, LibreOffice, Google Sheets) read a CSV cell as
#: a formula (OWASP, "CSV Injection"): ``=``, ``+``, ``-``, ``@``, and tab and carriage return,
#: which some of them skip before looking for one.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """``value`` made safe for a CSV cell: a text that a spreadsheet would run as a formula (a
    method named ``=HYPERLINK("http://x", "click")``) gets a leading ``'``, which spreadsheets
    show as text and do not display; anything else is unchanged. Numbers, and texts that are
    plain numbers (``-1.5``, which a spreadsheet reads as the number it is), stay as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_safe(frame: Any) -> Any:
    """A copy of the pandas DataFrame ``frame`` whose text cells and column names pass through
    :func:`csv_cell`; numeric columns (negative numbers included) are untouched."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    out = frame.rename(columns=csv_cell)
    for column in out.columns:
        if not (is_numeric_dtype(out[column]) or is_bool_dtype(out[column])):  # text (object or str dtype)
            out[column] = out[column].map(csv_cell)
    return out
