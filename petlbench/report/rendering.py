"""Render a :class:`~petlbench.report.table.Report` as LaTeX, HTML, Markdown or CSV.

Numbers are formatted here once, into format-neutral views (:class:`TableView`), so every format
shows the same digits, marks and notes. LaTeX and HTML go through jinja2 templates (package data,
overridable with ``--template``); LaTeX templates use ``\\VAR{...}``/``\\BLOCK{...}`` delimiters,
which cannot clash with TeX braces, and every data string passes the ``tex`` filter.

Template variables (``--template``): ``report`` (:class:`Report`), ``tables`` (list of
:class:`TableView`: ``key``, ``title``, ``caption``, ``header``, ``sections`` of :class:`RowView`,
``spans``/``span_cells()``/``span_rules()``, ``notes``), ``title``, ``warnings``; LaTeX also
``standalone`` and ``landscape``, with the filters ``tex``, ``cell``, ``header``, ``colspec`` and
``note``; HTML also ``plots`` (``key``, ``title``, ``caption``, ``src`` as a data: URI). A LaTeX
template may ``\\BLOCK{include "tables.tex.j2"}`` to reuse the shipped table layout.
"""

from __future__ import annotations

import base64
import io
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from petlbench.errors import PetlbenchError, read_user_text
from petlbench.report.formats import FORMATS, SUFFIXES, TABLES, csv_safe
from petlbench.report.table import DIGITS, Efficiency, Note, Report, Row, Stat

MISSING = "–"


# ---------------------------------------------------------------------------- number formatting


def fmt_acc(value: float | None, digits: int = DIGITS) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_delta(value: float | None, digits: int = DIGITS) -> str:
    if value is None:
        return MISSING
    text = f"{abs(value):.{digits}f}"
    if float(text) == 0:
        return f"±{text}"
    return f"+{text}" if value > 0 else f"−{text}"


