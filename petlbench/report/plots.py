"""Figures for the HTML report and ``petlbench report --plots DIR`` (PNG, PDF and SVG).

Drawn with matplotlib's Agg canvas on :class:`matplotlib.figure.Figure` directly (no pyplot), so
the reporter never touches a GUI backend or global figure state (it also runs on headless CI
machines). Legends sit outside the axes, so they never cover a point or a bar.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.report.table import Report, Row
from petlbench.safeio import atomic_write

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
#: File formats ``Plot.save`` writes, side by side.
EXPORT_FORMATS = ("png", "pdf", "svg")


@dataclass
class Plot:
    """One figure: title, caption (what is shown and what was left out), PNG bytes and the figure."""

    key: str
    title: str
    caption: str
    png: bytes
    figure: Any = field(default=None, repr=False, compare=False)

    def render(self, fmt: str) -> bytes:
        """The figure as ``png``, ``pdf`` or ``svg`` bytes (no timestamps: same input, same bytes)."""
        if fmt == "png" or self.figure is None:
            return self.png
        return _save(self.figure, fmt)

    def save(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """Write ``<stem>.png``, ``.pdf`` and ``.svg`` into ``folder``; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for fmt in EXPORT_FORMATS:
            path = folder / f"{stem or self.key}.{fmt}"
            atomic_write(path, self.render(fmt))  # a failed write keeps the previous figure
            out.append(path)
        return out


@dataclass
class Summary:
    """What the accuracy axis of the scatter plots shows, and over which tasks both axes average."""

    accuracy: dict[str, float]  # row label -> accuracy
    params: dict[str, float]  # row label -> trainable params (M) over the same tasks
    tasks: list[str]  # task keys both axes average over
    label: str  # y-axis label
    note: str  # one sentence for the caption: which tasks, and what was left out
    complete: bool  # every task of the suite


def _mpl_text(text: str) -> str:
    """Matplotlib treats ``$...$`` as math; a method name must be shown literally."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _figure(width: float = 7.5, height: float = 4.2):  # -> Figure (matplotlib typed lazily)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


_METADATA = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
             "svg": {"Creator": None, "Date": None}}


def _save(fig, fmt: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, metadata=_METADATA[fmt])
    return buf.getvalue()


def _png(fig) -> bytes:
    return _save(fig, "png")


def summary(report: Report) -> Summary:
    """Per-row accuracy and parameters for the scatter plots, over the same tasks on both axes.

    When every reproduced row has the report's headline mean, both axes cover all tasks (the
    headline mean; parameters averaged over all tasks). Otherwise both average the tasks that every
    plotted row has, and the note says which (and which rows or tasks were left out); when no task
    is common to all rows the summary is empty and the note says so.
    """
    tasks = [c.key for c in report.task_columns]
    labels = {c.key: c.label for c in report.columns}
    key = report.headline_key or "mean:tasks"
    reproduced = [r for r in report.rows if any(r.value(t).present for t in tasks)]
    complete = [r for r in report.accuracy_rows if r.value(key).present]
    if reproduced and all(r.value(key).present for r in reproduced):
        acc = {r.label: r.value(key).mean for r in complete}
        params = {r.label: r.params_m for r in complete if r.params_m is not None}
        label = labels.get(key, "mean")
        return Summary(acc, params, tasks, f"top-1 (%), {label}",  # type: ignore[arg-type]
                       f"Both axes cover all tasks (accuracy: {label}; parameters averaged over the same tasks).",
                       True)
    common = [t for t in tasks if all(r.value(t).present for r in reproduced)]
    if not common:
        covered = "; ".join(f"{r.label}: {', '.join(labels[t] for t in tasks if r.value(t).present)}"
                            for r in reproduced)
        return Summary({}, {}, [], "top-1 (%)",
                       f"No task is common to every reproduced row ({covered}), so rows cannot be compared on "
                       "one accuracy axis.", False)
    acc, params, left_out = {}, {}, []
    for r in report.accuracy_rows:
        if not all(r.value(t).present for t in common):
            left_out.append(r.label)
            continue
        acc[r.label] = sum(r.value(t).mean for t in common) / len(common)  # type: ignore[misc]
        if r.kind == "reproduced":
            per_task = [r.params_by_task[t] for t in common if t in r.params_by_task]
            if len(per_task) == len(common):
                params[r.label] = sum(per_task) / len(per_task)
        elif r.params_m is not None:
            params[r.label] = r.params_m
    names = ", ".join(labels[t] for t in common)
    note = (f"The rows cover DIFFERENT tasks: both axes average only the {len(common)} task(s) every reproduced row "
            f"has ({names}), not the suite's {len(tasks) if tasks else 0} shown")
    note += f"; left out (missing one of them): {', '.join(left_out)}." if left_out else "."
    if any(r.kind == "published" for r in report.accuracy_rows if r.label in acc):
        note += " Published rows: parameters as printed."
    return Summary(acc, params, common, f"top-1 (%), mean of {len(common)} common task(s)", note, False)


def headline(report: Report) -> tuple[dict[str, float], str]:
    """Per-row accuracy on the plots' y axis and the axis label (see :func:`summary`)."""
    s = summary(report)
    return s.accuracy, s.label


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (fewer or equal params and higher or equal accuracy)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _color(rows: Sequence[Row]) -> dict[str, str]:
    methods = list(dict.fromkeys(r.label for r in rows))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}


