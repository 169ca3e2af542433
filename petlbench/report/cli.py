"""``petlbench report``: tables (LaTeX, HTML, Markdown, CSV) from stored run records.

Register on the main CLI with ``main.add_command(report)``. Fatal mistakes raise
:class:`~petlbench.errors.PetlbenchError` (the main CLI prints ``error: ...`` and exits 2);
skipped files and other surprises are printed as ``warning: ...`` lines on stderr. Every output
(``--out`` and each ``--plots`` figure) is written atomically: a reader, or a failed write,
sees the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

from pathlib import Path

import click

from petlbench.errors import PetlbenchError
from petlbench.report.formats import FORMATS, ORDERS, TABLES


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
@click.option("--wide", is_flag=True,
              help="LaTeX: table* floats spanning both columns of a two-column paper (and a two-column document).")
@click.option("--notes/--no-notes", default=True, show_default=True,
              help="Footnotes under the tables (leave them out when your paper explains the table itself).")
@click.option("--where", "where", multiple=True, metavar="KEY=VALUE",
              help="Only runs whose KEY (a record field, hyperparameter or training setting, or a dotted path such "
                   "as config.train.epochs) equals VALUE; KEY!=VALUE excludes; VALUE may list alternatives a,b. "
                   "Repeatable (all must hold).")
@click.option("--method", "-m", "methods", default=None,
              help="Only these methods, comma-separated; also the row order of --order given.")
@click.option("--order", type=click.Choice(ORDERS), default="given", show_default=True,
              help="Row order within a backbone block: as given (--method, else the papers' order), by "
                   "trainable parameters (fewest first) or by the headline mean (best first).")
@click.option("--names", type=click.Choice(["display", "registry"]), default="display", show_default=True,
              help="Name methods and tasks as papers do (LoRA, Flowers102) or by their registry names (lora, "
                   "oxford_flowers102).")
@click.option("--long", "long_csv", is_flag=True, help="CSV: one row per run (task, seed, accuracy, cost, "
                                                       "configuration) instead of one per table row.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write every figure as PNG, PDF and SVG into this folder.")
def report(results: tuple[Path, ...], suite: str | None, fmt: str | None, out: Path | None, table: str | None,
           reference: str | None, delta: bool, template: Path | None, standalone: bool, wide: bool, notes: bool,
           where: tuple[str, ...], methods: str | None, order: str, names: str, long_csv: bool,
           plots_dir: Path | None) -> None:
    """Aggregate run records into a methods x tasks table (mean ± std over seeds) with footnotes.

    A row is one configuration: runs that differ in any hyperparameter, training setting, data,
    backbone, weights or method code version are separate rows, never averaged together.

    \b
    Examples:
      petlbench report --results results --format latex --wide --out table.tex
      petlbench report --suite vtab --reference paper --delta --out report.html --plots figures
      petlbench report --where epochs=100 --method lora,arc --order params
      petlbench report --format csv --long --out runs.csv
      petlbench report --reference list
    """
    from petlbench.report import build_report, list_reference_sets, load_records, render
    from petlbench.report.rendering import format_for

    if reference == "list":
        for name, desc in list_reference_sets().items():
            click.echo(f"{name}  {desc}")
        return
    fmt = format_for(out, fmt)
    if template is not None and fmt not in ("latex", "html"):
        raise PetlbenchError("--template applies to --format latex or html only.")
    if not standalone and fmt != "latex":
        raise PetlbenchError("--fragment applies to --format latex only.")
    if long_csv and fmt != "csv":
        raise PetlbenchError("--long applies to --format csv only (one row per run).")
    if wide and fmt != "latex":
        raise PetlbenchError("--wide applies to --format latex only (table* floats for two-column papers).")
    if out is not None:  # before reading and rendering: a report that cannot be written is one line up front
        from petlbench.safeio import check_output_file

        check_output_file(out, "--out")
    loaded = load_records(results or (Path("results"),), on_warning=_warn)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    rep = build_report(loaded.records, suite=suite, reference=reference, delta=delta,
                       skipped=len(loaded.skipped), on_warning=_warn, where=where, methods=method_list,
                       order=order, names=names)
    rep.warnings = loaded.warnings + rep.warnings  # the HTML page lists them too
    text = render(rep, fmt, table=table, standalone=standalone, template=template, wide=wide, notes=notes,
                  long=long_csv)
    if plots_dir is not None:
        from petlbench.report.plots import save_plots

        try:
            paths = save_plots(rep, plots_dir)
        except OSError as exc:
            raise PetlbenchError(f"cannot write --plots {str(plots_dir)!r} ({exc.strerror or exc}).") from None
        click.echo(f"wrote {len(paths)} figure file(s) (PNG, PDF, SVG) to {plots_dir}", err=True)
    if out is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    from petlbench.safeio import atomic_write

    try:  # atomically: a failed write (disk full, quota) leaves the previous report as it was
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
    except OSError as exc:
        raise PetlbenchError(f"cannot write --out {str(out)!r} ({exc.strerror or exc}); "
                             "the previous file is unchanged.") from None
    click.echo(f"wrote {out} ({fmt}; {rep.n_ok} ok run(s), {len(rep.rows)} row(s))", err=True)