def fmt_params(value: float | None) -> str:
    """Millions, as the "(M)" in every parameter column says: two decimals from 0.01 M up (85.80,
    0.29, 0.01); below, two significant digits (0.0077, 0.00031), so a tiny method never shows as
    0.00 and no cell switches to another unit."""
    if value is None:
        return MISSING
    if value == 0:
        return "0"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.7f}".rstrip("0")


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.{1 if value / size < 100 else 0}f} {unit}"
    return f"{value:.0f} B"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def fmt_plain(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return MISSING if value is None else f"{value:,.{digits}f}{suffix}"


def fmt_seconds_std(value: float | None, std: float | None) -> str | None:
    """The spread of a time in the unit its mean is printed in."""
    if value is None or std is None:
        return None
    for size in (3600.0, 60.0):
        if value >= size:
            return f"{std / size:.1f}"
    return f"{std:.2f}" if value < 10 else f"{std:.1f}"


# ---------------------------------------------------------------------------- views


@dataclass
class HeaderCell:
    """A column header; ``label`` is short (rotated in LaTeX), ``flat`` is unambiguous without spans."""

    label: str
    flat: str
    mark: str = ""
    rotate: bool = False
    numeric: bool = True
    align: str = "c"


@dataclass
class CellView:
    text: str
    std: str | None = None
    n_note: str | None = None
    rank: int | None = None
    sort: float | None = None
    title: str = ""

    @property
    def missing(self) -> bool:
        return self.text == MISSING


@dataclass
class RowView:
    label: str
    cells: list[CellView]
    kind: str = "reproduced"
    legacy: bool = False


@dataclass
class TableView:
    """A table ready for a template: header, spans over header columns, row sections, notes."""

    key: str
    title: str
    caption: str
    header: list[HeaderCell]
    sections: list[list[RowView]]
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (label, first column, count)
    notes: list[Note] = field(default_factory=list)
    wide: bool = False
    #: A heading per section (the backbone block) or None; shown only when a table has several blocks.
    section_titles: list[str | None] = field(default_factory=list)

    def titled_sections(self) -> list[tuple[str | None, list[RowView]]]:
        titles = self.section_titles + [None] * (len(self.sections) - len(self.section_titles))
        return list(zip(titles, self.sections, strict=False))

    @property
    def rows(self) -> list[RowView]:
        return [r for s in self.sections for r in s]

    def span_cells(self) -> list[tuple[str, int]]:
        """The spanning header row as (label, columns) covering every column ("" where no span)."""
        out: list[tuple[str, int]] = []
        col = 0
        for label, first, count in sorted(self.spans, key=lambda s: s[1]):
            out += [("", 1)] * (first - col)
            out.append((label, count))
            col = first + count
        out += [("", 1)] * (len(self.header) - col)
        return out

    def span_rules(self) -> list[tuple[int, int]]:
        """1-based (first, last) columns under each span, for ``\\cmidrule``."""
        return [(first + 1, first + count) for _label, first, count in sorted(self.spans, key=lambda s: s[1])]


def _acc_cell(st: Stat, row: Row) -> CellView:
    if not st.present:
        title = f"{st.failed} failed run(s)" if st.failed else ""
        return CellView(MISSING, title=title)
    std = None if st.std is None else fmt_acc(st.std)
    n_note = f"n={st.n}" if row.kind == "reproduced" and st.n and st.n < row.n_max else None
    title = ""
    if st.values and row.kind == "reproduced":
        title = f"n={st.n}: " + ", ".join(f"{v:.2f}" for v in st.values)
        if st.failed:
            title += f"; {st.failed} failed"
    return CellView(fmt_acc(st.mean), std, n_note, st.rank, st.mean, title)


def _lead_header(report: Report) -> list[HeaderCell]:
    return [
        HeaderCell("Method", "Method", numeric=False, align="l"),
        HeaderCell("Params (M)", "Params (M)", align="r", rotate=True),
        HeaderCell("w/o head (M)", "Params w/o head (M)", align="r", rotate=True),
        HeaderCell("Seeds", "Seeds", align="c", rotate=True),
    ]


def _value_header(report: Report) -> tuple[list[HeaderCell], list[tuple[str, int, int]]]:
    header: list[HeaderCell] = []
    spans: list[tuple[str, int, int]] = []
    for group, tasks in report.groups.items():
        spans.append((group, len(header), len(tasks)))
        for col in report.columns:
            if col.kind == "task" and col.key in tasks:
                header.append(HeaderCell(col.label, col.label, col.mark, rotate=True))
    n_groups = sum(1 for c in report.columns if c.kind == "group")
    if n_groups:
        spans.append(("Group means", len(header), n_groups))
        header += [HeaderCell(c.label, f"{c.label} (mean)", rotate=True) for c in report.columns if c.kind == "group"]
    means = [c for c in report.columns if c.kind == "mean"]
    spans.append(("Overall", len(header), len(means)))
    header += [HeaderCell(c.label, c.label, rotate=True) for c in means]
    return header, spans


def _keys(report: Report) -> list[str]:
    keys = []
    for tasks in report.groups.values():
        keys += [c.key for c in report.columns if c.kind == "task" and c.key in tasks]
    keys += [c.key for c in report.columns if c.kind == "group"]
    keys += [c.key for c in report.columns if c.kind == "mean"]
    return keys


def _blocks(report: Report, rows: Sequence[Row]) -> list[tuple[str | None, list[Row]]]:
    """Rows split into backbone blocks (one untitled section when all rows share a backbone)."""
    if len(report.blocks) <= 1:
        return [(None, list(rows))] if rows else []
    out = []
    for block in report.blocks:
        mine = [r for r in rows if r.block == block]
        if mine:
            out.append((f"Backbone: {block}", mine))
    return out


def accuracy_view(report: Report) -> TableView:
    lead = _lead_header(report)
    values, spans = _value_header(report)
    keys = _keys(report)
    sections = []
    titles: list[str | None] = []
    groups = ([("Published", report.published)] if report.published else []) + _blocks(report, report.rows)
    for title, rows in groups:
        if not rows:
            continue
        titles.append(title if len(report.blocks) > 1 else None)
        section = []
        for row in rows:
            lead_cells = [
                CellView(fmt_params(row.params_m), sort=row.params_m),
                CellView(fmt_params(row.params_no_head_m), sort=row.params_no_head_m),
                CellView(row.seeds_text, sort=row.n_max or None),
            ]
            cells = lead_cells + [_acc_cell(row.value(k), row) for k in keys]
            section.append(RowView(row.label, cells, row.kind, row.legacy))
        sections.append(section)
    caption = (f"Top-1 accuracy (%) on {report.suite_title}: mean and sample standard deviation over seeds "
               f"(Seeds = runs per cell). Params: trainable parameters in millions averaged over tasks, with "
               f"and without the classification head.")
    shifted = [(label, first + len(lead), count) for label, first, count in spans]
    return TableView("accuracy", f"{report.suite_title}: top-1 accuracy (%)", caption, lead + values, sections,
                     shifted, list(report.notes), wide=len(values) > 8, section_titles=titles)


def delta_view(report: Report) -> TableView | None:
    if not report.deltas:
        return None
    values, spans = _value_header(report)
    keys = _keys(report)
    sections, titles = [], []
    for title, block in _blocks(report, report.deltas):
        rows = []
        for row in block:
            cells = [CellView(fmt_delta(row.value(k).mean), sort=row.value(k).mean) for k in keys]
            rows.append(RowView(row.label, cells, "delta", row.legacy))
        sections.append(rows)
        titles.append(title)
    caption = (f"Reproduced minus published top-1 (points) on {report.suite_title}, per task and for the means "
               f"(published numbers: reference set ‘{report.reference}’).")
    shifted = [(label, first + 1, count) for label, first, count in spans]
    return TableView("delta", f"{report.suite_title}: reproduced − published (points)", caption,
                     [HeaderCell("Method", "Method", numeric=False, align="l"), *values], sections, shifted,
                     [], wide=len(values) > 8, section_titles=titles)


def efficiency_view(report: Report) -> TableView:
    header = [
        HeaderCell("Method", "Method", numeric=False, align="l"),
        HeaderCell("Trainable (M)", "Trainable params (M)", align="r"),
        HeaderCell("w/o head (M)", "Trainable w/o head (M)", align="r"),
        HeaderCell("Extra after merge (M)", "Extra params after merge (M)", align="r"),
        HeaderCell("Storage / task", "Storage per task", align="r"),
        HeaderCell("Train time / run", "Train time per run", align="r"),
        HeaderCell("Images/s", "Train images/s", align="r"),
        HeaderCell("Peak memory", "Peak GPU memory", align="r"),
        HeaderCell("Latency (×)", "Inference latency vs backbone (×)", align="r"),
    ]
    sections, titles = [], []
    for title, block in _blocks(report, report.rows):
        rows = []
        for row in block:
            e = row.efficiency
            if e is None or e.runs == 0:
                cells = [CellView(MISSING) for _ in header[1:]]
            else:
                cells = [
                    CellView(fmt_params(e.trainable_m), sort=e.trainable_m),
                    CellView(fmt_params(e.trainable_no_head_m), sort=e.trainable_no_head_m),
                    CellView(fmt_params(e.extra_after_merge_m), sort=e.extra_after_merge_m),
                    CellView(fmt_bytes(e.storage_bytes), sort=e.storage_bytes),
                    _train_time_cell(e),
                    CellView(fmt_plain(e.images_per_s, 0), sort=e.images_per_s),
                    CellView(fmt_bytes(e.peak_mem_bytes), sort=e.peak_mem_bytes),
                    _latency_cell(e),
                ]
            rows.append(RowView(row.label, cells, row.kind, row.legacy))
        sections.append(rows)
        titles.append(title)
    caption = (f"Cost of each method on {report.suite_title} (reproduced rows); ± is the spread between repeated "
               "measurements (see the notes).")
    return TableView("efficiency", f"{report.suite_title}: efficiency", caption, header, sections or [[]], [],
                     list(report.efficiency_notes), section_titles=titles)


#: Cell texts of the efficiency table where a number would mislead (explained in its notes).
PLAIN_BACKBONE = "= backbone"
NOT_MEASURABLE = "n.m."


def _train_time_cell(e: Efficiency) -> CellView:
    if not e.train_time_measurable:
        return CellView(NOT_MEASURABLE, title="spread between seeds larger than the time itself")
    return CellView(fmt_seconds(e.train_time_s), fmt_seconds_std(e.train_time_s, e.train_time_std),
                    sort=e.train_time_s)


def _latency_cell(e: Efficiency) -> CellView:
    """The deployed model's latency against the plain backbone's: a ratio only where it means
    something. A merged model is the plain backbone by construction, so it says so instead of
    showing two timings of one architecture divided by each other."""
    if e.deploys_plain:
        return CellView(PLAIN_BACKBONE, title="merged: the deployed model is the plain backbone")
    if not e.latency_measurable:
        return CellView(NOT_MEASURABLE, title="spread larger than the difference from the backbone")
    return CellView(fmt_plain(e.latency_ratio, 2, "×"),
                    None if e.latency_ratio_std is None else f"{e.latency_ratio_std:.2f}", sort=e.latency_ratio)


def table_views(report: Report, table: str = "all", notes: bool = True) -> list[TableView]:
    """The tables selected by ``table`` (accuracy, efficiency or all), in display order; without
    ``notes`` the tables carry no footnotes (``--no-notes``, e.g. when the paper has its own)."""
    views = _table_views(report, table)
    if not notes:
        for view in views:
            view.notes = []
    return views


def _table_views(report: Report, table: str) -> list[TableView]:
    if table not in TABLES:
        raise PetlbenchError(f"--table {table!r} is not one of {', '.join(TABLES)}.")
    views: list[TableView] = []
    if table in ("accuracy", "all"):
        views.append(accuracy_view(report))
        d = delta_view(report)
        if d is not None:
            views.append(d)
    if table in ("efficiency", "all"):
        views.append(efficiency_view(report))
    return views


# ---------------------------------------------------------------------------- LaTeX

_TEX_CHARS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "|": r"\textbar{}", "\"": "''",
    "–": "--", "—": "---", "−": r"\ensuremath{-}", "±": r"\ensuremath{\pm}", "×": r"\ensuremath{\times}",
    "†": r"\dag{}", "‡": r"\ddag{}", "Δ": r"\ensuremath{\Delta}", "…": r"\dots{}", "≥": r"\ensuremath{\geq}",
    "≤": r"\ensuremath{\leq}", "·": r"\ensuremath{\cdot}", "§": r"\S{}", "°": r"\ensuremath{^\circ}",
    "’": "'", "‘": "`", "“": "``", "”": "''", "\u00a0": "~",
}
_LATIN1_OK = re.compile(r"[\u00c0-\u00ff]")
# Letters without a decomposition that pdflatex's default (OT1) fonts still draw.
_TEX_LETTERS = {
    "ß": r"\ss{}", "æ": r"\ae{}", "Æ": r"\AE{}", "ø": r"\o{}", "Ø": r"\O{}", "œ": r"\oe{}", "Œ": r"\OE{}",
    "ł": r"\l{}", "Ł": r"\L{}", "ı": r"\i{}", "ȷ": r"\j{}", "µ": r"\ensuremath{\mu}", "÷": r"\ensuremath{\div}",
    "→": r"\ensuremath{\rightarrow}", "←": r"\ensuremath{\leftarrow}", "∞": r"\ensuremath{\infty}",
    "≈": r"\ensuremath{\approx}", "≠": r"\ensuremath{\neq}", "√": r"\ensuremath{\surd}", "•": r"\ensuremath{\bullet}",
    "ς": r"\ensuremath{\varsigma}", "ϵ": r"\ensuremath{\epsilon}", "ϑ": r"\ensuremath{\vartheta}",
    "ϕ": r"\ensuremath{\phi}", "ϖ": r"\ensuremath{\varpi}", "ϱ": r"\ensuremath{\varrho}",
}
# Combining marks (after NFD) -> LaTeX text accents that work in OT1.
_TEX_ACCENTS = {
    "\u0300": "`", "\u0301": "'", "\u0302": "^", "\u0303": "~", "\u0304": "=", "\u0306": "u", "\u0307": ".",
    "\u0308": '"', "\u030a": "r", "\u030b": "H", "\u030c": "v", "\u0323": "d", "\u0327": "c", "\u0331": "b",
    # OT1 has no ogonek (\k needs T1) and no comma below: the cedilla is the closest hook below.
    "\u0326": "c", "\u0328": "c",
}
_GREEK = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lamda", "mu",
          "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega")