def _legend_below(fig, ax, n: int) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(4, n)), fontsize=7, frameon=False)


def accuracy_vs_params(report: Report) -> Plot | None:
    s = summary(report)
    pts: list[tuple[float, float, Row]] = []
    left_out: list[str] = []
    for r in report.accuracy_rows:
        if r.label not in s.accuracy:
            continue
        x = s.params.get(r.label)
        if x is None or x <= 0:
            left_out.append(r.label)
            continue
        pts.append((x, s.accuracy[r.label], r))
    if not pts:
        if not s.accuracy and s.note and report.rows:
            report.warnings.append(f"accuracy-vs-parameters plot left out: {s.note}")
        return None
    colors = _color(report.rows)
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    # Rows on another backbone are never ranked against the main block: the front covers the first
    # block (and the published ViT-B/16 rows) only.
    main = report.blocks[0] if report.blocks else None
    ranked = [i for i, (_x, _y, r) in enumerate(pts) if r.kind == "published" or main is None or r.block == main]
    sub = pareto_front([(pts[i][0], pts[i][1]) for i in ranked])
    front = [ranked[i] for i in sub]
    ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="#d62728", linewidth=1.5,
            alpha=0.6, zorder=1, label="Pareto front")
    seen: set[str] = set()
    for i, (x, y, r) in enumerate(pts):
        on_front = i in front
        if r.kind == "published":
            legend = "published" if "published" not in seen else None
            seen.add("published")
            ax.scatter([x], [y], s=40, facecolors="none", edgecolors="#555555", linewidths=1.2, zorder=2, label=legend)
            name = r.published.name if r.published is not None else r.label
        else:
            ax.scatter([x], [y], s=70 if on_front else 45, color=colors.get(r.label, "#333333"),
                       edgecolors="#d62728" if on_front else "white", linewidths=1.5, zorder=3)
            name = r.label
        ax.annotate(_mpl_text(name), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    color="#555555" if r.kind == "published" else "#111111")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (M, incl. head; log scale)")
    ax.set_ylabel(_mpl_text(s.label))
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(fig, ax, 2)
    published = any(r.kind == "published" for _x, _y, r in pts)
    caption = ("Filled markers: reproduced rows" + ("; hollow grey: published rows" if published else "")
               + ". The red line joins the Pareto front (no other row has fewer parameters and higher accuracy); "
               "front markers have a red edge. " + s.note)
    if len(report.blocks) > 1:
        caption += (f" Rows of {len(report.blocks)} backbones are shown; the Pareto front covers only the rows on "
                    f"{main} (and the published rows), since rows on different backbones are not ranked together.")
    if left_out:
        caption += f" Not shown on the log axis (0 or unknown parameters): {', '.join(left_out)}."
    return Plot("pareto", "Accuracy vs trainable parameters", caption, _png(fig), fig)


