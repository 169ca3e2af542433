"""Bad input: one clear line per problem; unusable files are skipped with a warning naming each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from petlbench.errors import PetlbenchError
from petlbench.report import build_report, load_records
from petlbench.report.cli import report as report_cmd
from tests.report.factory import make_record, write_records


def _invoke(*args: str):
    return CliRunner().invoke(report_cmd, list(args))


def _fatal(result, pattern: str) -> str:
    """The command raised a one-line PetlbenchError (the main CLI prints it as `error: ...`, exit 2)."""
    assert isinstance(result.exception, PetlbenchError), result.output
    message = str(result.exception)
    assert "\n" not in message
    import re

    assert re.search(pattern, message), message
    return message


def test_missing_folder(tmp_path):
    _fatal(_invoke("--results", str(tmp_path / "nope")), r"results folder '.*nope' does not exist")


def test_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    _fatal(_invoke("--results", str(tmp_path)), r"no run records \(\*\.json\) under .*Fix:")


def test_corrupt_truncated_and_other_schema_are_skipped(tmp_path):
    good = [make_record("lora", "cifar", s, 70.0 + s) for s in (0, 1)]
    write_records(tmp_path, good)
    truncated = tmp_path / "vtab" / "cifar" / "lora" / "truncated.json"
    truncated.write_text(json.dumps(make_record("lora", "cifar", 2, 99.0))[:200])
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xff\xfe not json")
    old = tmp_path / "old.json"
    old.write_text(json.dumps(make_record("lora", "cifar", 3, 99.0, schema_version=0)))
    new = tmp_path / "new.json"
    new.write_text(json.dumps(make_record("lora", "cifar", 4, 99.0, schema_version=2)))
    other = tmp_path / "notes.json"
    other.write_text(json.dumps(["not", "a", "record"]))
    result = CliRunner().invoke(report_cmd, ["--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert f"warning: skipping {truncated}: invalid JSON, truncated or corrupt" in err
    assert f"warning: skipping {garbage}: " in err
    assert f"warning: skipping {old}: schema_version 0 is older than the 1 this petlbench reads" in err
    assert f"warning: skipping {new}: schema_version 2 is not the 1 this petlbench reads (upgrade petlbench" in err
    assert f"warning: skipping {other}: not a run record" in err
    # Only the two good records are averaged: 70.5 ± 0.7 with 2 seeds, never the 99s.
    assert "| LoRA | 0.37 | 0.29 | 2 | 70.5 ± 0.7 |" in result.stdout
    assert "5 file(s) were skipped as unreadable or of another record schema" in result.stdout


def test_only_bad_files_is_fatal(tmp_path):
    (tmp_path / "a.json").write_text("{")
    warnings: list[str] = []
    with pytest.raises(PetlbenchError, match=r"none of the 1 JSON file\(s\) under .* is a usable run record"):
        load_records([tmp_path], on_warning=warnings.append)
    assert warnings == [f"skipping {tmp_path / 'a.json'}: invalid JSON, truncated or corrupt "
                        "(Expecting property name enclosed in double quotes at line 1)"]


def test_ok_record_without_accuracy_is_skipped(tmp_path):
    bad = make_record("lora", "cifar", 0, 70.0)
    bad["metrics"].pop("top1")
    write_records(tmp_path, [bad, make_record("lora", "cifar", 1, 71.0)])
    warnings: list[str] = []
    loaded = load_records([tmp_path], on_warning=warnings.append)
    assert len(loaded.records) == 1
    assert "status is 'ok' but metrics.top1 is None, not a percentage" in warnings[0]


@pytest.mark.parametrize("key", ["train", "method_hparams", "backbone_kwargs"])
def test_config_part_of_another_type_is_skipped(tmp_path, key):
    """A record whose config.train (or hyperparameters, backbone arguments) is not an object is
    skipped with a warning; it used to end the report in an AttributeError."""
    bad = make_record("lora", "cifar", 0, 70.0)
    bad["config"][key] = [1]
    write_records(tmp_path, [bad, make_record("lora", "cifar", 1, 71.0)])
    warnings: list[str] = []
    loaded = load_records([tmp_path], on_warning=warnings.append)
    assert len(loaded.records) == 1 and f"field 'config.{key}' must be an object" in warnings[0]
    build_report(loaded.records, on_warning=warnings.append)


def test_mixed_suites_need_suite(tmp_path):
    write_records(tmp_path, [make_record("lora", "cifar", 0, 70.0),
                             make_record("lora", "digits", 0, 60.0, suite="demo", classes=10)])
    _fatal(_invoke("--results", str(tmp_path)),
           r"the records mix suites demo \(1 record\), vtab \(1 record\). Fix: pass --suite NAME")
    result = _invoke("--results", str(tmp_path), "--suite", "vtab")
    assert result.exit_code == 0, result.output
    assert "warning: leaving out 1 record(s) of suite demo (reporting --suite vtab)" in result.stderr
    assert "| LoRA |" in result.stdout and "digits" not in result.stdout


def test_suite_with_no_records(tmp_path):
    write_records(tmp_path, [make_record("lora", "cifar", 0, 70.0)])
    _fatal(_invoke("--results", str(tmp_path), "--suite", "fgvc"),
           r"none of the 1 record\(s\) is of suite 'fgvc' \(they are of suite vtab\)")


def test_task_not_in_suite(tmp_path):
    paths = write_records(tmp_path, [make_record("lora", "cifar", 0, 70.0), make_record("lora", "imagenet", 0, 80.0)])
    msg = _fatal(_invoke("--results", str(tmp_path)), r"is of task 'imagenet', which suite 'vtab' .* does not define")
    assert str(paths[1]) in msg


def test_aliases_resolve_to_canonical_tasks():
    alias = make_record("lora", "cifar100", 0, 70.0)
    alias["provenance"]["data_fingerprint"] = make_record("lora", "cifar", 0, 70.0)["provenance"]["data_fingerprint"]
    report = build_report([alias, make_record("lora", "cifar", 1, 72.0)], on_warning=lambda m: None)
    assert report.rows[0].value("cifar").n == 2


def test_unregistered_suite(tmp_path):
    write_records(tmp_path, [make_record("lora", "x", 0, 70.0, suite="mysuite")])
    _fatal(_invoke("--results", str(tmp_path)), r"records are of suite 'mysuite', which is not registered here")


def test_failed_runs_are_counted_not_averaged():
    recs = [make_record("lora", "cifar", 0, 70.0), make_record("lora", "cifar", 1, None, status="failed"),
            make_record("full", "cifar", 0, None, status="failed")]
    report = build_report(recs, on_warning=lambda m: None)
    lora = next(r for r in report.rows if r.method == "lora")
    full = next(r for r in report.rows if r.method == "full")
    assert lora.value("cifar").n == 1 and lora.value("cifar").failed == 1
    assert not full.value("cifar").present and full.failed == 1
    assert report.n_ok == 1 and report.n_failed == 2
    from petlbench.report import markdown_table

    md = markdown_table(recs)
    assert "| Full fine-tuning | – | – | – | – |" in md
    assert "2 failed run(s) are not included (RuntimeError ×2): Full fine-tuning/cifar seed 0, LoRA/cifar seed 1." in md


def test_duplicates_and_differing_configurations():
    warnings: list[str] = []
    recs = [make_record("lora", "cifar", 0, 70.0), make_record("lora", "cifar", 0, 71.0, run_id="other")]
    recs[1]["provenance"]["end_time"] = "2025-02-01T00:00:00+00:00"
    report = build_report(recs, on_warning=warnings.append)
    assert report.rows[0].value("cifar").values == (71.0,)  # the newer record, not an average
    assert any("duplicate run of LoRA on cifar seed 0 (same configuration)" in w for w in warnings)
    # Another rank on the same task and seeds: two rows, never one average.
    recs = [make_record("lora", "cifar", s, 70.0, hparams={"rank": 8}) for s in (0, 1)]
    recs += [make_record("lora", "cifar", s, 60.0, hparams={"rank": 4}) for s in (0, 1)]
    report = build_report(recs, on_warning=lambda m: None)
    assert [r.label for r in report.rows] == ["LoRA (rank=4)", "LoRA (rank=8)"]


def test_mixed_weights_and_normalisation_are_flagged():
    a = make_record("lora", "cifar", 0, 70.0)
    b = make_record("full", "cifar", 0, 75.0)
    b["provenance"]["weights_sha256"] = "ab" * 32
    b["config"]["normalization"] = {"name": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    md = build_report([a, b], on_warning=lambda m: None)
    from petlbench.report import render_markdown

    text = render_markdown(md, "accuracy")
    assert "Input normalisation DIFFERS between runs" in text
    assert "Backbone or weights DIFFER between runs" in text and "SHA-256 abababababab" in text


def test_template_and_format_mistakes(tmp_path: Path):
    write_records(tmp_path, [make_record("lora", "cifar", 0, 70.0)])
    _fatal(_invoke("--results", str(tmp_path), "--out", str(tmp_path / "x.pdf")), r"cannot tell the format")
    _fatal(_invoke("--results", str(tmp_path), "--format", "csv", "--table", "all"), r"a CSV file holds one table")
    bad = tmp_path / "bad.tex.j2"
    bad.write_text(r"\BLOCK{for x in}")
    _fatal(_invoke("--results", str(tmp_path), "--format", "latex", "--template", str(bad)), r"template .*line 1")
    undefined = tmp_path / "undef.tex.j2"
    undefined.write_text(r"\VAR{nothing_here}")
    _fatal(_invoke("--results", str(tmp_path), "--format", "latex", "--template", str(undefined)),
           r"'nothing_here' is undefined")
    _fatal(_invoke("--results", str(tmp_path), "--format", "markdown", "--template", str(bad)),
           r"--template applies to --format latex or html only")
    latin1 = tmp_path / "latin1.html.j2"
    latin1.write_bytes(b"\xff\xfe{{ x }}")
    _fatal(_invoke("--results", str(tmp_path), "--format", "html", "--template", str(latin1)), r"is not UTF-8 text")


def test_launcher_style_failed_record():
    """What petlbench.launch writes when a run dies before the engine could: empty config and params."""
    crashed = {"schema_version": 1, "run_id": "f" * 16, "label": "vtab/dtd/lora/seed0", "suite": "vtab",
               "task": "dtd", "method": "lora", "seed": 0, "protocol": "vtab1k", "status": "failed",
               "error": {"type": "SlurmTimeout", "message": "job timed out"}, "metrics": {}, "params": {},
               "config": {}, "efficiency": {}, "provenance": {"hostname": "n1", "end_time": "2025-01-01T00:00:00Z"}}
    report = build_report([make_record("lora", "cifar", 0, 70.0), crashed], on_warning=lambda m: None)
    assert [r.label for r in report.rows] == ["LoRA"]
    assert report.rows[0].value("dtd").failed == 1
    from petlbench.report import render_markdown

    assert "1 failed run(s) are not included (SlurmTimeout ×1): LoRA/dtd seed 0." in render_markdown(report)
