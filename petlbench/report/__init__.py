"""The reporter: paper tables (LaTeX, HTML, Markdown, CSV) from stored run records.

Typical use::

    from petlbench.report import load_records, build_report, render, markdown_table

    loaded = load_records(["results"])                 # skips corrupt/other-schema files, with warnings
    report = build_report(loaded.records, suite="vtab", reference="paper", delta=True)
    tex = render(report, "latex")                      # complete pdflatex document
    print(markdown_table(loaded.records))              # what `petlbench run` prints at the end

Command line: ``petlbench report`` (``petlbench.report.cli.report``). Names are imported lazily,
so registering the command does not import pandas, jinja2 or matplotlib.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from petlbench._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Column": "table", "Efficiency": "table", "Note": "table", "Report": "table",
    "Row": "table", "Stat": "table", "build_report": "aggregate", "filter_where": "select",
    "LoadedRecords": "loading", "ReportWarning": "loading", "load_records": "loading",
    "list_reference_sets": "reference", "load_reference": "reference", "our_method": "reference",
    "render": "rendering", "render_csv": "rendering", "render_html": "rendering", "render_latex": "rendering",
    "render_markdown": "rendering", "tex_escape": "rendering",
}

# Listed out (not derived from _EXPORTS) so linters and IDEs can check the names.
__all__ = [
    "Column", "Efficiency", "LoadedRecords", "Note", "Report", "ReportWarning", "Row", "Stat", "build_report",
    "filter_where",
    "csv_table", "latex_table", "list_reference_sets", "load_records", "load_reference", "markdown_table",
    "our_method", "render", "render_csv", "render_html", "render_latex", "render_markdown", "tex_escape",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def markdown_table(records: Iterable[Mapping[str, Any]], suite: Any = None, reference: str | None = None,
                   efficiency: bool = False, on_warning: Callable[[str], None] | None = None, **options: Any) -> str:
    """The accuracy table (plus notes) in Markdown: what a sweep prints when it finishes.

    Failed records are counted in a note; records of another schema are skipped with a warning
    (``on_warning``, default: :class:`ReportWarning` via :mod:`warnings`). ``options`` go to
    :func:`build_report` (``where``, ``methods``, ``order``, ``names``).
    """
    from petlbench.report.aggregate import build_report
    from petlbench.report.rendering import render_markdown

    report = build_report(records, suite=suite, reference=reference, on_warning=on_warning, **options)
    return render_markdown(report, "all" if efficiency else "accuracy")


def latex_table(records: Iterable[Mapping[str, Any]], suite: Any = None, reference: str | None = None,
                standalone: bool = False, on_warning: Callable[[str], None] | None = None, wide: bool = False,
                notes: bool = True, **options: Any) -> str:
    """The accuracy table as LaTeX: the table float (for ``\\input``) or a complete document;
    ``wide``: a ``table*`` for two-column papers; ``notes``: the footnotes."""
    from petlbench.report.aggregate import build_report
    from petlbench.report.rendering import render_latex

    report = build_report(records, suite=suite, reference=reference, on_warning=on_warning, **options)
    return render_latex(report, "accuracy", standalone=standalone, wide=wide, notes=notes)


def csv_table(records: Iterable[Mapping[str, Any]], suite: Any = None, reference: str | None = None,
              on_warning: Callable[[str], None] | None = None, long: bool = False, **options: Any) -> str:
    """The accuracy table as CSV (one row per table row; mean/std/n per task, then the means), or
    with ``long`` one row per run."""
    from petlbench.report.aggregate import build_report
    from petlbench.report.rendering import render_csv

    report = build_report(records, suite=suite, reference=reference, on_warning=on_warning, **options)
    return render_csv(report, "accuracy", long=long)


if TYPE_CHECKING:  # pragma: no cover
    from petlbench.report.aggregate import build_report
    from petlbench.report.loading import LoadedRecords, ReportWarning, load_records
    from petlbench.report.reference import list_reference_sets, load_reference, our_method
    from petlbench.report.rendering import (
        render,
        render_csv,
        render_html,
        render_latex,
        render_markdown,
        tex_escape,
    )
    from petlbench.report.select import filter_where
    from petlbench.report.table import Column, Efficiency, Note, Report, Row, Stat
