"""What enters a cell: runs are grouped by their full resolved configuration, never by method name.

A smoke run in a results folder is its own row (it never replaces a seed), another plugin version
is another row, rows on different backbones are ranked apart, --where filters, and tables use
display names with a fixed parameter precision.
"""

from __future__ import annotations

import copy
import csv
import io

import pytest
from click.testing import CliRunner

from petlbench.errors import PetlbenchError
from petlbench.report import build_report, render
from petlbench.report.cli import report as report_cmd
from petlbench.report.rendering import fmt_params
from tests.report.factory import golden_records, make_record, write_records


def _quiet(**kw):
    return {"on_warning": lambda m: None, **kw}


def _smoke(method: str = "lora", task: str = "cifar", seed: int = 0, top1: float = 30.0) -> dict:
    """A 2-epoch smoke run on a data subset, as `petlbench run --set epochs=2 --set limit_train=64` writes it."""
    r = make_record(method, task, seed, top1)
    r["config"]["train"] = {**r["config"]["train"], "epochs": 2, "limit_train": 64}
    r["provenance"]["end_time"] = "2026-06-01T00:00:00+00:00"  # newer than every real run
    r["run_id"] = "smoke" + r["run_id"][5:]
    return r


def test_smoke_run_is_its_own_row_and_never_replaces_a_seed(collected):
    report = build_report(golden_records() + [_smoke()], on_warning=collected.append)
    lora = [r for r in report.rows if r.method == "lora"]
    assert [r.label for r in lora] == ["LoRA (epochs=100, limit_train unset)", "LoRA (epochs=2, limit_train=64)"]
    real, smoke = lora
    assert real.value("cifar").n == 3 and real.seeds_text == "3" and 30.0 not in real.value("cifar").values
    assert smoke.value("cifar").values == (30.0,) and smoke.seeds_text == "1"
    assert not any("duplicate" in w for w in collected)
    assert any("runs of one task differ in epochs, limit_train" in w for w in collected)
    md = render(report, "markdown", table="accuracy")
    assert "shown as separate rows" in md and "Select one with --where" in md


def test_where_selects_the_real_runs(tmp_path):
    write_records(tmp_path, golden_records() + [_smoke()])
    result = CliRunner().invoke(report_cmd, ["--results", str(tmp_path), "--where", "epochs=100",
                                             "--table", "accuracy"])
    assert result.exit_code == 0, result.output
    assert "| LoRA | 0.33 | 0.29 | 3 |" in result.stdout and "epochs=2" not in result.stdout


def test_where_forms_and_mistakes():
    recs = golden_records() + [_smoke()]
    assert {r["method"] for r in build_report(recs, where=["method!=linear"], **_quiet()).runs} == \
        {"lora", "my_m&th%d#1", "arc"}
    rep = build_report(recs, where=["lr=1e-3", "method=lora,linear", "config.train.epochs=2"], **_quiet())
    assert [r.label for r in rep.rows] == ["LoRA"] and rep.rows[0].value("cifar").values == (30.0,)
    with pytest.raises(PetlbenchError, match=r"no record has a field 'epochz'"):
        build_report(recs, where=["epochz=2"], **_quiet())
    with pytest.raises(PetlbenchError, match=r"leaves no record \(epochs is 100, 2 in the records\)"):
        build_report(recs, where=["epochs=3"], **_quiet())
    with pytest.raises(PetlbenchError, match=r"is not key=value"):
        build_report(recs, where=["epochs"], **_quiet())


def test_per_task_presets_keep_one_row():
    """ARC's published per-task values differ between tasks, not within one: one row."""
    recs = [make_record("arc", "cifar", s, 70.0 + s, hparams={"dim": 8}) for s in (0, 1)]
    recs += [make_record("arc", "dtd", s, 60.0 + s, hparams={"dim": 32}) for s in (0, 1)]
    report = build_report(recs, **_quiet())
    assert [r.label for r in report.rows] == ["ARC"] and report.rows[0].seeds_text == "2"


def test_execution_settings_do_not_split_a_row():
    a = make_record("lora", "cifar", 0, 70.0)
    b = make_record("lora", "cifar", 1, 71.0)
    b["config"]["train"]["compile"] = True
    b["config"]["train"]["eval_batch_size"] = 128
    rep = build_report([a, b], **_quiet())
    assert [r.label for r in rep.rows] == ["LoRA"]
    assert any("differ only in execution settings" in n.text and "(compile, eval_batch_size)" in n.text
               for n in rep.notes)