# Capitals that look like Latin letters have no macro of their own in LaTeX.
_GREEK_LATIN_CAPITALS = {"alpha": "A", "beta": "B", "epsilon": "E", "zeta": "Z", "eta": "H", "iota": "I",
                         "kappa": "K", "mu": "M", "nu": "N", "omicron": "O", "rho": "P", "tau": "T", "chi": "X"}


def _tex_greek(ch: str) -> str | None:
    """Greek letters as math-mode symbols, which every LaTeX install draws (accents are dropped)."""
    base = unicodedata.normalize("NFD", ch)[0]
    name = unicodedata.name(base, "")
    match = re.fullmatch(r"GREEK (SMALL|CAPITAL) LETTER (\w+)", name)
    if match is None or match.group(2).lower() not in _GREEK:
        return None
    letter = match.group(2).lower()
    macro = "lambda" if letter == "lamda" else letter
    if match.group(1) == "SMALL":
        return "o" if letter == "omicron" else rf"\ensuremath{{\{macro}}}"
    if letter in _GREEK_LATIN_CAPITALS:
        return _GREEK_LATIN_CAPITALS[letter]
    return rf"\ensuremath{{\{macro.capitalize()}}}"


def _tex_accented(ch: str) -> str | None:
    """A Latin letter with diacritics (ő, č, ș, ą...) as its base letter under LaTeX accent commands."""
    parts = unicodedata.normalize("NFD", ch)
    base, marks = parts[0], parts[1:]
    if not (base.isascii() and base.isalpha()) or not marks or any(m not in _TEX_ACCENTS for m in marks):
        return None
    out = {"i": r"\i", "j": r"\j"}.get(base, base) if marks[0] not in "\u0323\u0326\u0327\u0328\u0331" else base
    for mark in marks:
        out = rf"\{_TEX_ACCENTS[mark]}{{{out}}}"
    return out


