"""Figures: the Pareto front, the accuracy the plots use, and PNG output without pyplot."""

from __future__ import annotations

from petlbench.report import build_report
from petlbench.report.plots import all_plots, headline, pareto_front
from tests.report.factory import make_record


def test_pareto_front():
    points = [(1.0, 50.0), (2.0, 60.0), (3.0, 55.0), (0.5, 40.0), (2.0, 59.0), (5.0, 61.0)]
    assert pareto_front(points) == [3, 0, 1, 5]  # sorted by parameters; (3, 55) and (2, 59) are beaten


def test_headline_falls_back_to_common_tasks_for_partial_sweeps():
    recs = [make_record("lora", "cifar", 0, 70.0), make_record("lora", "dtd", 0, 60.0),
            make_record("full", "cifar", 0, 75.0, hparams={})]
    report = build_report(recs, reference="paper", on_warning=lambda m: None)
    values, label = headline(report)
    assert label == "top-1 (%), mean of 1 common task(s)"  # cifar: the only task both reproduced rows have
    assert values["lora"] == 70.0 and values["full"] == 75.0
    assert values["Full fine-tuning (published)"] == 68.9
    plots = all_plots(report)
    assert [p.key for p in plots] == ["pareto", "tasks", "cost"]
    assert all(p.png.startswith(b"\x89PNG\r\n\x1a\n") and len(p.png) > 5000 for p in plots)


def test_hostile_names_do_not_break_matplotlib():
    recs = [make_record(name, "cifar", 0, 60.0 + i) for i, name in enumerate(("a$b$c", "x_{y}^z\\", "ok"))]
    report = build_report(recs, on_warning=lambda m: None)
    assert len(all_plots(report)) == 3
