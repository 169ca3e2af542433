"""Aggregate run records into a methods x tasks report (numbers only; rendering is elsewhere).

One :class:`Report` feeds every output format, so LaTeX, HTML, Markdown and CSV always show the
same numbers, marks and footnotes. Rules that papers get wrong and that are enforced here:

- only ``status == "ok"`` records are averaged; failed runs are counted and footnoted;
- a group mean or overall mean exists only when every task of the group (suite) is present;
- VTAB's two overall means are both given and labelled: "Mean of groups" (mean of the Natural,
  Specialized and Structured means, the ARC/RepAdapter papers' "Mean") and "Mean of 19 tasks";
- runs selected on the test set (``legacy-best-test``) get their own rows, marked with a dagger,
  and mixed data fingerprints, weights or normalisations are footnoted, never hidden.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from petlbench.errors import PetlbenchError
from petlbench.report.formats import ORDERS
from petlbench.report.loading import record_problem, record_source, warn
from petlbench.runner import TEST_SELECTED

DIGITS = 1  # decimals of accuracies in tables; best/second are decided on the printed values
LEGACY = "legacy-best-test"
DAGGER = "†"
DDAGGER = "‡"
#: Training settings that the ``tune`` protocol chooses per run (so they may differ between seeds).
TUNED_KEYS = ("lr", "weight_decay")
#: Built-in methods in the order papers list them; anything else follows alphabetically.
METHOD_ORDER = ("full", "linear", "bitfit", "vpt_shallow", "vpt_deep", "adapter", "lora", "ssf",
                "repadapter", "arc_att", "arc")
#: Training settings that change how fast a run goes, not what it trains: they never split a row.
EXECUTION_KEYS = ("compile", "eval_batch_size")
MAX_LISTED = 6  # failed runs etc. listed by name in a footnote before "and N more"


@dataclass
class Stat:
    """One table cell: mean and sample std over seeds, or a derived mean (std None)."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    values: tuple[float, ...] = ()
    failed: int = 0
    rank: int | None = None  # 1 = best in its column, 2 = second best

    @property
    def present(self) -> bool:
        return self.mean is not None


@dataclass
class Column:
    """An accuracy column: a task, a group mean or an overall mean."""

    key: str
    label: str
    kind: str  # "task" | "group" | "mean"
    group: str | None = None
    mark: str = ""  # e.g. the double dagger of a task whose data differ between runs


@dataclass
class Efficiency:
    """Cost of one row, averaged over its ok runs (None where no run recorded the field)."""

    trainable_m: float | None = None
    trainable_no_head_m: float | None = None
    extra_after_merge_m: float | None = None
    storage_bytes: float | None = None
    train_time_s: float | None = None
    images_per_s: float | None = None
    peak_mem_bytes: float | None = None
    latency_ratio: float | None = None
    train_time_std: float | None = None  # sample std over the row's runs (None for one run)
    latency_ratio_std: float | None = None
    concurrency: tuple[str, ...] = ()  # how many runs shared the machine while these trained
    runs: int = 0


@dataclass
class Row:
    """One table row: a reproduced method (configuration, protocol), a published method or a delta."""

    key: str
    label: str
    method: str
    kind: str  # "reproduced" | "published" | "delta"
    protocol: str | None = None
    legacy: bool = False
    values: dict[str, Stat] = field(default_factory=dict)
    params_m: float | None = None
    params_no_head_m: float | None = None
    n_min: int = 0
    n_max: int = 0
    failed: int = 0
    efficiency: Efficiency | None = None
    published: Any = None  # PublishedMethod for published rows
    compared_to: str | None = None  # delta rows: the published row's label
    display: str = ""  # the method's display name ("LoRA"), without the row's configuration
    block: str = ""  # backbone and weights: rows of different blocks are never ranked together
    params_by_task: dict[str, float] = field(default_factory=dict)  # trainable params (M) per task

    def value(self, key: str) -> Stat:
        return self.values.get(key) or Stat()

    @property
    def seeds_text(self) -> str:
        if self.kind != "reproduced" or self.n_max == 0:
            return "–"
        return str(self.n_max) if self.n_min == self.n_max else f"{self.n_min}–{self.n_max}"


@dataclass
class Note:
    """A footnote; ``mark`` is the symbol used in the table (empty for plain notes)."""

    text: str
    mark: str = ""