def test_precision_auto_is_split_by_what_ran():
    """precision=auto is bf16 on a GPU and fp32 on a CPU: those runs are not seeds of one row, while
    an explicit bf16 and an auto that resolved to bf16 are the same arithmetic."""
    def rec(seed: int, requested: str, autocast: str | None) -> dict:
        r = make_record("lora", "cifar", seed, 70.0 + seed)
        r["config"]["train"]["precision"] = requested
        r.setdefault("efficiency", {})["precision"] = {"requested": requested, "autocast": autocast,
                                                     "grad_scaler": False, "tf32": False, "reason": ""}
        return r

    assert len(build_report([rec(0, "auto", "bf16"), rec(1, "auto", None)], **_quiet()).rows) == 2
    same = build_report([rec(0, "auto", "bf16"), rec(1, "bf16", "bf16")], **_quiet())
    assert [r.label for r in same.rows] == ["LoRA"] and same.rows[0].seeds_text == "2"


def test_other_data_is_another_row():
    a = make_record("lora", "cifar", 0, 70.0)
    b = make_record("lora", "cifar", 1, 71.0, fingerprint_variant="-rebuilt")
    labels = [r.label for r in build_report([a, b], **_quiet()).rows]
    assert len(labels) == 2 and all(label.startswith("LoRA (data ") for label in labels)


def _versioned(version: str, top1: float, seed: int = 0) -> dict:
    r = make_record("outscale", "cifar", seed, top1)
    r["config"]["method_code"] = {"distribution": "petlbench-outscale", "version": version}
    r["provenance"]["method_code"] = {"distribution": "petlbench-outscale", "version": version,
                                      "display_name": "OutScale"}
    return r


def test_plugin_versions_are_separate_rows():
    report = build_report([_versioned("1.0", 60.0), _versioned("1.1", 65.0)], **_quiet())
    assert [r.label for r in report.rows] == ["OutScale (petlbench-outscale 1.0)", "OutScale (petlbench-outscale 1.1)"]
    assert [r.value("cifar").values for r in report.rows] == [(60.0,), (65.0,)]
    csv_rows = list(csv.DictReader(io.StringIO(render(report, "csv", long=True))))
    assert [r["method_code"] for r in csv_rows] == ["petlbench-outscale 1.0", "petlbench-outscale 1.1"]


def test_backbones_are_separate_blocks_ranked_apart():
    recs = [make_record(m, "cifar", 0, v) for m, v in (("lora", 70.0), ("linear", 60.0))]
    small = [make_record(m, "cifar", 0, v) for m, v in (("lora", 50.0), ("linear", 55.0))]
    for r in small:
        r["config"]["backbone"] = "vit_small_patch16_224"
        r["provenance"]["weights_sha256"] = "cd" * 32
    report = build_report(recs + small, **_quiet())
    assert len(report.blocks) == 2 and report.blocks[0].startswith("vit_base_patch16_224")
    best = {r.label: r.value("cifar").rank for r in report.rows}
    # Each block has its own best: vit_small's linear (55.0) is bold although vit_base's LoRA (70.0) is higher.
    assert best == {"LoRA (vit_base_patch16_224)": 1, "Linear probing (vit_base_patch16_224)": 2,
                    "Linear probing (vit_small_patch16_224)": 1, "LoRA (vit_small_patch16_224)": 2}
    md = render(report, "markdown", table="accuracy")
    assert "| **Backbone: vit_base_patch16_224; weights" in md and "| **Backbone: vit_small_patch16_224;" in md
    assert md.index("Backbone: vit_base") < md.index("LoRA (vit_base") < md.index("Backbone: vit_small")
    assert "ranked only within their block" in md
    tex = render(report, "latex", table="accuracy")
    assert r"\textit{Backbone: vit\_small\_patch16\_224" in tex
    html = render(report, "html")
    assert html.count('<tr class="block') == 4 and "Backbone: vit_small_patch16_224" in html


def test_display_and_registry_names():
    recs = [make_record("lora", "oxford_flowers102", 0, 90.0), make_record("linear", "diabetic_retinopathy", 0, 70.0)]
    report = build_report(recs, **_quiet())
    assert [r.label for r in report.rows] == ["Linear probing", "LoRA"]
    assert [c.label for c in report.task_columns] == ["Flowers102", "Retinopathy"]
    raw = build_report(recs, names="registry", **_quiet())
    assert [r.label for r in raw.rows] == ["linear", "lora"]
    assert [c.label for c in raw.task_columns] == ["oxford_flowers102", "diabetic_retinopathy"]
    # A plugin that is not installed where the report is made: the display name recorded with the run.
    gone = make_record("not_installed_here", "cifar", 0, 50.0)
    gone["provenance"]["method_code"] = {"display_name": "NiceName"}
    assert build_report([gone], **_quiet()).rows[0].label == "NiceName"


