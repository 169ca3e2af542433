"""The `report` command: formats, output files, tables, templates, reference sets; the sweep's hook."""

from __future__ import annotations

import csv
import io

from click.testing import CliRunner

from petlbench.report import markdown_table
from petlbench.report.cli import report as report_cmd


def _run(*args: str):
    result = CliRunner().invoke(report_cmd, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_format_from_suffix(results_dir, tmp_path):
    for name, start in (("t.tex", r"\documentclass"), ("t.html", "<!DOCTYPE html>"), ("t.md", "### VTAB-1k"),
                        ("t.csv", "row,kind,method")):
        result = _run("--results", str(results_dir), "--out", str(tmp_path / "out" / name))
        assert (tmp_path / "out" / name).read_text().startswith(start)
        assert f"wrote {tmp_path / 'out' / name}" in result.stderr


def test_default_is_markdown_on_stdout(results_dir):
    out = _run("--results", str(results_dir)).stdout
    assert out.startswith("### VTAB-1k: top-1 accuracy (%)")
    assert "### VTAB-1k: efficiency" in out


def test_default_results_folder(results_dir, monkeypatch):
    monkeypatch.chdir(results_dir.parent)  # the fixture's folder is called "results", like run's --output
    assert "| LoRA |" in _run().stdout


def test_tables_option(results_dir):
    out = _run("--results", str(results_dir), "--table", "efficiency").stdout
    assert "efficiency" in out and "top-1 accuracy" not in out
    rows = list(csv.DictReader(io.StringIO(_run("--results", str(results_dir), "--format", "csv",
                                               "--table", "efficiency").stdout)))
    lora = next(r for r in rows if r["row"] == "LoRA")
    assert lora["latency_ratio"] == "1.0" and lora["peak_gpu_mem_allocated_bytes"] == "2000000000"
    arc = next(r for r in rows if r["row"] == "ARC†")
    assert arc["latency_ratio"] == "" and arc["legacy_best_test"] == "True"


def test_csv_is_machine_readable(results_dir):
    rows = list(csv.DictReader(io.StringIO(_run("--results", str(results_dir), "--format", "csv",
                                               "--delta").stdout)))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"published", "reproduced", "delta"}
    lora = next(r for r in rows if r["row"] == "LoRA")
    assert float(lora["CIFAR-100 mean"]) == 64.1 and lora["CIFAR-100 n"] == "3" and lora["failed_runs"] == "1"
    assert float(lora["Mean of groups mean"]) > 0


def test_fragment_has_no_preamble(results_dir):
    out = _run("--results", str(results_dir), "--format", "latex", "--fragment", "--table", "accuracy").stdout
    assert r"\documentclass" not in out and out.count(r"\begin{table}") == 1


def test_reference_list():
    out = _run("--reference", "list").stdout
    assert out.startswith("paper  published ViT-B/16")


def test_own_templates(results_dir, tmp_path):
    tex = tmp_path / "mine.tex.j2"
    tex.write_text("\\BLOCK{for t in tables}\\VAR{t.title|tex}: \\VAR{t.rows|length} rows\n\\BLOCK{endfor}")
    out = _run("--results", str(results_dir), "--format", "latex", "--template", str(tex)).stdout
    assert out.splitlines()[:2] == ["VTAB-1k: top-1 accuracy (\\%): 4 rows", "VTAB-1k: efficiency: 4 rows"]
    wrapper = tmp_path / "wrap.tex.j2"
    wrapper.write_text("\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
                       "\\BLOCK{include \"tables.tex.j2\"}\n\\end{document}\n")
    out = _run("--results", str(results_dir), "--format", "latex", "--template", str(wrapper)).stdout
    assert out.startswith("\\documentclass{article}\n\\usepackage{booktabs,graphicx}")
    assert out.count("\\begin{table}") == 2
    html = tmp_path / "mine.html.j2"
    html.write_text("<h1>{{ title }}</h1>{% for r in report.rows %}<p>{{ r.label }}</p>{% endfor %}")
    out = _run("--results", str(results_dir), "--format", "html", "--template", str(html)).stdout
    assert "<p>my_m&amp;th%d#1</p>" in out


def test_markdown_table_for_the_sweep(records):
    text = markdown_table(records)
    assert text.startswith("### VTAB-1k: top-1 accuracy (%)")
    assert "efficiency" not in text
    assert "| LoRA | 0.33 | 0.29 | 3 | *64.1* ± 0.6 | **74.1** ± 0.6 |" in text


def test_public_api_names_resolve():
    import petlbench.report as rep

    assert set(rep.__all__) >= set(rep._EXPORTS)
    for name in rep.__all__:
        assert getattr(rep, name) is not None


def test_render_is_the_function_after_the_rendering_module_is_imported() -> None:
    """The package's ``render`` stays the function once its module has been imported: the module is
    ``rendering``, so importing it (markdown_table does) cannot shadow the name (it did when the
    module was called ``render``)."""
    import importlib

    import petlbench.report as report

    importlib.import_module("petlbench.report.rendering")
    from petlbench.report import render

    assert callable(render) and render.__module__ == "petlbench.report.rendering"
    assert report.render is render
