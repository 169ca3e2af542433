"""The reporter under hostile input (issue 11): user templates run sandboxed, any method name
compiles in LaTeX, and corrupt records are skipped with a warning instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import petlbench.report
from petlbench.cli import main
from petlbench.report import build_report, load_records, render, tex_escape
from tests.report.conftest import compile_latex
from tests.report.factory import golden_records, make_record, write_records

TEMPLATES = Path(petlbench.report.__file__).parent / "templates"
EXPLOITS = {
    "html": "{{ cycler.__init__.__globals__.os.system('touch %s') }}",
    "latex": r"\VAR{ cycler.__init__.__globals__.os.system('touch %s') }",
}


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("fmt", ["html", "latex"])
def test_template_cannot_run_python(results_dir: Path, tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    template = tmp_path / f"evil.{fmt}.j2"
    template.write_text(EXPLOITS[fmt] % marker)
    result = CliRunner().invoke(main, ["report", "--results", str(results_dir), "--format", fmt,
                                       "--template", str(template), "--out", str(tmp_path / f"out.{fmt}")])
    assert not marker.exists(), "the template ran a shell command"
    line = _error_line(result)
    assert str(template) in line and "sandbox" in line


@pytest.mark.parametrize("name, fmt", [("report.html.j2", "html"), ("report.tex.j2", "latex"),
                                       ("tables.tex.j2", "latex")])
def test_shipped_templates_still_work_as_template(results_dir: Path, tmp_path: Path, name: str, fmt: str) -> None:
    shipped = TEMPLATES / name
    assert shipped.is_file()
    own = tmp_path / name
    own.write_text(shipped.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / f"out.{fmt}"
    result = CliRunner().invoke(main, ["report", "--results", str(results_dir), "--format", fmt,
                                       "--template", str(own), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Linear probing" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(("raw", "tex"), [
    ("[ours] LoRA", r"{[}ours{]} LoRA"),
    ("α-LoRA", r"\ensuremath{\alpha}-LoRA"),
    ("ΓΩ-adapter", r"\ensuremath{\Gamma}\ensuremath{\Omega}-adapter"),
    ("Dvořák ő", r"Dvo\v{r}ák \H{o}"),
    ("Łódź", r"\L{}ód\'{z}"),
    ("漢", r"\texttt{U+6F22}"),
])
def test_tex_escape_labels(raw: str, tex: str) -> None:
    assert tex_escape(raw) == tex
    assert "[U+" not in tex_escape(raw)


def test_row_labels_starting_with_a_bracket_or_non_latin_compile(tmp_path: Path) -> None:
    names = ["[ours] LoRA", "αβ-adapter", "Ωmega [v2]", "Dvořák-ș-ą", "漢字 LoRA", "[", "]x"]
    recs = golden_records() + [make_record(n, "cifar", 0, 50.0 + i) for i, n in enumerate(names)]
    report = build_report(recs, reference="paper", delta=True, on_warning=lambda m: None)
    tex = render(report, "latex")
    assert "\\\\\n[" not in tex and "\\midrule\n[" not in tex
    compile_latex(tex, tmp_path)
    (tmp_path / "table.tex").write_text(render(report, "latex", standalone=False), encoding="utf-8")
    doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
           "\\begin{document}\n\\input{table}\n\\end{document}\n")
    compile_latex(doc, tmp_path, "fragment")


def test_deeply_nested_record_is_skipped_with_a_warning(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    write_records(folder, [make_record("linear", "cifar", 0, 60.0)])
    bad = folder / "vtab" / "cifar" / "linear" / "deep.json"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("[" * 200_000)
    seen: list[str] = []
    loaded = load_records([folder], on_warning=seen.append)
    assert len(loaded.records) == 1
    assert len(seen) == 1 and str(bad) in seen[0] and "corrupt" in seen[0]
    result = CliRunner().invoke(main, ["report", "--results", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"warning: skipping {bad}" in result.output and "Traceback" not in result.output


def test_deeply_nested_record_is_redone_on_resume(tmp_path: Path) -> None:
    from petlbench.records import is_done, read_record

    path = tmp_path / "r.json"
    path.write_text("[" * 200_000)
    assert read_record(path) is None and not is_done(path)
    path.write_text(json.dumps(make_record("lora", "cifar", 0, 70.0)))  # a record the report can show
    assert is_done(path)