def test_method_display_name_default_and_inheritance():
    from petlbench.method import Method
    from petlbench.registry import get_method

    class Mine(Method):
        name = "mine_method"

    class Child(get_method("lora")):  # a new name: not LoRA's display name
        name = "lora_child"

    class Same(get_method("lora")):  # no new name: keeps LoRA's
        pass

    assert Mine.display_name == "mine_method" and Child.display_name == "lora_child"
    assert Same.display_name == "LoRA"
    assert get_method("vpt_deep").display_name == "VPT-Deep" and get_method("arc_att").display_name == "ARC_att"


@pytest.mark.parametrize("value,text", [(85.798, "85.80"), (0.294, "0.29"), (0.13, "0.13"), (0.0101, "0.01"),
                                        (0.0077, "0.0077"), (0.00031, "0.00031"), (0.0076, "0.0076"),
                                        (0.0000048, "0.0000048"), (0.0, "0"), (None, "–")])
def test_parameter_precision(value, text):
    assert fmt_params(value) == text


def test_row_order_options():
    recs = [make_record("linear", "cifar", 0, 60.0), make_record("lora", "cifar", 0, 70.0),
            make_record("arc", "cifar", 0, 65.0, hparams={})]
    def order(**kw):
        return [r.method for r in build_report(recs, **_quiet(**kw)).rows]
    assert order() == ["linear", "lora", "arc"]  # the papers' order
    assert order(methods=["arc", "linear", "lora"]) == ["arc", "linear", "lora"]  # as given
    assert order(order="params") == ["linear", "arc", "lora"]  # fewest trainable parameters first
    assert order(order="mean") == ["lora", "arc", "linear"]  # best mean first
    legacy = make_record("arc", "dtd", 0, 99.0, hparams={}, protocol="legacy-best-test")
    best_first = [r.label for r in build_report([*recs, legacy], **_quiet(order="mean")).rows]
    assert best_first[-1].endswith("†")  # selected on test: last, whatever its mean
    with pytest.raises(PetlbenchError, match="--method full: no record of this method"):
        build_report(recs, methods=["full"], **_quiet())


