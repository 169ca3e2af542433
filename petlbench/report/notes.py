"""The footnotes of a report: how means are formed, protocols, normalisation, backbone and
weights, data fingerprints, subsets, execution settings, seeds, failures, published sources and
the efficiency table's basis (concurrency, devices). A difference that is hidden in the table is
stated here, never dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pandas as pd

from petlbench.protocols import TEST_SELECTED
from petlbench.report.rows import backbone_of
from petlbench.report.table import (
    DAGGER,
    DDAGGER,
    EXECUTION_KEYS,
    LEGACY,
    Note,
    Report,
    _dig,
    _fmt_value,
    _join,
    _rows_text,
)


def _notes(report: Report, suite: Any, recs: list[dict[str, Any]], row_label: Mapping[int, str],
           failed: pd.DataFrame, labels: Mapping[str, str], multi: bool) -> list[Note]:
    notes: list[Note] = []
    ok = [r for r in recs if r["status"] == "ok"]
    group_names = list(suite.groups)
    if multi:
        notes.append(Note(
            f"Group means ({', '.join(group_names)}) average the tasks of a group; “Mean of groups” averages the "
            f"{len(group_names)} group means (the “Mean” of the ARC/RepAdapter papers); “Mean of "
            f"{len(suite.tasks)} tasks” averages all tasks. A mean is computed only when every task it "
            "covers is present."
        ))
    else:
        notes.append(Note(f"“Mean of {len(suite.tasks)} tasks” averages all tasks of the suite; it is "
                          "computed only when every task is present."))
    incomplete = [r.label for r in report.accuracy_rows
                  if any(not r.value(c.key).present for c in report.columns if c.kind != "task")]
    if incomplete:
        notes.append(Note(f"–: no value; in a mean column, not every task of the group (suite) is present "
                          f"for that row ({_rows_text(incomplete)})."))

    # protocols
    protocols: dict[str, list[str]] = defaultdict(list)
    descriptions: dict[str, str] = {}
    for r in ok:
        p = str(r.get("protocol") or _dig(r, "config", "protocol") or "?")
        protocols[p].append(row_label[id(r)])
        if r.get("protocol_description"):
            descriptions.setdefault(p, str(r["protocol_description"]))
    for p in sorted(protocols, key=lambda x: (x in TEST_SELECTED, x)):
        desc = descriptions.get(p, "")
        rows_txt = f" (rows: {_rows_text(protocols[p])})" if len(protocols) > 1 else ""
        if p in TEST_SELECTED:
            origin = "the official ARC/RepAdapter scripts" if p == LEGACY else "each method's official script"
            notes.append(Note(
                f"Protocol {p}: {desc or 'best test accuracy over epochs'}{rows_txt}. The epoch is selected on the "
                f"TEST set, as in {origin}; these rows are not ranked against the others.",
                DAGGER))
        else:
            notes.append(Note(f"Protocol {p}: {desc or 'see the run records'}{rows_txt}."))

    # normalisation
    norms: dict[str, list[str]] = defaultdict(list)
    for r in ok:
        n = _dig(r, "config", "normalization")
        if isinstance(n, Mapping):
            text = str(n.get("name") or "custom")
            if n.get("mean") is not None and n.get("std") is not None:
                text += f" (mean {_fmt_value(n['mean'])}; std {_fmt_value(n['std'])})"
        else:
            text = "not recorded"
        norms[text].append(row_label[id(r)])
    if len(norms) == 1:
        notes.append(Note(f"Input normalisation: {next(iter(norms))}."))
    elif norms:
        parts = "; ".join(f"{k} for {_rows_text(v)}" for k, v in sorted(norms.items()))
        notes.append(Note(f"Input normalisation DIFFERS between runs: {parts}."))

    # backbone and weights
    backbones: dict[str, list[str]] = defaultdict(list)
    for r in ok:
        backbones["; ".join(backbone_of(r)[1:])].append(row_label[id(r)])
    if len(backbones) == 1:
        notes.append(Note(f"Backbone: {next(iter(backbones))}."))
    elif backbones:
        parts = "; ".join(f"[{k}] for {_rows_text(v)}" for k, v in sorted(backbones.items()))
        notes.append(Note(f"Backbone or weights DIFFER between runs: {parts}."))

    # data fingerprints
    prints: dict[tuple[str, str], dict[str, None]] = defaultdict(dict)
    for r in ok:
        fp = _dig(r, "provenance", "data_fingerprint")
        if isinstance(fp, Mapping):
            for split, value in fp.items():
                if value:
                    prints[(r["task"], str(split))][str(value)] = None
    mixed = {k: list(v) for k, v in prints.items() if len(v) > 1}
    if mixed:
        for col in report.columns:
            if any(task == col.key for task, _s in mixed):
                col.mark = DDAGGER
        parts = "; ".join(f"{t}/{s} has {len(v)} fingerprints ({', '.join(x[:8] for x in sorted(v))})"
                          for (t, s), v in sorted(mixed.items()))
        notes.append(Note(f"The data DIFFER between runs of a task (different data fingerprints): {parts}. "
                          "Numbers in these columns are not comparable across rows.", DDAGGER))

    # subsets of the protocol's data
    limits: dict[str, list[str]] = defaultdict(list)
    for r in ok:
        train = _dig(r, "config", "train")
        if isinstance(train, Mapping):
            parts = [f"{k}={train[k]}" for k in ("limit_train", "limit_eval") if train.get(k)]
            if parts:
                limits[", ".join(parts)].append(row_label[id(r)])
    for text, rows in sorted(limits.items()):
        notes.append(Note(f"Subset runs ({text}): not the full protocol's data, for {_rows_text(rows)}."))

    # execution settings that differ within a cell (any other setting splits the row: _assign_rows)
    differing: dict[tuple[str, str], set[str]] = defaultdict(set)
    by_cell: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in ok:
        by_cell[(row_label[id(r)], r["task"])].append(r)
    for cell, rs in by_cell.items():
        trains = [_dig(r, "config", "train") or {} for r in rs]
        differing[cell] = {k for k in EXECUTION_KEYS if len({repr(t.get(k)) for t in trains}) > 1}
    parts = [f"{row}/{task} ({', '.join(sorted(keys))})" for (row, task), keys in sorted(differing.items()) if keys]
    if parts:
        notes.append(Note(f"Some cells average runs that differ only in execution settings (how fast a run goes, "
                          f"not what it trains): {_join(parts)}."))

    # seeds
    uneven = [r.label for r in report.rows if r.n_min != r.n_max]
    if uneven:
        notes.append(Note(f"The number of seeds differs between tasks for {_rows_text(uneven)}; cells with fewer "
                          "seeds than their row's maximum show (n=…)."))

    # failures and skipped files
    if len(failed):
        items = [f"{labels[f.row]}/{f.task} seed {f.seed}" for _, f in failed.sort_values(["task", "seed"]).iterrows()]
        errors = []
        for r in recs:
            if r["status"] == "failed":
                err = r.get("error") if isinstance(r.get("error"), Mapping) else {}
                errors.append(str(err.get("type") or "error"))
        kinds = ", ".join(f"{k} ×{errors.count(k)}" for k in sorted(set(errors)))
        notes.append(Note(f"{len(failed)} failed run(s) are not included ({kinds}): {_join(items)}."))
    if report.n_skipped:
        notes.append(Note(f"{report.n_skipped} file(s) were skipped as unreadable or of another record schema "
                          "(see the warnings)."))
    return notes


def _published_notes(report: Report, delta: bool) -> list[Note]:
    notes: list[Note] = []
    if report.published:
        notes.append(Note(
            f"(published): reference set ‘{report.reference}’, numbers as printed by the papers below; group and "
            "overall means of these rows are computed here from the per-task values (rounding may move them by "
            "about 0.02); Params (M) as printed (normally including the head)."))
        by_source: dict[str, list[str]] = defaultdict(list)
        by_prov: dict[str, list[str]] = defaultdict(list)
        for row in report.published:
            pm = row.published
            by_source["; ".join(pm.sources) or "source not stated"].append(pm.name)
            by_prov[" / ".join(pm.provenance) or "not stated"].append(pm.name)
        notes.append(Note("Published numbers first reported by: " + "; ".join(
            f"{k} for {', '.join(v)}" for k, v in by_source.items()) + "."))
        notes.append(Note("Where they were copied from: " + "; ".join(
            f"{', '.join(v)}: {k}" for k, v in by_prov.items()) + "."))
        unverified = [r.published.name for r in report.published if r.published.unverified]
        if unverified:
            notes.append(Note(f"UNVERIFIED published numbers: {_join(unverified)}; check them against the paper "
                              "before citing."))
    if delta:
        if report.deltas:
            notes.append(Note("Δ rows: reproduced minus published accuracy (points) for configurations that declare "
                              "the published row they reproduce (Method.published); – where either number is missing."))
    return notes


def _efficiency_notes(report: Report, recs: list[dict[str, Any]]) -> list[Note]:
    devices = sorted({str(_dig(r, "provenance", "device") or "unknown device") for r in recs if r["status"] == "ok"})
    notes = [
        Note("Params: trainable parameters (M) averaged over tasks, with and without the classification head; "
             "extra after merge: parameters the deployed model has beyond the backbone once mergeable modules are "
             "folded in; storage: bytes of trainable state saved per task."),
        Note("Train time: wall-clock training time per run, averaged over the row's runs; ± is the standard "
             "deviation between seeds of one task, pooled over tasks (none with one seed; tasks of different sizes "
             "are not noise), so a difference between rows smaller than it is noise. Images/s: training "
             "throughput; peak memory: largest peak GPU memory allocated (– on CPU); latency: batch-1 inference "
             "latency of the deployed model relative to the plain backbone, timed with each run (– when not "
             "measured); ± is the larger of its standard deviation over runs and the timer's own spread."),
    ]
    rows = [r for r in report.rows if r.efficiency is not None and r.efficiency.runs]
    plain = [r.label for r in rows if r.efficiency.deploys_plain]
    if plain:
        notes.append(Note(f"= backbone ({_rows_text(plain)}): deployed merged, which is the plain backbone with a "
                          "new head by construction (petlbench.merge; nothing extra after merge), so its latency "
                          "IS the backbone's; a timed ratio of two identical architectures would only show noise."))
    unmeasured = [f"{r.label} ({what})" for r in rows for what, ok in (
        ("train time", r.efficiency.train_time_measurable),
        ("latency", r.efficiency.latency_measurable or r.efficiency.deploys_plain)) if not ok]
    if unmeasured:
        notes.append(Note(f"n.m.: not measurable here, the spread is larger than the effect (a train time whose ± "
                          f"exceeds it; a latency ratio whose ± exceeds its distance from 1×): {_join(unmeasured)}. "
                          "Measure on a quiet machine or with more seeds."))
    conc: dict[str, list[str]] = defaultdict(list)
    for row in report.rows:
        if row.efficiency is not None:
            for text in row.efficiency.concurrency:
                conc[text].append(row.label)
    if set(conc) == {"concurrency not recorded"}:
        notes.append(Note("Under which concurrency (runs sharing the machine) the train times were measured was "
                          "not recorded for these runs."))
    elif len(conc) == 1:
        notes.append(Note(f"Train times were measured with {next(iter(conc))}."))
    elif conc:
        parts = "; ".join(f"{k} for {_rows_text(v)}" for k, v in sorted(conc.items()))
        notes.append(Note(f"Train times were measured under DIFFERENT concurrency ({parts}); they are not "
                          "comparable across these rows."))
    if len(devices) == 1:
        notes.append(Note(f"Device: {devices[0]}."))
    elif devices:
        notes.append(Note(f"Runs were made on DIFFERENT devices ({', '.join(devices)}); costs are not comparable "
                          "across rows."))
    return notes
