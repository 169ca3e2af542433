"""Aggregate run records into a methods x tasks report (numbers only; rendering is elsewhere).

One :class:`Report` feeds every output format, so LaTeX, HTML, Markdown and CSV always show the
same numbers, marks and footnotes. Rules that papers get wrong and that are enforced here:

- only ``status == "ok"`` records are averaged; failed runs are counted and footnoted;
- a group mean or overall mean exists only when every task of the group (suite) is present;
- VTAB's two overall means are both given and labelled: "Mean of groups" (mean of the Natural,
  Specialized and Structured means, the ARC/RepAdapter papers' "Mean") and "Mean of 19 tasks";
- runs selected on the test set (``legacy-best-test``) get their own rows, marked with a dagger,
  and mixed data fingerprints, weights or normalisations are footnoted, never hidden.

The steps live in their own modules: :mod:`~petlbench.report.table` (the data model),
:mod:`~petlbench.report.select` (suite and ``--where``), :mod:`~petlbench.report.rows` (runs into
rows), :mod:`~petlbench.report.stats` (means, ranks, order, efficiency) and
:mod:`~petlbench.report.notes` (footnotes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from petlbench.errors import PetlbenchError
from petlbench.protocols import TEST_SELECTED
from petlbench.report.formats import ORDERS
from petlbench.report.loading import record_problem, record_source, warn
from petlbench.report.notes import _efficiency_notes, _notes, _published_notes
from petlbench.report.rows import _assign_rows, _frame, _run_view, backbone_of
from petlbench.report.select import _parse_names, filter_where, resolve_suite
from petlbench.report.stats import _add_means, _efficiency, _order_rows, _rank, _series_mean
from petlbench.report.table import (
    METHOD_ORDER,
    PAPER_ARCH,
    Column,
    Efficiency,
    Note,
    Report,
    Row,
    Stat,
    _dig,
)

__all__ = ["Column", "Efficiency", "Note", "Report", "Row", "Stat", "build_report", "filter_where"]


def build_report(records: Iterable[Mapping[str, Any]], suite: Any = None, reference: str | None = None,
                 delta: bool = False, skipped: int = 0,
                 on_warning: Callable[[str], None] | None = None, *, where: Sequence[str] = (),
                 methods: Sequence[str] | None = None, order: str = "given", names: str = "display") -> Report:
    """Aggregate ``records`` (dicts in the run-record schema) into a :class:`Report`.

    ``suite``: a suite name/path/object; default: the suite the records name (they must agree).
    ``reference``: a reference set name (``paper``) or CSV path, added as "(published)" rows.
    ``delta``: also compute reproduced - published rows (implies ``reference="paper"`` when unset).
    ``skipped``: files the caller already skipped (counted in a footnote).
    ``where``: ``key=value`` filters (:func:`filter_where`); ``methods``: report only these
    methods, in this order; ``order``: rows ``given`` (that order, else the papers'), by ``params``
    (fewest first) or by ``mean`` (best first); ``names``: ``display`` names ("LoRA",
    "Flowers102") or the ``registry`` names.
    """
    on_warning = on_warning or warn
    warnings_seen: list[str] = []
    if order not in ORDERS:
        raise PetlbenchError(f"--order {order!r} is not one of {', '.join(ORDERS)}.")
    names = _parse_names(names)

    def say(message: str) -> None:
        warnings_seen.append(message)
        on_warning(message)

    usable, skipped = _usable(records, methods, skipped, say)
    the_suite, recs = resolve_suite(usable, suite, say)
    if where:  # after the suite: task names are canonical (an alias on disk matches --where task=cifar)
        recs = filter_where(recs, where)
    if delta and reference is None:
        reference = "paper"

    row_of, meta, split_notes = _assign_rows(recs, names)
    for text in split_notes:
        say(text)
    labels = {rid: m.label for rid, m in meta.items()}
    df = _frame(recs, row_of)
    ok, notes = _newest_of_duplicates(df[df.status == "ok"], labels, say)
    failed = df[df.status == "failed"]

    published_methods: list[Any] = []
    ref_label = None
    if reference is not None:
        published_methods, ref_label = _published(reference, the_suite, say)
    multi = len(the_suite.groups) > 1
    task_label = {t.name: (t.name if names == "registry" else getattr(t, "label", t.name)) for t in the_suite.tasks}
    shown_tasks = set(df.task).union(*(set(pm.accuracy) for pm in published_methods))
    columns, groups = _columns(the_suite, shown_tasks, task_label, multi)
    headline = "mean:groups" if multi else "mean:tasks"

    given = [*(methods or ()), *METHOD_ORDER]
    rows = _order_rows(_reproduced_rows(meta, ok, failed, recs, the_suite, multi), order, headline, given)
    published = _published_rows(published_methods, the_suite, multi)
    if order != "given":
        published = _order_rows(published, order, headline, given)
    deltas: list[Row] = []
    if delta:
        declared: dict[str, set[str | None]] = defaultdict(set)  # row label -> published names its runs map to
        for r in recs:
            if r["status"] == "ok":
                declared[labels[row_of[id(r)]]].add(_declared_name(r, the_suite.name))
        deltas = _delta_rows(rows, published, declared, columns, say)
    blocks = _rank_by_block(columns, rows, published)

    report = Report(suite=the_suite.name, suite_title=the_suite.title or the_suite.name, columns=columns,
                    groups=groups, rows=rows, published=published, deltas=deltas, warnings=warnings_seen,
                    n_ok=len(ok), n_failed=len(failed), n_skipped=skipped, reference=ref_label,
                    headline_key=headline, blocks=blocks)
    kept = set(ok.idx) | set(failed.idx)  # duplicates left out above do not count for the notes either
    recs = [r for i, r in enumerate(recs) if i in kept]
    by_row = {id(r): labels[row_of[id(r)]] for r in recs}
    report.runs = [_run_view(r, by_row[id(r)], meta[row_of[id(r)]].display, task_label) for r in recs]
    notes = _notes(report, the_suite, recs, by_row, failed, labels, multi) + notes
    notes += [Note(text) for text in split_notes]
    if len(blocks) > 1:
        notes.append(Note(f"Rows on different backbones or weights ({len(blocks)} blocks) are ranked only within "
                          "their block" + (", published rows with the ViT-B/16 block" if published else "") + "."))
    report.notes = notes + _published_notes(report, delta)
    report.efficiency_notes = _efficiency_notes(report, recs)
    return report


def _usable(records: Iterable[Mapping[str, Any]], methods: Sequence[str] | None, skipped: int,
            say: Callable[[str], None]) -> tuple[list[dict[str, Any]], int]:
    """The records that can be aggregated (others skipped with a warning and counted), restricted
    to ``methods`` when given; the count of skipped files includes the caller's ``skipped``."""
    usable: list[dict[str, Any]] = []
    for r in records:
        problem = record_problem(r)
        if problem is not None:
            say(f"skipping {record_source(r) if isinstance(r, Mapping) else '<record>'}: {problem}")
            skipped += 1
            continue
        usable.append(dict(r))
    if not usable:
        raise PetlbenchError("no usable run records to report. Fix: run `petlbench run` first.")
    if methods:
        wanted = list(dict.fromkeys(methods))
        present = {r["method"] for r in usable}
        missing = [m for m in wanted if m not in present]
        if missing:
            raise PetlbenchError(f"--method {','.join(missing)}: no record of {'this method' if len(missing) == 1 else 'these methods'} "
                                 f"(the records have {', '.join(sorted(present))}). Fix: pass methods that ran.")
        usable = [r for r in usable if r["method"] in wanted]
    return usable, skipped


def _newest_of_duplicates(ok: pd.DataFrame, labels: Mapping[str, str], say: Callable[[str], None]
                          ) -> tuple[pd.DataFrame, list[Note]]:
    """The ok runs with one record per (row, task, seed): the newest; the others are warned about and
    counted in a note, never averaged in as extra seeds."""
    ok = ok.sort_values(["end_time", "idx"])
    dup = ok.duplicated(["row", "task", "seed"], keep="last")
    if not dup.any():
        return ok, []
    for _, d in ok[dup].iterrows():
        say(f"duplicate run of {labels[d.row]} on {d.task} seed {d.seed} (same configuration): using the newest "
            f"record, not {d.source}")
    note = Note(f"{int(dup.sum())} duplicate run(s) (same configuration, task and seed) were left out; "
                "the newest record of each was used.")
    return ok[~dup], [note]


def _columns(suite: Any, shown_tasks: set[str], task_label: Mapping[str, str], multi: bool
             ) -> tuple[list[Column], dict[str, list[str]]]:
    """The accuracy columns (tasks with a value in some row, by group; group means and overall
    means) and the shown tasks of each group."""
    columns: list[Column] = []
    groups: dict[str, list[str]] = {}
    for group, tasks in suite.groups.items():
        shown = [t for t in tasks if t in shown_tasks]
        if shown:
            groups[group] = shown
            columns += [Column(t, task_label.get(t, t), "task", group) for t in shown]
    if multi:
        columns += [Column(f"group:{g}", g, "group") for g in groups]
        columns.append(Column("mean:groups", "Mean of groups", "mean"))
    columns.append(Column("mean:tasks", f"Mean of {len(suite.tasks)} tasks", "mean"))
    return columns, groups


def _reproduced_rows(meta: Mapping[str, Any], ok: pd.DataFrame, failed: pd.DataFrame,
                     recs: Sequence[Mapping[str, Any]], suite: Any, multi: bool) -> list[Row]:
    """One row per configuration (``meta``: row id -> its key): per-task mean, std and n over seeds,
    failures, means, parameters and efficiency."""
    stats = ok.groupby(["row", "task"])["top1"].agg(["mean", "std", "count", list])
    fails = failed.groupby(["row", "task"]).size()
    block_text = {backbone_of(r)[0]: "; ".join(backbone_of(r)[1:]) for r in recs}
    rows: list[Row] = []
    for key, m in meta.items():
        row = Row(key=m.label, label=m.label, method=m.method, kind="reproduced", protocol=m.protocol,
                  legacy=m.protocol in TEST_SELECTED, display=m.display, block=block_text.get(m.backbone, ""))
        for task in suite.task_names:
            st = Stat(failed=int(fails.get((key, task), 0)))
            if (key, task) in stats.index:
                s = stats.loc[(key, task)]
                st.mean = float(s["mean"])
                st.std = None if pd.isna(s["std"]) else float(s["std"])
                st.n = int(s["count"])
                st.values = tuple(float(v) for v in s["list"])
            if st.present or st.failed:
                row.values[task] = st
        row.failed = int(sum(st.failed for st in row.values.values()))
        ns = [st.n for st in row.values.values() if st.n]
        row.n_min, row.n_max = (min(ns), max(ns)) if ns else (0, 0)
        _add_means(row, suite, multi)
        mine = ok[ok.row == key]
        per_task = mine.groupby("task")[["trainable", "trainable_no_head"]].mean()
        row.params_by_task = {str(t): float(v) / 1e6 for t, v in per_task["trainable"].dropna().items()}
        tr = _series_mean(per_task["trainable"])
        nh = _series_mean(per_task["trainable_no_head"])
        row.params_m = None if tr is None else tr / 1e6
        row.params_no_head_m = None if nh is None else nh / 1e6
        row.efficiency = _efficiency(mine, row)
        rows.append(row)
    return rows


def _published_rows(published_methods: Sequence[Any], suite: Any, multi: bool) -> list[Row]:
    """One "(published)" row per method of the reference set, its means computed here."""
    published: list[Row] = []
    for pm in published_methods:
        label = f"{pm.name} (published{', unverified' if pm.unverified else ''})"
        row = Row(key=f"published:{pm.name}", label=label, method=pm.ours or pm.name, kind="published",
                  params_m=pm.params_m, published=pm, display=pm.name)
        for task, acc in pm.accuracy.items():
            row.values[task] = Stat(mean=acc, n=1, values=(acc,))
        _add_means(row, suite, multi)
        published.append(row)
    return published


def _declared_name(record: Mapping[str, Any], suite: str) -> str | None:
    """The published row a run says it reproduces (``Method.published``), None when it declares none."""
    from petlbench.report.reference import published_name

    hp = _dig(record, "config", "method_hparams")
    return published_name(record["method"], suite, hp if isinstance(hp, Mapping) else None)


def _delta_rows(rows: Sequence[Row], published: Sequence[Row], declared: Mapping[str, set[str | None]],
                columns: Sequence[Column], say: Callable[[str], None]) -> list[Row]:
    """Reproduced minus published, for each row whose runs all declare the same published row
    (``declared``: row label -> those names) and that ran on the published rows' backbone."""
    by_name = {r.published.name: r for r in published}
    deltas: list[Row] = []
    other_backbone: list[str] = []
    for row in rows:
        names = declared.get(row.label, set())
        ref = by_name.get(next(iter(names))) if len(names) == 1 and None not in names else None
        if ref is None:
            continue
        if not row.block.startswith(PAPER_ARCH):  # published rows are ViT-B/16: no delta across backbones
            other_backbone.append(row.label)
            continue
        name = ref.published.name
        label = f"Δ {row.label}" if name == row.label else f"{row.label} − {name}"
        d = Row(key=f"delta:{row.key}", label=label, method=row.method,
                kind="delta", protocol=row.protocol, legacy=row.legacy, compared_to=ref.label,
                display=row.display, block=row.block)
        for col in columns:
            a, b = row.value(col.key), ref.value(col.key)
            if a.present and b.present:
                d.values[col.key] = Stat(mean=a.mean - b.mean)
        deltas.append(d)
    if other_backbone:
        say(f"--delta: no delta rows for {', '.join(other_backbone)}: they ran on another backbone than the "
            f"published rows' {PAPER_ARCH} (ImageNet-21k), so the difference would not be the method's")
    if not deltas:
        mapped = sorted({n for ns in declared.values() for n in ns if n})
        say("--delta: no reproduced configuration declares a published row of this reference set "
            f"({'declared: ' + ', '.join(mapped) if mapped else 'none declared'}; see Method.published); "
            "no delta rows")
    return deltas


def _rank_by_block(columns: Sequence[Column], rows: Sequence[Row], published: Sequence[Row]) -> list[str]:
    """Mark best and second best per column within each backbone block; return the blocks in order.

    Rows on different backbones or weights are never ranked against each other; published rows
    (ViT-B/16, ImageNet-21k) are ranked with the ViT-B/16 block when there is one."""
    blocks = list(dict.fromkeys(r.block for r in rows))
    reference_block = next((b for b in blocks if b.startswith(PAPER_ARCH)), None)
    for b in blocks:
        _rank(columns, [*(published if b == reference_block else []), *[r for r in rows if r.block == b]])
    if reference_block is None and published:
        _rank(columns, published)
    return blocks


def _published(reference: str, suite: Any, say: Callable[[str], None]) -> tuple[list[Any], str]:
    from petlbench.data.suites import name_key
    from petlbench.report.reference import load_reference, published_methods

    df, label = load_reference(reference)
    names = {name_key(n) for n in (suite.name, *suite.aliases)}
    methods = published_methods(df, names, suite.resolve_task, say, suite=suite.name)
    if not methods:
        benches = ", ".join(sorted(set(df["benchmark"].astype(str))))
        say(f"reference set {label!r} has no numbers for suite {suite.name!r} (it covers {benches})")
    return methods, label