def tex_escape(value: Any) -> str:
    """Make any string safe in LaTeX text mode (pdflatex, OT1 fonts, no extra packages).

    ``[`` and ``]`` are braced: a label that starts a table row after ``\\\\`` or ``\\midrule``
    would otherwise be read as their optional argument. Latin letters with diacritics become
    accent commands and Greek letters math symbols; characters those fonts cannot draw at all
    (CJK, Cyrillic, emoji) are shown as their code point in typewriter type, ``\texttt{U+6F22}``.
    """
    out = []
    for ch in str(value):
        if ch in _TEX_CHARS:
            out.append(_TEX_CHARS[ch])
        elif ch in "[]":
            out.append("{" + ch + "}")
        elif ord(ch) < 128:
            out.append(ch if ch.isprintable() else " ")
        elif _LATIN1_OK.match(ch) and ch not in "×÷ÐðÞþ":
            out.append(ch)
        elif ch in _TEX_LETTERS:
            out.append(_TEX_LETTERS[ch])
        elif (text := _tex_accented(ch) or _tex_greek(ch)) is not None:
            out.append(text)
        elif unicodedata.category(ch).startswith(("Z", "C")):
            out.append(" ")
        elif unicodedata.category(ch) == "Mn":
            continue  # a stray combining mark
        else:
            out.append(rf"\texttt{{U+{ord(ch):04X}}}")
    return "".join(out)


