"""The LaTeX output compiles as-is with pdflatex (Debian texlive-latex-base + -recommended)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from petlbench.report import build_report, render
from tests.report.conftest import compile_latex
from tests.report.factory import HTML_HOSTILE, TEX_HOSTILE, golden_records, make_record


def test_document_with_hostile_names_reference_and_delta_compiles(tmp_path):
    recs = golden_records() + [make_record(TEX_HOSTILE, "cifar", 0, 50.0), make_record(HTML_HOSTILE, "dtd", 0, 40.0)]
    report = build_report(recs, reference="paper", delta=True, on_warning=lambda m: None)
    pdf = compile_latex(render(report, "latex"), tmp_path)
    if shutil.which("pdftotext") is None:  # poppler-utils: optional, not installed by .ci/report-deps.sh
        return
    pdftotext = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True)
    if pdftotext.returncode == 0:
        text = pdftotext.stdout  # OT1 draws "_" as a rule, which pdftotext reads as a space
        assert "my m&th%d#1" in text and "a b&c%d#e$f{g}h˜iˆj\\k" in text
        assert "x<script>window. pwned=1</script>" in text
        assert "Mean of groups" in text and "Mean of 19 tasks" in text


def test_fragment_compiles_when_input(tmp_path):
    report = build_report(golden_records(), on_warning=lambda m: None)
    (tmp_path / "table.tex").write_text(render(report, "latex", standalone=False), encoding="utf-8")
    doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
           "\\begin{document}\nSee Table~\\ref{tab:petlbench-vtab-accuracy}.\n\\input{table}\n\\end{document}\n")
    compile_latex(doc, tmp_path)


def _scales(folder: Path, name: str = "doc") -> dict[str, float]:
    """Scale factor of each table, from the lines the template writes to the log."""
    import re

    log = (folder / f"{name}.log").read_text(errors="replace").replace("\n", "")
    found = re.findall(r"petlbench: table (\w+) set at ([\d.]+)pt \(natural width ([\d.]+)pt", log)
    return {key: float(w) / float(natural) for key, w, natural in found}


def test_wide_document_is_two_column_with_table_star_and_one_scale(tmp_path):
    report = build_report(golden_records(), reference="paper", delta=True, on_warning=lambda m: None)
    tex = render(report, "latex", wide=True)
    assert r"\documentclass[10pt,twocolumn]{article}" in tex and tex.count(r"\begin{table*}") == 3
    assert r"\begin{table}" not in tex
    compile_latex(tex, tmp_path)
    scales = _scales(tmp_path)
    assert set(scales) == {"accuracy", "delta", "efficiency"}
    # The efficiency table prints at the accuracy table's size, not blown up to the full width.
    assert scales["efficiency"] == pytest.approx(scales["accuracy"], rel=1e-3)
    assert scales["accuracy"] >= 0.55  # readable: about 6 pt type or larger in a 10 pt two-column paper


def test_wide_fragment_in_a_two_column_paper(tmp_path):
    report = build_report(golden_records(), on_warning=lambda m: None)
    (tmp_path / "table.tex").write_text(render(report, "latex", standalone=False, wide=True, notes=False),
                                        encoding="utf-8")
    doc = ("\\documentclass[twocolumn]{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
           "\\begin{document}\nSee Table~\\ref{tab:petlbench-vtab-accuracy}.\n\\input{table}\n"
           "\\input{table}\n\\end{document}\n")  # twice: the macros must not clash when a paper inputs two tables
    compile_latex(doc, tmp_path)
    scales = _scales(tmp_path)
    assert scales and min(scales.values()) >= 0.55


def test_caption_is_spaced_from_the_rules():
    tex = render(build_report(golden_records(), on_warning=lambda m: None), "latex", table="accuracy")
    float_start = tex.index(r"\begin{table}")
    assert float_start < tex.index(r"\setlength{\belowcaptionskip}{6pt}") < tex.index(r"\caption{") \
        < tex.index(r"\toprule")
