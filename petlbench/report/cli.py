"""``petlbench report``: tables (LaTeX, HTML, Markdown, CSV) from stored run records.

Register on the main CLI with ``main.add_command(report)``. Fatal mistakes raise
:class:`~petlbench.errors.PetlbenchError` (the main CLI prints ``error: ...`` and exits 2);
skipped files and other surprises are printed as ``warning: ...`` lines on stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from petlbench.errors import PetlbenchError
from petlbench.report.formats import FORMATS, TABLES


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@click.command("report")
@click.option("--results", "-r", "results", multiple=True, type=click.Path(path_type=Path),
              help="Folder of run records (the --output of `petlbench run`), or a record file. Repeatable. "
                   "[default: results]")
@click.option("--suite", "-s", default=None,
              help="Suite to report (name or YAML file) [default: the one the records name; required when "
                   "they name several].")
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format [default: from --out's suffix, else markdown].")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of stdout.")
@click.option("--table", "table", type=click.Choice(TABLES), default=None,
              help="Which tables [default: all; csv: accuracy].")
@click.option("--reference", default=None, metavar="SET",
              help="Add published numbers as '(published)' rows: a set name ('paper'), a CSV file with the same "
                   "columns, or 'list' to list the sets.")
@click.option("--delta", is_flag=True, help="Also show reproduced − published per task (implies --reference paper).")
@click.option("--template", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Your own jinja2 template for --format latex or html (see the shipped ones).")
@click.option("--standalone/--fragment", default=True, show_default=True,
              help="LaTeX: a complete document, or only the table floats for \\input.")
def report(results: tuple[Path, ...], suite: str | None, fmt: str | None, out: Path | None, table: str | None,
           reference: str | None, delta: bool, template: Path | None, standalone: bool) -> None:
    """Aggregate run records into a methods x tasks table (mean ± std over seeds) with footnotes.

    \b
    Examples:
      petlbench report --results results --format latex --out table.tex
      petlbench report --suite vtab --reference paper --delta --out report.html
      petlbench report --reference list
    """
    from petlbench.report import build_report, list_reference_sets, load_records, render
    from petlbench.report.render import format_for

    if reference == "list":
        for name, desc in list_reference_sets().items():
            click.echo(f"{name}  {desc}")
        return
    fmt = format_for(out, fmt)
    if template is not None and fmt not in ("latex", "html"):
        raise PetlbenchError("--template applies to --format latex or html only.")
    if not standalone and fmt != "latex":
        raise PetlbenchError("--fragment applies to --format latex only.")
    loaded = load_records(results or (Path("results"),), on_warning=_warn)
    rep = build_report(loaded.records, suite=suite, reference=reference, delta=delta,
                       skipped=len(loaded.skipped), on_warning=_warn)
    rep.warnings = loaded.warnings + rep.warnings  # the HTML page lists them too
    text = render(rep, fmt, table=table, standalone=standalone, template=template)
    if out is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PetlbenchError(f"cannot write --out {str(out)!r} ({exc.strerror or exc}).") from None
    click.echo(f"wrote {out} ({fmt}; {rep.n_ok} ok run(s), {len(rep.rows)} row(s))", err=True)