def latex_cell(cell: CellView, stacked: bool = False) -> str:
    """``\\textbf{75.0}\\textsubscript{$\\pm$2.2}``: bold best, underlined second, std as a subscript;
    ``stacked`` (``--wide``) puts the std in small type under the mean, which halves the column width."""
    if cell.missing:
        return "--"
    text = tex_escape(cell.text)
    if cell.rank == 1:
        text = rf"\textbf{{{text}}}"
    elif cell.rank == 2:
        text = rf"\underline{{{text}}}"
    note = rf"\textsuperscript{{{tex_escape(cell.n_note)}}}" if cell.n_note else ""
    if cell.std is None:
        return text + note
    if stacked:
        return (rf"\begin{{tabular}}[t]{{@{{}}c@{{}}}}{text}{note}\\[-2pt]"
                rf"{{\scriptsize$\pm${tex_escape(cell.std)}}}\end{{tabular}}")
    return text + rf"\textsubscript{{$\pm${tex_escape(cell.std)}}}" + note


def latex_stacked_cell(cell: CellView) -> str:
    return latex_cell(cell, stacked=True)


def latex_header(cell: HeaderCell) -> str:
    text = tex_escape(cell.label)
    if cell.mark:
        text += rf"\textsuperscript{{{tex_escape(cell.mark)}}}"
    return rf"\rotatebox{{90}}{{{text}}}" if cell.rotate else text


