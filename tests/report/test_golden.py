"""Golden files: the exact LaTeX, Markdown and CSV rendered from the fixed records of factory.py."""

from __future__ import annotations

from typing import Any

from petlbench.report import build_report, render
from tests.report.conftest import check_golden


def _report(records: list[dict[str, Any]], **kwargs: Any):
    return build_report(records, on_warning=lambda m: None, **kwargs)


def test_latex_document_with_reference_and_delta(records):
    report = _report(records, reference="paper", delta=True)
    check_golden("vtab_reference.tex", render(report, "latex"))


def test_latex_fragment(records):
    check_golden("vtab_fragment.tex", render(_report(records), "latex", table="accuracy", standalone=False))


def test_markdown(records):
    check_golden("vtab.md", render(_report(records), "markdown"))


def test_csv_accuracy_with_reference_and_delta(records):
    report = _report(records, reference="paper", delta=True)
    check_golden("vtab_accuracy.csv", render(report, "csv"))


def test_csv_efficiency(records):
    check_golden("vtab_efficiency.csv", render(_report(records), "csv", table="efficiency"))
