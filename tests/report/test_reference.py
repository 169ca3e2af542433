"""Published numbers: shipped data, name mapping, '(published)' rows, footnotes and the delta rows."""

from __future__ import annotations

import hashlib
import importlib.resources

import pytest

from petlbench.errors import PetlbenchError
from petlbench.report import build_report, list_reference_sets, load_reference, our_method, render
from petlbench.report.reference import published_name
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
    # data/README.md states this hash and what was added to the reference notes' CSV.
    assert hashlib.sha256(text).hexdigest() == "925edff165368b5ac385a3c298859e6d4868af1aa177a5f9a504717f3ee6bb36"
    assert "paper" in list_reference_sets()


NOAH_LORA = {"rank": 8, "alpha": 8.0, "dropout": 0.1, "targets": "qkv"}


@pytest.mark.parametrize(("published", "suite", "ours"), [
    ("Full fine-tuning", "vtab", "full"), ("Linear probing", "fgvc", "linear"), ("VPT-Shallow", "vtab", "vpt_shallow"),
    ("VPT-Deep", "fgvc", "vpt_deep"), ("BitFit", "vtab", "bitfit"), ("Adapter (NOAH code, bottleneck 8)", "vtab", "adapter"),
    ("Adapter (VPT code)", "fgvc", "adapter"), ("LoRA (r=8, fused qkv, NOAH code)", "vtab", "lora"),
    ("SSF", "fgvc", "ssf"), ("RepAdapter", "vtab", "repadapter"), ("ARC", "vtab", "arc"),
    ("LoRA (variant not stated by source)", "fgvc", None), ("ARC (AugReg backbone per source)", "fgvc", None),
    ("ARC (variant not stated by source)", "fgvc", None), ("RepAdapter", "fgvc", None),
])
def test_name_mapping_is_declared_by_the_methods(published, suite, ours):
    assert our_method(published, suite) == ours


def test_mapping_depends_on_the_configuration():
    assert published_name("lora", "vtab", NOAH_LORA) == "LoRA (r=8, fused qkv, NOAH code)"
    assert published_name("lora", "vtab", {"targets": "qv"}) is None  # the LoRA paper has no VTAB row
    assert published_name("adapter", "fgvc", {"variant": "noah"}) is None
    assert published_name("repadapter", "vtab", {"variant": "repattn"}) is None
    assert published_name("no_such_method", "vtab", {}) is None


def test_a_plugin_declares_its_published_rows(tmp_path):
    import petlbench

    class Mine(petlbench.Method):
        name = "mine_probe"
        published = {"vtab": "My method (my paper)"}

    petlbench.register_method(Mine)
    try:
        path = tmp_path / "mine.csv"
        path.write_text("benchmark,method,task,accuracy,params_M,source_paper,provenance\n"
                        "vtab1k,My method (my paper),cifar,71.5,0.3,My paper,copied by hand\n")
        report = build_report(published_records("mine_probe", {"cifar": 70.0}), reference=str(path), delta=True,
                              **_quiet())
        (d,) = report.deltas
        assert d.label == "mine_probe − My method (my paper)"
        assert d.value("cifar").mean == pytest.approx(-1.5)
        assert report.published[0].published.ours == "mine_probe"
    finally:
        petlbench.unregister_method("mine_probe")


def test_published_rows_vtab():
    report = build_report([make_record("lora", "cifar", 0, 70.0)], reference="paper", **_quiet())
    names = [r.published.name for r in report.published]
    assert names[0] == "Full fine-tuning" and "NOAH" in names and "FacT (TK)" in names
    # ARC's VTAB row: one secondary source (HyperAdapter Table 1); 0.13 M is ARC's (not ARC_att's) count
    arc = next(r for r in report.published if r.published.name == "ARC")
    assert arc.published.ours == "arc" and not arc.published.unverified
    assert {"SCT", "DTL", "GPS", "Convpass"} <= set(names)  # the second wave's rows, where numbers were found
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
    report = build_report(published_records("lora", values, hparams=NOAH_LORA) + published_records("my_method", values)
                          + published_records("lora", values, hparams={**NOAH_LORA, "targets": "qv"}),
                          reference="paper", delta=True, **_quiet())
    (d,) = report.deltas  # my_method has no published counterpart, nor has LoRA-paper LoRA on VTAB
    assert d.label == "LoRA (targets=qkv) − LoRA (r=8, fused qkv, NOAH code)"
    assert d.value("cifar").mean == pytest.approx(70.0 - 67.1)
    assert d.value("dtd").mean == pytest.approx(60.0 - 69.4)
    assert not d.value("caltech101").present  # we have no caltech101 run: stays missing
    assert not d.value("mean:groups").present
    md = render(report, "markdown")
    line = next(x for x in md.splitlines() if x.startswith("| LoRA (targets=qkv) − LoRA"))
    assert line.startswith("| LoRA (targets=qkv) − LoRA (r=8, fused qkv, NOAH code) | +2.9 | – | −9.4 | – |")


def test_no_delta_across_backbones():
    """Published rows are ViT-B/16: a reproduced row on another backbone gets no delta, and says why."""
    values = {"cifar": 70.0}
    vit_s = [{**r, "config": {**r["config"], "backbone": "vit_small_patch16_224"}}
             for r in published_records("lora", values, hparams=NOAH_LORA)]
    warnings: list[str] = []
    report = build_report(published_records("lora", values, hparams=NOAH_LORA) + vit_s, reference="paper",
                          delta=True, on_warning=warnings.append)
    assert len(report.deltas) == 1 and report.deltas[0].block.startswith("vit_base_patch16_224")
    assert any("another backbone than the published rows" in w for w in warnings), warnings


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
                    "vtab1k,\"LoRA (r=8, fused qkv, NOAH code)\",cifar,71.5,0.3,My paper,copied by hand\n")
    report = build_report(published_records("lora", {"cifar": 70.0}, hparams=NOAH_LORA), reference=str(path),
                          delta=True, **_quiet())
    assert report.reference == "mine.csv"
    assert report.deltas[0].value("cifar").mean == pytest.approx(-1.5)


def test_own_reference_csv_unreadable_is_one_line(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"\xff\xfe,,\n")
    with pytest.raises(PetlbenchError, match=r"is not UTF-8 text"):
        load_reference(str(latin1))
    with pytest.raises(PetlbenchError, match=r"cannot be read \(No such file or directory\)"):
        load_reference(str(tmp_path / "missing.csv"))