def latex_colspec(table: TableView) -> str:
    return "@{}" + "".join(h.align for h in table.header) + "@{}"


def latex_note(note: Note) -> str:
    mark = rf"\textsuperscript{{{tex_escape(note.mark)}}}" if note.mark else ""
    return mark + tex_escape(note.text)


def _latex_env(**extra: Any) -> jinja2.Environment:
    env = SandboxedEnvironment(  # --template files are data: no attribute walk to os.system
        loader=jinja2.PackageLoader("petlbench.report", "templates"),
        block_start_string=r"\BLOCK{", block_end_string="}",
        variable_start_string=r"\VAR{", variable_end_string="}",
        comment_start_string=r"\#{", comment_end_string="}",
        line_comment_prefix="%#", trim_blocks=True, lstrip_blocks=True, autoescape=False,
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, **extra,
    )
    env.filters.update(tex=tex_escape, cell=latex_cell, stacked_cell=latex_stacked_cell, header=latex_header,
                       colspec=latex_colspec,
                       note=latex_note)
    return env


def _html_env() -> jinja2.Environment:
    env = SandboxedEnvironment(  # --template files are data: no attribute walk to os.system
        loader=jinja2.PackageLoader("petlbench.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env


def _render(env: jinja2.Environment, default: str, template: str | Path | None, context: dict[str, Any]) -> str:
    try:
        if template is None:
            tpl = env.get_template(default)
        else:
            path = Path(template).expanduser()
            tpl = env.from_string(read_user_text(path, f"--template {str(path)!r}", "save the template as UTF-8"))
        return tpl.render(**context)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{template or exc.name or default}, line {exc.lineno}"
        raise PetlbenchError(f"template {where}: {exc.message}. Fix the template.") from None
    except jinja2.UndefinedError as exc:
        raise PetlbenchError(f"template {template or default}: {exc.message} (the variables are listed in "
                             "petlbench.report.rendering's docstring). Fix the template.") from None
    except jinja2.exceptions.SecurityError as exc:
        raise PetlbenchError(f"template {template or default}: {exc} (templates run sandboxed: they may format "
                             "the report's data but not reach Python internals). Fix the template.") from None
    except jinja2.TemplateError as exc:
        raise PetlbenchError(f"template {template or default}: {exc}. Fix the template.") from None


def _context(report: Report, table: str, notes: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "report": report,
        "tables": table_views(report, table, notes),
        "title": f"petlbench report: {report.suite_title}",
        "warnings": list(report.warnings),
        **extra,
    }


def render_latex(report: Report, table: str = "all", standalone: bool = True,
                 template: str | Path | None = None, wide: bool = False, notes: bool = True) -> str:
    """A complete pdflatex document (``standalone``) or only the table floats, for ``\\input``.

    ``wide``: ``table*`` floats spanning both columns of a two-column paper (and a two-column
    document when ``standalone``); ``notes``: the footnotes under each table.
    """
    ctx = _context(report, table, notes, standalone=standalone, wide=wide)
    ctx["landscape"] = any(t.wide for t in ctx["tables"])
    return _render(_latex_env(), "report.tex.j2" if standalone else "tables.tex.j2", template, ctx)


# ---------------------------------------------------------------------------- HTML


def render_html(report: Report, table: str = "all", template: str | Path | None = None,
                plots: bool = True, notes: bool = True) -> str:
    """One self-contained page: tables (sortable), notes and plots inlined as base64 PNG."""
    figures = []
    if plots:
        from petlbench.report.plots import all_plots

        for p in all_plots(report):
            figures.append({"key": p.key, "title": p.title, "caption": p.caption,
                            "src": "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")})
    ctx = _context(report, table, notes, plots=figures)
    return _render(_html_env(), "report.html.j2", template, ctx)


# ---------------------------------------------------------------------------- Markdown

_MD_ALWAYS = str.maketrans({"\\": "\\\\", "|": "\\|", "*": "\\*", "`": "\\`", "<": "\\<", ">": "\\>",
                            "[": "\\[", "]": "\\]", "$": "\\$", "~": "\\~"})
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_MD_ENTITY = re.compile(r"&(?=#?[A-Za-z0-9]+;)")


def md_escape(value: Any) -> str:
    """Escape what Markdown (GFM) would interpret, but leave words like ``vit_base`` readable."""
    text = str(value).translate(_MD_ALWAYS).replace("\n", " ")
    text = _MD_UNDERSCORE.sub(r"\\_", text)
    return _MD_ENTITY.sub(r"\\&", text)


def md_cell(cell: CellView) -> str:
    if cell.missing:
        return MISSING
    text = cell.text
    if cell.rank == 1:
        text = f"**{text}**"
    elif cell.rank == 2:
        text = f"*{text}*"
    if cell.std is not None:
        text += f" ± {cell.std}"
    if cell.n_note:
        text += f" ({cell.n_note})"
    return text


def markdown_view(table: TableView, heading: str = "###") -> str:
    lines = [f"{heading} {md_escape(table.title)}", ""] if heading else []
    header = [md_escape(h.flat) + (md_escape(h.mark) if h.mark else "") for h in table.header]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(":---" if h.align == "l" else ("---:" if h.align == "r" else ":---:")
                                for h in table.header) + "|")
    for title, section in table.titled_sections():
        if title:
            lines.append("| " + " | ".join([f"**{md_escape(title)}**", *([""] * (len(table.header) - 1))]) + " |")
        for row in section:
            lines.append("| " + " | ".join([md_escape(row.label), *(md_cell(c) for c in row.cells)]) + " |")
    return "\n".join(lines)


