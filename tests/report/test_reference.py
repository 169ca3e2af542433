"""Published numbers: shipped data, name mapping, '(published)' rows, footnotes and the delta rows."""

from __future__ import annotations

import hashlib
import importlib.resources

import pytest

from petlbench.errors import PetlbenchError
from petlbench.report import build_report, list_reference_sets, load_reference, our_method, render
from tests.report.factory import make_record, published_records


def _quiet(**kw):
    return {"on_warning": lambda m: None, **kw}


def test_shipped_csv_keeps_source_and_provenance():
    df, label = load_reference("paper")
    assert label == "paper"
    assert list(df.columns) == ["benchmark", "method", "task", "accuracy", "params_M", "source_paper", "provenance"]
    assert df["source_paper"].notna().all() and df["provenance"].notna().all()
    assert set(df.benchmark) == {"vtab1k", "fgvc"}
    text = importlib.resources.files("petlbench.report").joinpath("data", "paper_results.csv").read_bytes()
    # The byte-for-byte copy of the reference notes' CSV (data/README.md states this hash).
    assert hashlib.sha256(text).hexdigest() == "ca37197cc73f8b58c4e4f89cbf1edb86772a96c81c32e8bef17a358832c38d56"
    assert "paper" in list_reference_sets()


@pytest.mark.parametrize(("published", "ours"), [
    ("Full fine-tuning", "full"), ("Linear probing", "linear"), ("VPT-Shallow", "vpt_shallow"),
    ("VPT-Deep", "vpt_deep"), ("BitFit", "bitfit"), ("Adapter (bottleneck 8)", "adapter"), ("Adapter", "adapter"),
    ("LoRA (r=8, q,v)", "lora"), ("SSF", "ssf"), ("RepAdapter", "repadapter"),
    ("AdaptFormer", None), ("NOAH", None), ("FacT (TK)", None), ("ARC (variant not stated by source)", None),
])
def test_name_mapping(published, ours):
    assert our_method(published) == ours


def test_published_rows_vtab():
    report = build_report([make_record("lora", "cifar", 0, 70.0)], reference="paper", **_quiet())
    names = [r.published.name for r in report.published]
    assert names[0] == "Full fine-tuning" and "NOAH" in names and "FacT (TK)" in names
    assert not any(n.startswith("ARC") for n in names)  # no ARC VTAB numbers exist: none are invented
    assert all(r.label.endswith("(published)") for r in report.published)
    assert all(len([c for c in report.task_columns if r.value(c.key).present]) == 19 for r in report.published)
    md = render(report, "markdown", table="accuracy")
    assert "| Full fine-tuning (published) | 85.80 | – | – | 68.9 | 87.7 |" in md
    assert "VPT (Jia et al., ECCV 2022) for Full fine-tuning, Linear probing" in md
    assert "NOT checked against the ARC/RepAdapter PDFs" in md
    tex = render(report, "latex", table="accuracy")
    assert r"\textit{NOAH (published)}" in tex


def test_fgvc_unverified_arc_row_stays_partial():
    recs = [make_record("arc", "cub", 0, 88.0, suite="fgvc", protocol="fgvc", classes=200)]
    report = build_report(recs, reference="paper", **_quiet())
    arc = next(r for r in report.published if r.published.name.startswith("ARC"))
    assert arc.label == "ARC (variant not stated by source) (published, unverified)"
    assert arc.published.ours is None
    assert {k for k, v in arc.values.items() if v.present} == {"CUB_200_2011", "StanfordCars"}
    assert arc.params_m is None
    md = render(report, "markdown", table="accuracy")
    line = next(x for x in md.splitlines() if x.startswith("| ARC"))
    assert line.count("–") >= 6  # params, w/o head, seeds, 3 missing tasks, the mean
    assert "UNVERIFIED published numbers: ARC (variant not stated by source)" in md
    assert report.rows[0].label == "ARC"  # our arc is never compared with the unverified row


def test_delta_rows():
    values = {"cifar": 70.0, "dtd": 60.0}
    report = build_report(published_records("lora", values) + published_records("my_method", values),
                          reference="paper", delta=True, **_quiet())
    (d,) = report.deltas  # my_method has no published counterpart
    assert d.label == "LoRA − LoRA (r=8, q,v)"
    assert d.value("cifar").mean == pytest.approx(70.0 - 67.1)
    assert d.value("dtd").mean == pytest.approx(60.0 - 69.4)
    assert not d.value("caltech101").present  # we have no caltech101 run: stays missing
    assert not d.value("mean:groups").present
    md = render(report, "markdown")
    line = next(x for x in md.splitlines() if x.startswith("| LoRA − LoRA"))
    assert line.startswith("| LoRA − LoRA (r=8, q,v) | +2.9 | – | −9.4 | – |")


def test_delta_implies_the_paper_set():
    report = build_report(published_records("linear", {"cifar": 63.4}), delta=True, **_quiet())
    assert report.reference == "paper"
    assert report.deltas[0].value("cifar").mean == pytest.approx(0.0)
    assert "| Δ Linear probing | ±0.0 |" in render(report, "markdown")


def test_unknown_set_lists_the_available_ones():
    with pytest.raises(PetlbenchError, match=r"unknown reference set 'papr'. Did you mean 'paper'\?"):
        build_report([make_record("lora", "cifar", 0, 70.0)], reference="papr", **_quiet())


def test_reference_set_without_the_suite_warns():
    warnings: list[str] = []
    recs = [make_record("lora", "digits", 0, 70.0, suite="demo", classes=10)]
    report = build_report(recs, reference="paper", on_warning=warnings.append)
    assert report.published == []
    assert any("has no numbers for suite 'demo'" in w for w in warnings)


def test_own_reference_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("benchmark,method,task,accuracy,params_M,source_paper,provenance\n"
                    "vtab1k,LoRA,cifar,71.5,0.3,My paper,copied by hand\n")
    report = build_report(published_records("lora", {"cifar": 70.0}), reference=str(path), delta=True, **_quiet())
    assert report.reference == "mine.csv"
    assert report.deltas[0].value("cifar").mean == pytest.approx(-1.5)
