"""Grouping run records into table rows: what identifies a configuration (method, protocol,
backbone and weights, method code, every resolved setting and the data), how rows are labelled, and
the per-run views (a data frame for the statistics, a flat dict for the long CSV).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from petlbench.protocols import TEST_SELECTED
from petlbench.report.loading import record_source
from petlbench.report.table import (
    DAGGER,
    EXECUTION_KEYS,
    LEGACY,
    TUNED_KEYS,
    _dig,
    _fmt_value,
    _join,
    _method_sort_key,
    _num,
    _short_weights,
)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def method_code_of(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The identity part of the record's method code (distribution and version), None when not recorded."""
    code = _dig(record, "config", "method_code") or _dig(record, "identity", "method_code")
    if not isinstance(code, Mapping) or not code:
        return None
    keys = ("distribution", "version") if code.get("distribution") else ("module", "source_sha256")
    return {k: code.get(k) for k in keys}


def code_text(code: Mapping[str, Any] | None) -> str:
    if not code:
        return "code version not recorded"
    if code.get("distribution"):
        return f"{code['distribution']} {code.get('version')}"
    return f"{code.get('module')} source {str(code.get('source_sha256'))[:8]}"


def backbone_of(record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(key, architecture with its arguments, weights) of the backbone a record ran on."""
    arch = str(_dig(record, "config", "backbone") or "unknown backbone")
    kwargs = _dig(record, "config", "backbone_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {}
    if kwargs:
        arch_text = arch + " (" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(kwargs.items())) + ")"
    else:
        arch_text = arch
    sha = _dig(record, "provenance", "weights_sha256")
    src = _dig(record, "provenance", "weights_source") or _dig(record, "config", "pretrained")
    if sha or src:
        weights = f"weights {_short_weights(src) if src else 'unnamed'}"
        weights += f", SHA-256 {str(sha)[:12]}…" if sha else ", SHA-256 not recorded"
    else:
        weights = "random initialisation (no pre-trained weights)"
    key = _canon([arch, kwargs, str(sha) if sha else (str(src) if src else None)])
    return key, arch_text, weights


def _data_key(record: Mapping[str, Any]) -> str | None:
    fp = _dig(record, "provenance", "data_fingerprint")
    if not isinstance(fp, Mapping) or not fp:
        return None
    return hashlib.sha256(_canon({str(k): str(v) for k, v in fp.items()}).encode()).hexdigest()[:8]


def _config_view(record: Mapping[str, Any]) -> dict[str, str]:
    """The resolved configuration of one run, key by key (method hyperparameters, training settings
    and the data it saw), in the form runs of one cell must agree on."""
    view: dict[str, str] = {}
    hparams = _dig(record, "config", "method_hparams")
    if isinstance(hparams, Mapping):
        view.update({f"hp:{k}": _canon(v) for k, v in hparams.items()})
    train = _dig(record, "config", "train")
    if isinstance(train, Mapping):
        selection = _dig(record, "metrics", "selection")
        tuned = record.get("protocol") == "tune" or selection == "tune"  # paper: a grid
        skip = set(EXECUTION_KEYS) | (set(TUNED_KEYS) if tuned else set())
        if selection in ("final", "tune"):  # the final epoch is reported: the cadence only adds a learning curve
            skip.add("eval_every")
        view.update({f"train:{k}": _canon(v) for k, v in train.items() if k not in skip})
    resolved = _dig(record, "efficiency", "precision")
    if isinstance(resolved, Mapping) and "autocast" in resolved:
        # What ran, not what was asked: precision=auto is bf16 on one machine and fp32 on another.
        arith = str(resolved.get("autocast") or ("fp32+tf32" if resolved.get("tf32") else "fp32"))
        view["train:precision"] = _canon(arith)
    data = _data_key(record)
    if data is not None:
        view["data"] = data
    return view


def _view_text(key: str, value: str | None) -> str:
    if key == "data":
        return f"data {value}" if value else "data not fingerprinted"
    name = key.split(":", 1)[1]
    if value is None:
        return f"{name} unset"
    try:
        parsed = json.loads(value)
    except ValueError:
        return f"{name}={value}"
    return f"{name} unset" if parsed is None else f"{name}={_fmt_value(parsed)}"


@dataclass(frozen=True)
class _RowKey:
    method: str
    protocol: str
    backbone: str
    code: str
    variant: tuple
    label: str
    display: str


def display_name(record: Mapping[str, Any], names: str = "display") -> str:
    """How tables name a record's method: the registered class's ``display_name``, else the one
    recorded with the run, else the registry name (always the registry name with ``names="registry"``)."""
    method = str(record["method"])
    if names == "registry":
        return method
    try:
        from petlbench.registry import get_method

        shown = get_method(method).display_name
        if shown:
            return shown
    except Exception:  # a plugin that is not installed here (or fails to import): use what the record says
        pass
    recorded = _dig(record, "provenance", "method_code", "display_name")
    return str(recorded) if recorded else method


def _assign_rows(records: list[dict[str, Any]], names: str = "display"
                 ) -> tuple[dict[int, str], dict[str, _RowKey], list[str]]:
    """Row id of every record, what each row id stands for, and notes about split rows.

    A row is one configuration: runs are grouped by method, protocol, backbone and weights, and
    method code version, and then split further wherever runs of one task differ in any resolved
    hyperparameter, training setting or data fingerprint (a 2-epoch smoke run among 100-epoch runs
    becomes a row of its own; it never stands in for a seed). Values that differ only between
    tasks (per-task presets) keep one row.
    """
    ok = [r for r in records if r["status"] == "ok"]
    views = {id(r): _config_view(r) for r in records}
    displays: dict[str, str] = {}
    for r in records:
        displays.setdefault(r["method"], display_name(r, names))

    def base(r: Mapping[str, Any]) -> tuple[str, str, str, str]:
        return (r["method"], str(r.get("protocol") or "?"), backbone_of(r)[0], _canon(method_code_of(r)))

    split_keys: dict[tuple, set[str]] = defaultdict(set)
    cells: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        cells[(base(r), r["task"])].append(r)
    for (b, _task), rs in cells.items():
        for k in set().union(*(views[id(r)] for r in rs)):
            if len({views[id(r)].get(k) for r in rs}) > 1:
                split_keys[b].add(k)

    # A failed run that recorded its configuration (the engine's records do; a launcher's crash
    # record does not) and matches no ok run of its cell is its own row too: a failed smoke run
    # must not be counted as a failed seed of the real runs.
    for r in records:
        if r["status"] == "ok" or not _dig(r, "config", "train"):
            continue
        rs = cells.get((base(r), r["task"]), [])
        mine = views[id(r)]  # compared on what it recorded: a failed run has no data fingerprint yet
        diffs = [{k for k in mine if mine[k] != views[id(o)].get(k)} for o in rs]
        if diffs and all(diffs):
            split_keys[base(r)] |= diffs[0]

    def key_of(r: Mapping[str, Any]) -> tuple:
        b = base(r)
        return (*b, tuple((k, views[id(r)].get(k)) for k in sorted(split_keys.get(b, ()))))

    key_of_record: dict[int, tuple] = {}
    known: dict[tuple, None] = {}
    for r in ok:
        key_of_record[id(r)] = key = key_of(r)
        known[key] = None
    for r in records:
        if r["status"] == "ok":
            continue
        key = key_of(r)
        if key not in known and not _dig(r, "config", "train"):  # a crash record without its configuration
            same = [k for k in known if k[:4] == key[:4]] or [k for k in known if k[:2] == key[:2]]
            key = same[0] if same else key
        key_of_record[id(r)] = key
        known[key] = None

    protocols: dict[str, set[str]] = defaultdict(set)
    codes: dict[tuple, set[str]] = defaultdict(set)
    blocks = {k[2] for k in known}
    for method, protocol, bkey, code, _v in known:
        if protocol not in TEST_SELECTED:
            protocols[method].add(protocol)
        codes[(method, bkey)].add(code)
    arch_of = _block_names(records)
    ordered = sorted(known, key=lambda k: (_method_sort_key(k[0]), k[1] in TEST_SELECTED, k[1], k[2], k[3], repr(k[4])))
    meta: dict[str, _RowKey] = {}
    rid_of: dict[tuple, str] = {}
    for i, key in enumerate(ordered):
        method, protocol, bkey, code, var = key
        parts = [_view_text(k, v) for k, v in var]
        if len(codes[(method, bkey)]) > 1:
            parts.append(code_text(json.loads(code)))
        if len(blocks) > 1:
            parts.append(arch_of.get(bkey, "?"))
        label = displays[method] + (" (" + ", ".join(parts) + ")" if parts else "")
        if protocol not in TEST_SELECTED and len(protocols[method]) > 1:
            label += f" [{protocol}]"
        if protocol in TEST_SELECTED:
            label += DAGGER if protocol == LEGACY else f" [{protocol}]{DAGGER}"
        rid_of[key] = f"r{i:04d}"
        meta[rid_of[key]] = _RowKey(method, protocol, bkey, code, var, label, displays[method])
    seen: dict[str, int] = defaultdict(int)
    for rid, m in meta.items():  # labels name rows in notes and plots: they must be unique
        seen[m.label] += 1
        if seen[m.label] > 1:
            meta[rid] = _RowKey(m.method, m.protocol, m.backbone, m.code, m.variant, f"{m.label} #{seen[m.label]}",
                                m.display)
    notes = []
    for b, keys in sorted(split_keys.items()):
        rows = [m.label for m in meta.values() if (m.method, m.protocol, m.backbone, m.code) == b]
        shown = ", ".join(sorted(_view_text(k, None).split("=")[0].replace(" unset", "") for k in keys))
        notes.append(f"{displays[b[0]]}: runs of one task differ in {shown}; they are shown as separate rows "
                     f"({_join(rows)}), never averaged together. Select one with --where.")
    return {i: rid_of[k] for i, k in key_of_record.items()}, meta, notes


def _block_names(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """A short name per backbone block for row labels: the architecture (with its arguments), plus
    the weights (file or tag, and SHA-256 prefix) where two blocks share an architecture."""
    arch: dict[str, str] = {}
    tag: dict[str, str] = {}
    for r in records:
        key, a, _w = backbone_of(r)
        arch[key] = a
        sha = _dig(r, "provenance", "weights_sha256")
        src = _dig(r, "provenance", "weights_source") or _dig(r, "config", "pretrained")
        if sha or src:
            tag[key] = " ".join(x for x in (_short_weights(src) if src else "", str(sha)[:8] if sha else "") if x)
        else:
            tag[key] = "random init"
    counts: dict[str, int] = defaultdict(int)
    for a in arch.values():
        counts[a] += 1
    return {key: (f"{a}, {tag[key]}" if counts[a] > 1 else a) for key, a in arch.items()}


def _frame(records: list[dict[str, Any]], row_of: Mapping[int, str]) -> pd.DataFrame:
    rows = []
    for r in records:
        rows.append({
            "row": row_of[id(r)],
            "task": r["task"],
            "seed": r.get("seed"),
            "status": r["status"],
            "top1": _num(_dig(r, "metrics", "top1")),
            "trainable": _num(_dig(r, "params", "trainable")),
            "trainable_no_head": _num(_dig(r, "params", "trainable_without_head")),
            "extra_after_merge": _num(_dig(r, "params", "extra_after_merge")),
            "storage": _num(_dig(r, "efficiency", "trainable_state_bytes")),
            "train_time_s": _num(_dig(r, "efficiency", "train_time_s")),
            "images_per_s": _num(_dig(r, "efficiency", "train_images_per_s")),
            "peak_mem": _num(_dig(r, "efficiency", "peak_gpu_mem_allocated")),
            "latency_ratio": _num(_dig(r, "efficiency", "latency_ratio")),
            "latency_spread": _num(_dig(r, "efficiency", "latency_ratio_spread")),
            "deployed": str(_dig(r, "efficiency", "deployed") or ""),
            "concurrency": _concurrency_text(_dig(r, "efficiency", "concurrency")),
            "end_time": str(_dig(r, "provenance", "end_time") or ""),
            "source": record_source(r),
            "idx": len(rows),
        })
    return pd.DataFrame(rows)


def _concurrency_text(conc: Any) -> str:
    """"1 run at a time, 4 threads": under which load a run's train time was measured."""
    if not isinstance(conc, Mapping):
        return "concurrency not recorded"
    n = conc.get("parallel_runs")
    threads = conc.get("torch_threads")
    text = "concurrency not recorded" if not isinstance(n, int) else \
        ("1 run at a time" if n == 1 else f"{n} runs in parallel")
    if isinstance(threads, int):
        text += f", {threads} thread{'' if threads == 1 else 's'}"
    return text


def _run_view(r: Mapping[str, Any], row: str, display: str, task_label: Mapping[str, str]) -> dict[str, Any]:
    """One run as a flat dict, for the long CSV (``--format csv --long``)."""
    code = method_code_of(r) or {}
    conc = _dig(r, "efficiency", "concurrency") or {}
    bkey, arch, weights = backbone_of(r)
    return {
        "row": row, "suite": r["suite"], "task": r["task"], "task_display": task_label.get(r["task"], r["task"]),
        "method": r["method"], "method_display": display, "seed": r.get("seed"), "status": r["status"],
        "protocol": r.get("protocol"), "top1": _num(_dig(r, "metrics", "top1")),
        "top1_final": _num(_dig(r, "metrics", "top1_final")), "selected_epoch": _dig(r, "metrics", "selected_epoch"),
        "trainable": _dig(r, "params", "trainable"), "trainable_without_head": _dig(r, "params", "trainable_without_head"),
        "extra_after_merge": _dig(r, "params", "extra_after_merge"),
        "train_time_s": _num(_dig(r, "efficiency", "train_time_s")),
        "parallel_runs": conc.get("parallel_runs") if isinstance(conc, Mapping) else None,
        "latency_ratio": _num(_dig(r, "efficiency", "latency_ratio")),
        "backbone": arch, "weights": weights, "method_code": code_text(code) if code else "",
        "method_hparams": _canon(_dig(r, "config", "method_hparams") or {}),
        "train": _canon(_dig(r, "config", "train") or {}), "data": _data_key(r) or "",
        "device": _dig(r, "provenance", "device"), "end_time": _dig(r, "provenance", "end_time"),
        "error": (_dig(r, "error", "type") or "") if r["status"] != "ok" else "",
        "run_id": r.get("run_id"), "source": record_source(r),
    }
