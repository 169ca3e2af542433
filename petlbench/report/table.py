"""The report's data model: cells, columns, rows, notes and the :class:`Report` every renderer reads,
with the constants and small record helpers the aggregation modules share.

Nothing here computes a number; :mod:`petlbench.report.aggregate` builds a :class:`Report` from run
records, and :mod:`petlbench.report.rendering` and :mod:`petlbench.report.plots` only read it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
PAPER_ARCH = "vit_base_patch16_224"


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
    #: Spread of a run's train time between seeds of one task, pooled over tasks (None without a
    #: task run with two seeds): tasks of different sizes take different times, which is not noise.
    train_time_std: float | None = None
    #: Spread of the latency ratio: the larger of its sample std over runs and the timer's own
    #: half-spread within a run (each run times the deployed and the plain model interleaved).
    latency_ratio_std: float | None = None
    #: Every run deployed the merged model, which is the plain backbone by construction
    #: (:func:`petlbench.merge`; nothing extra after merge): its latency is the backbone's.
    deploys_plain: bool = False
    train_time_measurable: bool = True  # False: the spread is larger than the time itself
    latency_measurable: bool = True  # False: the spread is larger than the ratio's distance from 1
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


def _rows_text(labels: Iterable[str]) -> str:
    return _join(sorted(set(labels)))


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