def _md_notes(notes: Sequence[Note]) -> list[str]:
    return [f"- {md_escape(n.mark) + ' ' if n.mark else ''}{md_escape(n.text)}" for n in notes]


def render_markdown(report: Report, table: str = "all", heading: str = "###", notes: bool = True) -> str:
    """Tables for READMEs and terminals: best in **bold**, second in *italics*, then the notes."""
    parts = []
    for view in table_views(report, table, notes):
        block = [markdown_view(view, heading), ""]
        if view.key == "accuracy":
            block.append("Best per column in **bold**, second in *italics*; ± is the sample standard deviation "
                         "over seeds.")
            block.append("")
        block += _md_notes(view.notes)
        parts.append("\n".join(block).rstrip())
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- CSV


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def accuracy_frame(report: Report) -> Any:
    """A wide pandas DataFrame: one row per method row, mean/std/n per task, group and overall means."""
    import pandas as pd

    keys = _keys(report)
    labels = {c.key: c.label for c in report.columns}
    task_keys = {c.key for c in report.task_columns}
    records = []
    for row in [*report.published, *report.rows, *report.deltas]:
        rec: dict[str, Any] = {
            "row": row.label, "kind": row.kind, "method": row.method, "protocol": row.protocol or "",
            "legacy_best_test": row.legacy, "params_M": _r(row.params_m, 6),
            "params_M_without_head": _r(row.params_no_head_m, 6),
            "seeds_min": row.n_min if row.kind == "reproduced" else None,
            "seeds_max": row.n_max if row.kind == "reproduced" else None,
            "failed_runs": row.failed if row.kind == "reproduced" else None,
        }
        for k in keys:
            st = row.value(k)
            name = labels[k] if not k.startswith("group:") else f"{labels[k]} (group mean)"
            rec[f"{name} mean"] = _r(st.mean)
            if k in task_keys:
                rec[f"{name} std"] = _r(st.std)
                rec[f"{name} n"] = st.n if row.kind == "reproduced" else None
        records.append(rec)
    df = pd.DataFrame(records)
    for col in ("seeds_min", "seeds_max", "failed_runs", *[c for c in df.columns if c.endswith(" n")]):
        df[col] = df[col].astype("Int64")
    return df