@dataclass
class Report:
    """Everything a renderer needs, format-independent."""

    suite: str
    suite_title: str
    columns: list[Column]
    groups: dict[str, list[str]]  # shown group -> shown task columns
    rows: list[Row]
    published: list[Row] = field(default_factory=list)
    deltas: list[Row] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    efficiency_notes: list[Note] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_ok: int = 0
    n_failed: int = 0
    n_skipped: int = 0
    reference: str | None = None
    headline_key: str | None = None  # the column plots use as "the" accuracy
    blocks: list[str] = field(default_factory=list)  # backbone blocks of the reproduced rows, in order
    runs: list[dict[str, Any]] = field(default_factory=list)  # one flat dict per reported run (long CSV)

    @property
    def task_columns(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "task"]

    @property
    def accuracy_rows(self) -> list[Row]:
        return [*self.published, *self.rows]


# ---------------------------------------------------------------------------- helpers


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _dig(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _join(names: Iterable[str], limit: int = MAX_LISTED) -> str:
    names = list(dict.fromkeys(names))
    if len(names) > limit:
        return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
    return ", ".join(names)


def _short_weights(source: Any) -> str:
    """A weights tag as given, a weights file by its name (a full path says nothing in a paper)."""
    text = str(source)
    return os.path.basename(text) if ("/" in text or os.sep in text) else text


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value)
    return str(value)


def _method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method.lower())


# ---------------------------------------------------------------------------- suite


def resolve_suite(records: Sequence[Mapping[str, Any]], suite: Any,
                  on_warning: Callable[[str], None]) -> tuple[Any, list[dict[str, Any]]]:
    """The suite to report and the records that belong to it (canonical task names filled in)."""
    from petlbench.data import get_suite
    from petlbench.data.suites import name_key

    if suite is not None:
        the_suite = get_suite(suite)
        keys = {name_key(n) for n in (the_suite.name, *the_suite.aliases)}
        mine = [r for r in records if name_key(str(r["suite"])) in keys]
        others = sorted({str(r["suite"]) for r in records} - {str(r["suite"]) for r in mine})
        if not mine:
            raise PetlbenchError(
                f"none of the {len(records)} record(s) is of suite {the_suite.name!r} (they are of suite "
                f"{', '.join(others)}). Fix: pass --suite {others[0]} or point --results elsewhere."
            )
        if others:
            on_warning(f"leaving out {len(records) - len(mine)} record(s) of suite {', '.join(others)} "
                       f"(reporting --suite {the_suite.name})")
    else:
        by_suite: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        resolved: dict[str, Any] = {}
        for name in dict.fromkeys(str(r["suite"]) for r in records):
            try:
                resolved[name] = get_suite(name)
            except PetlbenchError:
                raise PetlbenchError(
                    f"records are of suite {name!r}, which is not registered here. Fix: pass --suite with the "
                    "suite's YAML file (or install the package that defines it)."
                ) from None
        for r in records:
            by_suite[resolved[str(r["suite"])].name].append(r)
        if len(by_suite) > 1:
            counts = ", ".join(f"{n} ({len(v)} record{'' if len(v) == 1 else 's'})" for n, v in sorted(by_suite.items()))
            raise PetlbenchError(
                f"the records mix suites {counts}. Fix: pass --suite NAME to report one of them."
            )
        the_suite = resolved[str(records[0]["suite"])]
        mine = list(records)
    out = []
    for r in mine:
        try:
            task = the_suite.resolve_task(str(r["task"])).name
        except PetlbenchError:
            raise PetlbenchError(
                f"record {record_source(r)} is of task {r['task']!r}, which suite {the_suite.name!r} "
                f"({the_suite.path or 'built-in'}) does not define. Fix: pass --suite with the suite "
                "definition these runs used, or move the record out of the results folder."
            ) from None
        out.append({**r, "task": task})
    return the_suite, out


# ---------------------------------------------------------------------------- rows


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
        tuned = record.get("protocol") == "tune" or _dig(record, "metrics", "selection") == "tune"  # paper: a grid
        skip = set(EXECUTION_KEYS) | (set(TUNED_KEYS) if tuned else set())
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


def _strip_repr(value: Any) -> str:
    text = "–" if value is None else str(value)
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "'" else text


# ---------------------------------------------------------------------------- --where


