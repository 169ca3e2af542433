"""Numbers of a row: means over seeds are made by :func:`petlbench.report.aggregate.build_report`;
here the group and overall means, the best/second-best marks, the row order and the efficiency
(cost) figures of a row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pandas as pd

from petlbench.report.table import DIGITS, Column, Efficiency, Row, Stat


def _series_mean(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.mean()) if len(s) else None


def _series_std(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.std()) if len(s) > 1 else None


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


def _efficiency(mine: pd.DataFrame, row: Row) -> Efficiency:
    def per_task_mean(col: str) -> float | None:
        return _series_mean(mine.groupby("task")[col].mean()) if len(mine) else None

    extra = per_task_mean("extra_after_merge")
    peak = mine["peak_mem"].dropna()
    train_time = _series_mean(mine["train_time_s"])
    train_std = _pooled_seed_std(mine, "train_time_s")
    latency = _series_mean(mine["latency_ratio"])
    latency_std = _latency_spread(mine, latency)
    return Efficiency(
        trainable_m=row.params_m,
        trainable_no_head_m=row.params_no_head_m,
        extra_after_merge_m=None if extra is None else extra / 1e6,
        storage_bytes=per_task_mean("storage"),
        train_time_s=train_time,
        images_per_s=_series_mean(mine["images_per_s"]),
        peak_mem_bytes=float(peak.max()) if len(peak) else None,
        latency_ratio=latency,
        train_time_std=train_std,
        latency_ratio_std=latency_std,
        deploys_plain=bool(len(mine)) and bool((mine["deployed"] == "merged").all())
        and bool((mine["extra_after_merge"] == 0).all()),
        train_time_measurable=train_time is None or train_std is None or train_std <= train_time,
        latency_measurable=latency is None or latency_std is None or latency_std <= abs(latency - 1.0),
        concurrency=tuple(sorted(set(mine["concurrency"]))) if len(mine) else (),
        runs=len(mine),
    )


def _pooled_seed_std(mine: pd.DataFrame, col: str) -> float | None:
    """Sample std between seeds of one task, pooled over the tasks that have two or more (the root
    of the runs-weighted mean variance); None when no task has two. Differences between tasks
    (a 120-image task trains faster than a 1000-image one) are deliberately not in it."""
    sums = dof = 0.0
    for _task, values in mine.groupby("task")[col]:
        values = values.dropna()
        if len(values) > 1:
            sums += float(values.var()) * (len(values) - 1)
            dof += len(values) - 1
    return (sums / dof) ** 0.5 if dof else None


def _latency_spread(mine: pd.DataFrame, mean: float | None) -> float | None:
    """The ± of a row's latency ratio: the larger of its sample std over runs (every run measures
    the same ratio) and the timer's own half-spread within a run (a relative spread, recorded as
    ``latency_ratio_spread``; None for older records)."""
    if mean is None:
        return None
    std = _series_std(mine["latency_ratio"])
    within = _series_mean(mine["latency_spread"])
    parts = [v for v in (std, None if within is None else within * mean) if v is not None]
    return max(parts) if parts else None