def per_task_bars(report: Report) -> Plot | None:
    tasks = [c.key for c in report.task_columns]
    labels = {c.key: c.label for c in report.task_columns}
    rows = [r for r in report.rows if any(r.value(t).present for t in tasks)]
    if not rows or not tasks:
        return None
    colors = _color(report.rows)
    width = max(7.5, min(18.0, 1.0 + 0.45 * len(tasks) * max(1, len(rows)) ** 0.5))
    fig = _figure(width, 4.8)
    ax = fig.add_subplot()
    bar_w = 0.8 / len(rows)
    lows, highs = [], []
    for i, r in enumerate(rows):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            st = r.value(t)
            if st.present:
                xs.append(j - 0.4 + bar_w * (i + 0.5))
                ys.append(st.mean)
                es.append(st.std or 0.0)
                lows.append(st.mean - (st.std or 0.0))
                highs.append(st.mean + (st.std or 0.0))
        ax.bar(xs, ys, width=bar_w, yerr=es, capsize=2, color=colors.get(r.label), label=_mpl_text(r.label),
               error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
    # A y range around the data (not 0-100), so differences of a point or two are visible.
    lo, hi = min(lows), max(highs)
    pad = max(1.0, 0.08 * (hi - lo))
    bottom, top = max(0.0, lo - pad), min(100.0, hi + pad)
    if top - bottom < 2.0:
        bottom, top = max(0.0, bottom - 1.0), min(100.0, top + 1.0)
    ax.set_ylim(bottom, top)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([_mpl_text(labels[t]) for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.grid(True, axis="y", alpha=0.3)
    _legend_below(fig, ax, len(rows))
    caption = ("Mean top-1 per task over seeds; error bars: sample standard deviation over seeds (none for one seed). "
               f"The y axis spans {bottom:.0f}–{top:.0f}% to show the differences; bars do not start at 0.")
    return Plot("tasks", "Per-task accuracy with seed spread", caption, _png(fig), fig)


def cost_vs_accuracy(report: Report) -> Plot | None:
    s = summary(report)
    pts = [(r.efficiency.train_time_s, s.accuracy[r.label], r) for r in report.rows
           if r.label in s.accuracy and r.efficiency is not None and r.efficiency.train_time_s]
    if not pts:
        return None
    colors = _color(report.rows)
    fig = _figure()
    ax = fig.add_subplot()
    for x, y, r in pts:
        err = r.efficiency.train_time_std if r.efficiency is not None else None
        # A time is never negative: the bar's lower half stops at zero seconds.
        ax.errorbar([x], [y], xerr=None if err is None else [[min(err, x)], [err]], fmt="o",
                    color=colors.get(r.label), ecolor="#777777", elinewidth=0.8, capsize=2, markersize=6)
        ax.annotate(_mpl_text(r.label), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    xs = [p[0] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("training time per run (s)")
    ax.set_ylabel(_mpl_text(s.label))
    ax.grid(True, alpha=0.3)
    caption = ("Mean wall-clock training time per run (± its spread between seeds of a task, pooled over tasks; "
               "cut at zero) against accuracy (reproduced rows; device and concurrency in the efficiency notes). "
               + s.note)
    return Plot("cost", "Training cost vs accuracy", caption, _png(fig), fig)


def all_plots(report: Report) -> list[Plot]:
    """Every figure that the records support (a figure without data is left out)."""
    out = []
    for make in (accuracy_vs_params, per_task_bars, cost_vs_accuracy):
        plot = make(report)
        if plot is not None:
            out.append(plot)
    return out


def save_plots(report: Report, folder: str | Path) -> list[Path]:
    """Write every figure as PNG, PDF and SVG into ``folder`` (``<suite>_<key>.<ext>``)."""
    paths: list[Path] = []
    for plot in all_plots(report):
        paths += plot.save(folder, f"{report.suite}_{plot.key}")
    return paths