def _lookup(record: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """The value ``key`` names in a record: a dotted path, a top-level field, a method
    hyperparameter, a training setting, a config field or a provenance field (in that order)."""
    if "." in key:
        node: Any = record
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return False, None
            node = node[part]
        return True, node
    for where in ((), ("config", "method_hparams"), ("config", "train"), ("config",), ("provenance",),
                  ("efficiency",), ("metrics",)):
        node = _dig(record, *where) if where else record
        if isinstance(node, Mapping) and key in node:
            return True, node[key]
    return False, None


def _matches(value: Any, wanted: str) -> bool:
    import yaml

    if isinstance(value, str):
        return value == wanted
    try:
        parsed = float(wanted) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else yaml.safe_load(wanted)
    except ValueError:
        return False
    except yaml.YAMLError:
        return str(value) == wanted
    if isinstance(value, bool) or isinstance(parsed, bool):
        return value is parsed or str(value).lower() == wanted.lower()
    if isinstance(value, (int, float)) and isinstance(parsed, (int, float)):
        return math.isclose(float(value), float(parsed), rel_tol=1e-9, abs_tol=1e-12)
    if value is None:
        return wanted.lower() in ("none", "null", "")
    return value == parsed or str(value) == wanted


def filter_where(records: Sequence[dict[str, Any]], where: Sequence[str]) -> list[dict[str, Any]]:
    """Keep the records that satisfy every ``key=value`` (or ``key!=value``) of ``where``.

    ``value`` may list alternatives, comma-separated (``method=lora,arc``); numbers compare as
    numbers (``lr=1e-3`` matches 0.001). Raises PetlbenchError for a key no record has, or when
    nothing is left (naming the values that are there).
    """
    out = list(records)
    for clause in where:
        key, op, wanted = clause.partition("!=") if "!=" in clause else clause.partition("=")
        key = key.strip()
        if not op or not key:
            raise PetlbenchError(f"--where {clause!r} is not key=value. Fix: e.g. --where epochs=100 "
                                 "or --where method!=linear")
        alternatives = [w.strip() for w in wanted.split(",")] if wanted.strip() else [""]
        found = [(r, *_lookup(r, key)) for r in out]
        if not any(has for _r, has, _v in found):
            raise PetlbenchError(
                f"--where {clause!r}: no record has a field {key!r}. Fix: use a record field (method, task, seed, "
                "protocol), a method hyperparameter or training setting (rank, epochs, lr), or a dotted path "
                "(config.train.epochs, provenance.method_code.version)."
            )
        keep = []
        for r, has, value in found:
            hit = has and any(_matches(value, w) for w in alternatives)
            if hit != (op == "!="):
                keep.append(r)
        if not keep:
            values = sorted({_fmt_value(v) for _r, has, v in found if has})
            raise PetlbenchError(f"--where {clause!r} leaves no record ({key} is {', '.join(values[:10])} in the "
                                 "records). Fix: pick one of these values.")
        out = keep
    return out


def _parse_names(names: str) -> str:
    if names not in ("display", "registry"):
        raise PetlbenchError(f"--names {names!r} is not one of display, registry.")
    return names


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


def _series_mean(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.mean()) if len(s) else None


# ---------------------------------------------------------------------------- main entry


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
    ok = df[df.status == "ok"].sort_values(["end_time", "idx"])
    dup = ok.duplicated(["row", "task", "seed"], keep="last")
    notes: list[Note] = []
    if dup.any():
        for _, d in ok[dup].iterrows():
            say(f"duplicate run of {labels[d.row]} on {d.task} seed {d.seed} (same configuration): using the newest "
                f"record, not {d.source}")
        notes.append(Note(f"{int(dup.sum())} duplicate run(s) (same configuration, task and seed) were left out; "
                          "the newest record of each was used."))
        ok = ok[~dup]
    failed = df[df.status == "failed"]

    # ------------------------------------------------------------------ columns
    shown_tasks = set(df.task)
    published_methods: list[Any] = []
    ref_label = None
    if reference is not None:
        published_methods, ref_label = _published(reference, the_suite, say)
        for pm in published_methods:
            shown_tasks |= set(pm.accuracy)
    multi = len(the_suite.groups) > 1
    task_label = {t.name: (t.name if names == "registry" else getattr(t, "label", t.name)) for t in the_suite.tasks}
    columns: list[Column] = []
    groups: dict[str, list[str]] = {}
    for group, tasks in the_suite.groups.items():
        shown = [t for t in tasks if t in shown_tasks]
        if shown:
            groups[group] = shown
            columns += [Column(t, task_label.get(t, t), "task", group) for t in shown]
    if multi:
        columns += [Column(f"group:{g}", g, "group") for g in groups]
        columns.append(Column("mean:groups", "Mean of groups", "mean"))
    n_tasks = len(the_suite.tasks)
    columns.append(Column("mean:tasks", f"Mean of {n_tasks} tasks", "mean"))
    headline = "mean:groups" if multi else "mean:tasks"

    # ------------------------------------------------------------------ reproduced rows
    stats = ok.groupby(["row", "task"])["top1"].agg(["mean", "std", "count", list])
    fails = failed.groupby(["row", "task"]).size()
    block_text = {backbone_of(r)[0]: "; ".join(backbone_of(r)[1:]) for r in recs}
    rows: list[Row] = []
    for key, m in meta.items():
        row = Row(key=m.label, label=m.label, method=m.method, kind="reproduced", protocol=m.protocol,
                  legacy=m.protocol in TEST_SELECTED, display=m.display, block=block_text.get(m.backbone, ""))
        for task in the_suite.task_names:
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
        _add_means(row, the_suite, multi)
        mine = ok[ok.row == key]
        per_task = mine.groupby("task")[["trainable", "trainable_no_head"]].mean()
        row.params_by_task = {str(t): float(v) / 1e6 for t, v in per_task["trainable"].dropna().items()}
        tr = _series_mean(per_task["trainable"])
        nh = _series_mean(per_task["trainable_no_head"])
        row.params_m = None if tr is None else tr / 1e6
        row.params_no_head_m = None if nh is None else nh / 1e6
        row.efficiency = _efficiency(mine, row)
        rows.append(row)
    given = [*(methods or ()), *METHOD_ORDER]
    rows = _order_rows(rows, order, headline, given)

    # ------------------------------------------------------------------ published rows and deltas
    published: list[Row] = []
    for pm in published_methods:
        label = f"{pm.name} (published{', unverified' if pm.unverified else ''})"
        row = Row(key=f"published:{pm.name}", label=label, method=pm.ours or pm.name, kind="published",
                  params_m=pm.params_m, published=pm, display=pm.name)
        for task, acc in pm.accuracy.items():
            row.values[task] = Stat(mean=acc, n=1, values=(acc,))
        _add_means(row, the_suite, multi)
        published.append(row)
    if order != "given":
        published = _order_rows(published, order, headline, given)
    deltas: list[Row] = []
    if delta:
        from petlbench.report.reference import published_name

        by_name = {r.published.name: r for r in published}
        declared: dict[str, set[str | None]] = defaultdict(set)  # row label -> published names its runs map to
        for r in recs:
            if r["status"] == "ok":
                hp = _dig(r, "config", "method_hparams")
                declared[labels[row_of[id(r)]]].add(
                    published_name(r["method"], the_suite.name, hp if isinstance(hp, Mapping) else None))
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

    blocks = list(dict.fromkeys(r.block for r in rows))
    # Rows on different backbones or weights are never ranked against each other; published rows
    # (ViT-B/16, ImageNet-21k) are ranked with the ViT-B/16 block when there is one.
    reference_block = next((b for b in blocks if b.startswith(PAPER_ARCH)), None)
    for b in blocks:
        _rank(columns, [*(published if b == reference_block else []), *[r for r in rows if r.block == b]])
    if reference_block is None and published:
        _rank(columns, published)

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


PAPER_ARCH = "vit_base_patch16_224"


def _order_rows(rows: list[Row], order: str, headline: str, given: Sequence[str]) -> list[Row]:
    """Rows grouped by backbone block (largest first), then ``order`` within each block."""
    def method_rank(r: Row) -> tuple[int, str]:
        return (given.index(r.method), "") if r.method in given else (len(given), r.method.lower())

    sizes: dict[str, int] = defaultdict(int)
    for r in rows:
        sizes[r.block] += sum(st.n for st in r.values.values())
    block_rank = {b: i for i, b in enumerate(sorted(sizes, key=lambda b: (-sizes[b], b)))}
    position = {id(r): i for i, r in enumerate(rows)}

    # "mean": the headline mean; when some row lacks it, the mean over the tasks every row has.
    score: dict[int, float | None] = {id(r): r.value(headline).mean for r in rows}
    if order == "mean" and any(v is None for v in score.values()):
        tasks = set.intersection(*({k for k, st in r.values.items() if st.present and ":" not in k} for r in rows)) \
            if rows else set()
        score = {id(r): (sum(r.value(t).mean for t in tasks) / len(tasks) if tasks else None)  # type: ignore[misc]
                 for r in rows}

    def key(r: Row) -> tuple:
        base: tuple = (block_rank.get(r.block, 0), r.legacy)  # rows selected on test: always last in a block
        if order == "params":
            base += (r.params_m is None, r.params_m or 0.0)
        elif order == "mean":
            m = score[id(r)]
            base += (m is None, -(m or 0.0))
        return (*base, method_rank(r), position[id(r)])

    return sorted(rows, key=key)


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


def _add_means(row: Row, suite: Any, multi: bool) -> None:
    """Group means and overall means, each only when all of its tasks are present."""
    task_mean = {t: st.mean for t, st in row.values.items() if st.present}
    group_means: list[float | None] = []
    for group, tasks in suite.groups.items():
        m = sum(task_mean[t] for t in tasks) / len(tasks) if all(t in task_mean for t in tasks) else None
        group_means.append(m)
        if multi and m is not None:
            row.values[f"group:{group}"] = Stat(mean=m)
    if multi and all(m is not None for m in group_means):
        row.values["mean:groups"] = Stat(mean=sum(group_means) / len(group_means))  # type: ignore[arg-type]
    if all(t in task_mean for t in suite.task_names):
        row.values["mean:tasks"] = Stat(mean=sum(task_mean[t] for t in suite.task_names) / len(suite.task_names))


def _efficiency(mine: pd.DataFrame, row: Row) -> Efficiency:
    def per_task_mean(col: str) -> float | None:
        return _series_mean(mine.groupby("task")[col].mean()) if len(mine) else None

    extra = per_task_mean("extra_after_merge")
    peak = mine["peak_mem"].dropna()
    return Efficiency(
        trainable_m=row.params_m,
        trainable_no_head_m=row.params_no_head_m,
        extra_after_merge_m=None if extra is None else extra / 1e6,
        storage_bytes=per_task_mean("storage"),
        train_time_s=_series_mean(mine["train_time_s"]),
        images_per_s=_series_mean(mine["images_per_s"]),
        peak_mem_bytes=float(peak.max()) if len(peak) else None,
        latency_ratio=_series_mean(mine["latency_ratio"]),
        train_time_std=_series_std(mine["train_time_s"]),
        latency_ratio_std=_series_std(mine["latency_ratio"]),
        concurrency=tuple(sorted(set(mine["concurrency"]))) if len(mine) else (),
        runs=len(mine),
    )


def _series_std(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.std()) if len(s) > 1 else None


def _rank(columns: Sequence[Column], rows: Sequence[Row]) -> None:
    """Mark best (1) and second best (2) per column on the printed values; ties share a rank.

    Rows selected on the test set are not ranked against honest ones (unless nothing else has a value).
    """
    for col in columns:
        honest = [r for r in rows if not r.legacy and r.value(col.key).present]
        pool = honest or [r for r in rows if r.value(col.key).present]
        if len(pool) < 2:
            continue
        printed = sorted({round(r.value(col.key).mean, DIGITS) for r in pool}, reverse=True)  # type: ignore[arg-type]
        for r in pool:
            v = round(r.value(col.key).mean, DIGITS)  # type: ignore[arg-type]
            if v == printed[0]:
                r.values[col.key].rank = 1
            elif len(printed) > 1 and v == printed[1]:
                r.values[col.key].rank = 2


# ---------------------------------------------------------------------------- footnotes


def _rows_text(labels: Iterable[str]) -> str:
    return _join(sorted(set(labels)))


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
        Note("Train time: wall-clock training time per run; images/s: training throughput; peak memory: "
             "largest peak GPU memory allocated (– on CPU); latency: batch-1 inference latency of the deployed model "
             "relative to the plain backbone, timed with each run (– when not measured). Averaged over the row's "
             "runs; ± is the sample standard deviation over those runs (tasks and seeds), so a difference between "
             "rows smaller than it is noise."),
    ]
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