def efficiency_frame(report: Report) -> Any:
    import pandas as pd

    records = []
    for row in report.rows:
        e = row.efficiency
        records.append({
            "row": row.label, "method": row.method, "protocol": row.protocol or "", "legacy_best_test": row.legacy,
            "trainable_M": _r(e.trainable_m, 6) if e else None,
            "trainable_without_head_M": _r(e.trainable_no_head_m, 6) if e else None,
            "extra_after_merge_M": _r(e.extra_after_merge_m, 6) if e else None,
            "storage_bytes_per_task": _r(e.storage_bytes, 1) if e else None,
            "train_time_s": _r(e.train_time_s, 4) if e else None,
            "train_time_std_s": _r(e.train_time_std, 4) if e else None,
            "train_concurrency": "; ".join(e.concurrency) if e else "",
            "train_images_per_s": _r(e.images_per_s, 2) if e else None,
            "peak_gpu_mem_allocated_bytes": None if e is None or e.peak_mem_bytes is None else int(e.peak_mem_bytes),
            "latency_ratio": _r(e.latency_ratio, 4) if e else None,
            "latency_ratio_std": _r(e.latency_ratio_std, 4) if e else None,
            # How the tables show the two timed figures (the CSV keeps what was measured).
            "train_time_shown_as": "" if e is None or e.train_time_s is None else
            ("not measurable" if not e.train_time_measurable else "time"),
            "latency_shown_as": "" if e is None else "plain backbone (merged)" if e.deploys_plain else
            "" if e.latency_ratio is None else "not measurable" if not e.latency_measurable else "ratio",
            "runs": e.runs if e else 0,
        })
    df = pd.DataFrame(records)
    if len(df):
        df["peak_gpu_mem_allocated_bytes"] = df["peak_gpu_mem_allocated_bytes"].astype("Int64")
    return df


def long_frame(report: Report) -> Any:
    """One row per run (ok and failed): its table row, task, seed, accuracy, cost and configuration."""
    import pandas as pd

    df = pd.DataFrame(report.runs)
    for col in ("seed", "trainable", "trainable_without_head", "extra_after_merge", "parallel_runs",
                "selected_epoch"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df


def render_csv(report: Report, table: str = "accuracy", long: bool = False) -> str:
    """One table per CSV (spreadsheets read one): ``accuracy`` (default) or ``efficiency``; with
    ``long``, one row per run instead (for your own statistics)."""
    if long:
        buf = io.StringIO()
        csv_safe(long_frame(report)).to_csv(buf, index=False, lineterminator="\n")
        return buf.getvalue()
    if table == "all":
        raise PetlbenchError("a CSV file holds one table. Fix: pass --table accuracy or --table efficiency.")
    if table not in TABLES:
        raise PetlbenchError(f"--table {table!r} is not one of {', '.join(TABLES)}.")
    df = accuracy_frame(report) if table == "accuracy" else efficiency_frame(report)
    buf = io.StringIO()
    csv_safe(df).to_csv(buf, index=False, lineterminator="\n")  # no cell a spreadsheet runs as a formula
    return buf.getvalue()


# ---------------------------------------------------------------------------- dispatch


def format_for(out: str | Path | None, fmt: str | None) -> str:
    """The output format: ``fmt`` when given, else from ``out``'s suffix, else markdown."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise PetlbenchError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
        return fmt
    if out is not None:
        suffix = Path(out).suffix.lower()
        if suffix in SUFFIXES:
            return SUFFIXES[suffix]
        raise PetlbenchError(f"cannot tell the format of --out {str(out)!r} from its suffix. "
                             f"Fix: pass --format ({', '.join(FORMATS)}).")
    return "markdown"


def render(report: Report, fmt: str = "markdown", table: str | None = None, standalone: bool = True,
           template: str | Path | None = None, *, wide: bool = False, notes: bool = True,
           long: bool = False) -> str:
    """Render ``report`` in ``fmt`` (latex, html, markdown, csv); ``table``: accuracy, efficiency or all.

    ``wide``: LaTeX ``table*`` (two-column papers); ``notes``: footnotes under the tables;
    ``long``: CSV only, one row per run.
    """
    fmt = format_for(None, fmt)
    if template is not None and fmt not in ("latex", "html"):
        raise PetlbenchError("--template applies to --format latex or html only.")
    if long and fmt != "csv":
        raise PetlbenchError("--long applies to --format csv only (one row per run).")
    if wide and fmt != "latex":
        raise PetlbenchError("--wide applies to --format latex only (table* floats for two-column papers).")
    if fmt == "csv":
        return render_csv(report, table or "accuracy", long=long)
    table = table or "all"
    if fmt == "latex":
        return render_latex(report, table, standalone, template, wide=wide, notes=notes)
    if fmt == "html":
        return render_html(report, table, template, notes=notes)
    return render_markdown(report, table, notes=notes)