def test_long_csv_has_one_row_per_run(tmp_path):
    recs = golden_records()
    write_records(tmp_path, recs)
    result = CliRunner().invoke(report_cmd, ["--results", str(tmp_path), "--format", "csv", "--long"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(recs)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError" and failed[0]["top1"] == ""
    ok = next(r for r in rows if r["method"] == "lora" and r["task"] == "dtd" and r["seed"] == "1")
    assert ok["row"] == "LoRA" and ok["task_display"] == "DTD" and float(ok["top1"]) > 0
    assert {"train_time_s", "parallel_runs", "method_hparams", "backbone", "run_id", "source"} <= set(rows[0])
    bad = CliRunner().invoke(report_cmd, ["--results", str(tmp_path), "--long"])
    assert bad.exit_code != 0 and "--long applies to --format csv only" in str(bad.exception)


def test_train_time_spread_and_concurrency(collected):
    recs = [make_record("lora", "cifar", s, 70.0, train_time=t) for s, t in ((0, 50.0), (1, 70.0))]
    for r in recs:
        r["efficiency"]["concurrency"] = {"parallel_runs": 2, "torch_threads": 1, "device": "cuda"}
        r["efficiency"]["latency_ratio"] = 1.0
    recs[1]["efficiency"]["latency_ratio"] = 1.04
    report = build_report(recs, on_warning=collected.append)
    e = report.rows[0].efficiency
    assert e.train_time_s == 60.0 and e.train_time_std == pytest.approx(14.142, abs=1e-3)
    md = render(report, "markdown", table="efficiency")
    assert "| 1.0 min ± 0.2 |" in md
    assert "| n.m. |" in md and "LoRA (latency)" in md  # 1.02 ± 0.03: not told apart from 1x
    assert "Train times were measured with 2 runs in parallel, 1 thread." in md
    other = copy.deepcopy(recs[0])
    other["seed"], other["run_id"] = 2, "x" * 16
    other["efficiency"]["concurrency"] = {"parallel_runs": 1, "torch_threads": 8}
    md = render(build_report([*recs, other], **_quiet()), "markdown", table="efficiency")
    assert "Train times were measured under DIFFERENT concurrency" in md


def test_no_notes():
    report = build_report(golden_records(), **_quiet())
    for fmt in ("markdown", "latex"):
        with_notes, without = render(report, fmt), render(report, fmt, notes=False)
        assert "Protocol vtab1k" in with_notes and "Protocol vtab1k" not in without


def test_same_architecture_other_weights_get_distinct_labels():
    a = make_record("lora", "cifar", 0, 70.0)
    b = make_record("lora", "cifar", 0, 60.0)
    b["provenance"]["weights_sha256"] = "ef" * 32
    b["provenance"]["weights_source"] = "/w/other.npz"
    report = build_report([a, b], **_quiet())
    labels = sorted(r.label for r in report.rows)
    assert labels == ["LoRA (vit_base_patch16_224, ViT-B_16.npz 3f8a1b2c)", "LoRA (vit_base_patch16_224, other.npz efefefef)"]
    assert all(r.value("cifar").rank is None for r in report.rows)  # each alone in its block: never ranked


def test_where_matches_canonical_task_names():
    alias = make_record("lora", "cifar100", 0, 70.0)
    report = build_report([alias, make_record("lora", "dtd", 0, 60.0)], where=["task=cifar"], **_quiet())
    assert [c.key for c in report.task_columns] == ["cifar"]


def test_report_cli_plots_wide_and_mistakes(tmp_path):
    from petlbench.cli import main

    results = tmp_path / "results"
    write_records(results, [make_record(m, t, 0, 60.0 + i) for i, (m, t) in
                            enumerate((("linear", "cifar"), ("lora", "cifar"), ("lora", "dtd")))])
    runner = CliRunner()
    out = tmp_path / "t.tex"
    ok = runner.invoke(main, ["report", "--results", str(results), "--out", str(out), "--wide", "--no-notes",
                              "--plots", str(tmp_path / "fig"), "--order", "mean", "--names", "registry"])
    assert ok.exit_code == 0, ok.output
    tex = out.read_text()
    assert r"\begin{table*}" in tex and "Protocol vtab1k" not in tex and "\nlinear &" in tex
    assert len(list((tmp_path / "fig").glob("vtab_*.pdf"))) == 3 and len(list((tmp_path / "fig").glob("*.svg"))) == 3
    for args, needle in ((["--wide"], "--wide applies to --format latex only"),
                         (["--format", "csv", "--where", "rank"], "--where 'rank' is not key=value"),
                         (["--where", "nothing=1"], "no record has a field 'nothing'")):
        bad = runner.invoke(main, ["report", "--results", str(results), *args])
        lines = [x for x in bad.output.splitlines() if x.strip()]
        assert bad.exit_code == 2 and lines[-1].startswith("error: ") and needle in lines[-1], bad.output


def test_failed_smoke_run_is_not_a_failed_seed_of_the_real_runs():
    real = [make_record("lora", "cifar", s, 70.0 + s) for s in (0, 1, 2)]
    smoke = _smoke()
    smoke.update(status="failed", metrics={}, params={}, efficiency={},
                 error={"type": "RuntimeError", "message": "boom", "traceback": "..."})
    report = build_report([*real, smoke], **_quiet())
    by_label = {r.label: r for r in report.rows}
    assert by_label["LoRA (epochs=100, limit_train unset)"].failed == 0
    assert by_label["LoRA (epochs=2, limit_train=64)"].failed == 1
    crashed = make_record("lora", "cifar", 3, None, status="failed", config={})  # a launcher's crash record
    report = build_report([*real, crashed], **_quiet())
    assert [(r.label, r.failed) for r in report.rows] == [("LoRA", 1)]


def test_engine_failure_without_fingerprint_joins_its_row():
    """The engine writes a failed record before the data were read: no fingerprint, same configuration."""
    real = [make_record("lora", "cifar", s, 70.0 + s) for s in (0, 1)]
    failed = make_record("lora", "cifar", 2, None, status="failed")
    failed["provenance"].pop("data_fingerprint")
    report = build_report([*real, failed], **_quiet())
    assert [(r.label, r.failed, r.value("cifar").n) for r in report.rows] == [("LoRA", 1, 2)]


def test_evaluation_cadence_splits_rows_only_where_it_selects(collected):
    """eval_every adds a learning curve to a run that reports its final epoch (the same experiment);
    where the best evaluated epoch is selected, the cadence decides the number (different rows)."""
    def run(seed: int, every: int, selection: str) -> dict:
        r = make_record("lora", "cifar", seed, 60.0 + seed)
        r["config"]["train"] = {**r["config"]["train"], "eval_every": every}
        r["metrics"]["selection"] = selection
        return r

    final = build_report([run(0, 0, "final"), run(1, 10, "final")], on_warning=collected.append)
    assert len(final.rows) == 1 and final.rows[0].value("cifar").n == 2
    best = build_report([run(0, 1, "val"), run(1, 10, "val")], **_quiet())
    assert len(best.rows) == 2
