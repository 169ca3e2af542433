"""Group means and the two overall VTAB means, checked against numbers computed by hand."""

from __future__ import annotations

import pytest

from petlbench.report import build_report, render
from tests.report.factory import VTAB, make_record, published_records

# Full fine-tuning's published VTAB-1k numbers (VPT, Jia et al. 2022), Natural / Specialized / Structured.
FULL = {
    "cifar": 68.9, "caltech101": 87.7, "dtd": 64.3, "oxford_flowers102": 97.2, "oxford_iiit_pet": 86.9,
    "svhn": 87.4, "sun397": 38.8,
    "patch_camelyon": 79.7, "eurosat": 95.7, "resisc45": 84.2, "diabetic_retinopathy": 73.9,
    "clevr_count": 56.3, "clevr_dist": 58.6, "dmlab": 41.7, "kitti": 65.5, "dsprites_loc": 57.5,
    "dsprites_ori": 46.7, "smallnorb_azi": 25.7, "smallnorb_ele": 29.1,
}
# By hand: the sums of each group, then the means.
NATURAL = (68.9 + 87.7 + 64.3 + 97.2 + 86.9 + 87.4 + 38.8) / 7          # 531.2 / 7 = 75.886
SPECIALIZED = (79.7 + 95.7 + 84.2 + 73.9) / 4                           # 333.5 / 4 = 83.375
STRUCTURED = (56.3 + 58.6 + 41.7 + 65.5 + 57.5 + 46.7 + 25.7 + 29.1) / 8  # 381.1 / 8 = 47.6375
MEAN_OF_GROUPS = (NATURAL + SPECIALIZED + STRUCTURED) / 3               # 68.966 (papers print 68.96)
MEAN_OF_19 = (531.2 + 333.5 + 381.1) / 19                               # 1245.8 / 19 = 65.568


def _quiet(**kw):
    return {"on_warning": lambda m: None, **kw}


def test_hand_computed_values_match_the_reference_notes():
    # methods.md section 4.2 lists 75.89 / 83.38 / 47.64 / 68.97 / 65.57 for this row.
    assert (round(NATURAL, 2), round(SPECIALIZED, 3), round(STRUCTURED, 4)) == (75.89, 83.375, 47.6375)
    assert round(MEAN_OF_GROUPS, 2) == 68.97 and round(MEAN_OF_19, 2) == 65.57


def test_reproduced_row_means():
    report = build_report(published_records("full", FULL), **_quiet())
    (row,) = report.rows
    assert row.value("group:Natural").mean == pytest.approx(NATURAL)
    assert row.value("group:Specialized").mean == pytest.approx(SPECIALIZED)
    assert row.value("group:Structured").mean == pytest.approx(STRUCTURED)
    assert row.value("mean:groups").mean == pytest.approx(MEAN_OF_GROUPS)
    assert row.value("mean:tasks").mean == pytest.approx(MEAN_OF_19)
    assert row.value("cifar").std == pytest.approx(0.5)  # seeds at v - 0.5, v, v + 0.5
    assert row.n_min == row.n_max == 3
    labels = [c.label for c in report.columns if c.kind == "mean"]
    assert labels == ["Mean of groups", "Mean of 19 tasks"]
    md = render(report, "markdown", table="accuracy")
    assert "| 75.9 | 83.4 | 47.6 | 69.0 | 65.6 |" in md


def test_published_row_means_and_the_two_conventions_differ():
    report = build_report(published_records("full", FULL), reference="paper", **_quiet())
    pub = next(r for r in report.published if r.published.name == "Full fine-tuning")
    assert pub.value("mean:groups").mean == pytest.approx(MEAN_OF_GROUPS)
    assert pub.value("mean:tasks").mean == pytest.approx(MEAN_OF_19)
    lin = next(r for r in report.published if r.published.name == "Linear probing")
    # methods.md 4.2 / anchors.md item 12: Linear probing 57.64 (mean of groups) vs 52.94 (19 tasks).
    assert round(lin.value("mean:groups").mean, 2) == 57.64
    assert round(lin.value("mean:tasks").mean, 2) == 52.94
    rep = next(r for r in report.published if r.published.name == "RepAdapter")
    assert round(rep.value("mean:groups").mean, 2) == 76.09


def test_means_need_every_task_of_the_group():
    values = {t: 50.0 for t in VTAB["Natural"]} | {"patch_camelyon": 60.0}
    report = build_report(published_records("lora", values), **_quiet())
    (row,) = report.rows
    assert row.value("group:Natural").mean == pytest.approx(50.0)
    for key in ("group:Specialized", "group:Structured", "mean:groups", "mean:tasks"):
        assert not row.value(key).present
    md = render(report, "markdown", table="accuracy")
    line = next(x for x in md.splitlines() if x.startswith("| LoRA"))
    assert line.endswith("| 60.0 ± 0.5 | 50.0 | – | – | – |")  # Natural, Specialized, both overall means
    assert "not every task of the group (suite) is present for that row (LoRA)" in md
    # Only tasks (and groups) with data get a column; the overall means always do.
    assert [c.key for c in report.task_columns] == [*VTAB["Natural"], "patch_camelyon"]
    assert [c.key for c in report.columns if c.kind == "group"] == ["group:Natural", "group:Specialized"]


def test_uneven_seed_counts_are_shown():
    recs = [make_record("lora", "cifar", s, 70.0 + s) for s in (0, 1, 2)] + [make_record("lora", "dtd", 0, 60.0)]
    report = build_report(recs, **_quiet())
    assert report.rows[0].seeds_text == "1–3"
    md = render(report, "markdown", table="accuracy")
    assert "60.0 (n=1)" in md and "71.0 ± 1.0" in md
    assert "number of seeds differs between tasks for LoRA" in md


def test_single_group_suite_has_only_the_task_mean():
    tasks = ["CUB_200_2011", "NABirds", "OxfordFlowers", "StanfordDogs", "StanfordCars"]
    recs = [make_record("lora", t, 0, 80.0 + i, suite="fgvc", protocol="fgvc") for i, t in enumerate(tasks)]
    report = build_report(recs, **_quiet())
    assert [c.label for c in report.columns if c.kind != "task"] == ["Mean of 5 tasks"]
    assert report.rows[0].value("mean:tasks").mean == pytest.approx(82.0)
