"""The LaTeX output compiles as-is with pdflatex (Debian texlive-latex-base + -recommended)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from petlbench.report import build_report, render
from tests.report.conftest import require_tool
from tests.report.factory import HTML_HOSTILE, TEX_HOSTILE, golden_records, make_record


def _pdflatex(tex: str, folder: Path, name: str = "doc") -> Path:
    exe = require_tool("pdflatex")
    (folder / f"{name}.tex").write_text(tex, encoding="utf-8")
    proc = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", f"{name}.tex"],
                          cwd=folder, capture_output=True, text=True, timeout=120)
    log = (folder / f"{name}.log").read_text(errors="replace") if (folder / f"{name}.log").exists() else proc.stdout
    errors = [line for line in log.splitlines() if line.startswith("!")]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stdout[-3000:]
    pdf = folder / f"{name}.pdf"
    assert pdf.stat().st_size > 1000
    return pdf


def test_document_with_hostile_names_reference_and_delta_compiles(tmp_path):
    recs = golden_records() + [make_record(TEX_HOSTILE, "cifar", 0, 50.0), make_record(HTML_HOSTILE, "dtd", 0, 40.0)]
    report = build_report(recs, reference="paper", delta=True, on_warning=lambda m: None)
    pdf = _pdflatex(render(report, "latex"), tmp_path)
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
    _pdflatex(doc, tmp_path)
