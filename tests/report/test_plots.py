"""Figures: the Pareto front, the accuracy the plots use, and PNG output without pyplot."""

from __future__ import annotations

from petlbench.report import build_report
from petlbench.report.plots import all_plots, headline, pareto_front, save_plots, summary
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
    assert values["LoRA"] == 70.0 and values["Full fine-tuning"] == 75.0
    assert values["Full fine-tuning (published)"] == 68.9
    s = summary(report)
    assert s.tasks == ["cifar"] and "DIFFERENT tasks" in s.note and "CIFAR-100" in s.note
    # Parameters over the same task as accuracy: LoRA's cifar count, not its mean over cifar and dtd.
    lora = next(r for r in report.rows if r.method == "lora")
    assert s.params["LoRA"] == lora.params_by_task["cifar"] != lora.params_m
    plots = all_plots(report)
    assert [p.key for p in plots] == ["pareto", "tasks", "cost"]
    assert all(p.png.startswith(b"\x89PNG\r\n\x1a\n") and len(p.png) > 5000 for p in plots)


def test_hostile_names_do_not_break_matplotlib():
    recs = [make_record(name, "cifar", 0, 60.0 + i) for i, name in enumerate(("a$b$c", "x_{y}^z\\", "ok"))]
    report = build_report(recs, on_warning=lambda m: None)
    assert len(all_plots(report)) == 3


def test_no_common_task_is_said_not_averaged():
    recs = [make_record("lora", "cifar", 0, 70.0), make_record("full", "dtd", 0, 75.0, hparams={})]
    report = build_report(recs, on_warning=lambda m: None)
    s = summary(report)
    assert s.accuracy == {} and "No task is common" in s.note
    assert [p.key for p in all_plots(report)] == ["tasks"]
    assert any("accuracy-vs-parameters plot left out" in w for w in report.warnings)


def test_complete_rows_use_all_tasks_and_bars_zoom(records):
    full_rows = [r for r in records if r["method"] in ("linear", "lora")]  # 19 tasks each
    report = build_report(full_rows, on_warning=lambda m: None)
    s = summary(report)
    assert s.complete and len(s.tasks) == 19 and "all tasks" in s.note
    bars = next(p for p in all_plots(report) if p.key == "tasks")
    ax = bars.figure.axes[0]
    bottom, top = ax.get_ylim()
    assert bottom > 0 and top < 100  # the golden accuracies span about 40-85%
    assert ax.get_legend() is None and bars.figure.legends  # the legend is outside the axes


def test_plots_are_exported_as_png_pdf_and_svg(records, tmp_path):
    report = build_report(records, on_warning=lambda m: None)
    paths = save_plots(report, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"vtab_{k}.{e}" for k in ("pareto", "tasks", "cost")
                                                   for e in ("png", "pdf", "svg"))
    assert (tmp_path / "vtab_pareto.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "vtab_tasks.svg").read_bytes()


def test_pareto_front_stays_within_the_main_backbone():
    recs = [make_record("lora", "cifar", 0, 70.0), make_record("linear", "cifar", 0, 60.0)]
    small = make_record("arc", "cifar", 0, 90.0, hparams={})  # better and smaller, but another backbone
    small["config"]["backbone"] = "vit_small_patch16_224"
    report = build_report([*recs, small], on_warning=lambda m: None)
    plot = next(p for p in all_plots(report) if p.key == "pareto")
    assert "the Pareto front covers only the rows on vit_base_patch16_224" in plot.caption
    front = plot.figure.axes[0].lines[0]  # the step line
    assert 90.0 not in list(front.get_ydata())
