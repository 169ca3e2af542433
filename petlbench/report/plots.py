"""Figures for the HTML report, drawn with matplotlib's Agg canvas and returned as PNG bytes.

No pyplot: figures are built on :class:`matplotlib.figure.Figure` directly, so the reporter never
touches a GUI backend or global figure state (it also runs on headless CI machines).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from petlbench.report.aggregate import Report, Row

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


@dataclass
class Plot:
    """One figure: title, caption (what is shown and what was left out) and PNG bytes."""

    key: str
    title: str
    caption: str
    png: bytes


def _mpl_text(text: str) -> str:
    """Matplotlib treats ``$...$`` as math; a method name must be shown literally."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def _figure(width: float = 7.5, height: float = 4.2):  # -> Figure (matplotlib typed lazily)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def headline(report: Report) -> tuple[dict[str, float], str]:
    """Per-row summary accuracy used on the plots' y axis, and the axis label.

    The report's headline mean when rows have it; otherwise the mean over the tasks that every
    plotted row has (so partial sweeps still get a plot, and rows are compared on equal tasks).
    """
    rows = report.accuracy_rows
    key = report.headline_key or "mean:tasks"
    label = next((c.label for c in report.columns if c.key == key), "mean")
    full = {r.label: r.value(key).mean for r in rows if r.value(key).present}
    tasks = [c.key for c in report.task_columns]
    reproduced = [r for r in report.rows if any(r.value(t).present for t in tasks)]
    if all(r.label in full for r in reproduced) and full:
        return full, f"top-1 (%), {label}"  # type: ignore[return-value]
    common = [t for t in tasks if all(r.value(t).present for r in reproduced)]
    if not common:
        return full, f"top-1 (%), {label}"  # type: ignore[return-value]
    out = {}
    for r in rows:
        if all(r.value(t).present for t in common):
            out[r.label] = sum(r.value(t).mean for t in common) / len(common)  # type: ignore[misc]
    return out, f"top-1 (%), mean of {len(common)} common task(s)"


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


def accuracy_vs_params(report: Report) -> Plot | None:
    acc, ylabel = headline(report)
    pts: list[tuple[float, float, Row]] = []
    left_out: list[str] = []
    for r in report.accuracy_rows:
        if r.label not in acc:
            continue
        if r.params_m is None or r.params_m <= 0:
            left_out.append(r.label)
            continue
        pts.append((r.params_m, acc[r.label], r))
    if not pts:
        return None
    colors = _color(report.rows)
    fig = _figure()
    ax = fig.add_subplot()
    front = pareto_front([(x, y) for x, y, _ in pts])
    fx = [pts[i][0] for i in front]
    fy = [pts[i][1] for i in front]
    ax.step(fx, fy, where="post", color="#d62728", linewidth=1.5, alpha=0.6, zorder=1, label="Pareto front")
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
    ax.set_ylabel(_mpl_text(ylabel))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    caption = ("Filled markers: reproduced rows; hollow grey: published rows. The red line joins the Pareto "
               "front (no other row has fewer parameters and higher accuracy); front markers have a red edge.")
    if left_out:
        caption += f" Not shown on the log axis (0 or unknown parameters): {', '.join(left_out)}."
    return Plot("pareto", "Accuracy vs trainable parameters", caption, _png(fig))


def per_task_bars(report: Report) -> Plot | None:
    tasks = [c.key for c in report.task_columns]
    rows = [r for r in report.rows if any(r.value(t).present for t in tasks)]
    if not rows or not tasks:
        return None
    colors = _color(report.rows)
    width = max(7.5, min(18.0, 1.0 + 0.45 * len(tasks) * max(1, len(rows)) ** 0.5))
    fig = _figure(width, 4.4)
    ax = fig.add_subplot()
    bar_w = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs, ys, es = [], [], []
        for j, t in enumerate(tasks):
            st = r.value(t)
            if st.present:
                xs.append(j - 0.4 + bar_w * (i + 0.5))
                ys.append(st.mean)
                es.append(st.std or 0.0)
        ax.bar(xs, ys, width=bar_w, yerr=es, capsize=2, color=colors.get(r.label), label=_mpl_text(r.label),
               error_kw={"elinewidth": 0.8, "ecolor": "#222222"})
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([_mpl_text(t) for t in tasks], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=min(4, len(rows)), loc="upper right")
    caption = "Mean top-1 per task over seeds; error bars: sample standard deviation over seeds (none for one seed)."
    return Plot("tasks", "Per-task accuracy with seed spread", caption, _png(fig))


def cost_vs_accuracy(report: Report) -> Plot | None:
    acc, ylabel = headline(report)
    pts = [(r.efficiency.train_time_s, acc[r.label], r) for r in report.rows
           if r.label in acc and r.efficiency is not None and r.efficiency.train_time_s]
    if not pts:
        return None
    colors = _color(report.rows)
    fig = _figure()
    ax = fig.add_subplot()
    for x, y, r in pts:
        ax.scatter([x], [y], s=50, color=colors.get(r.label))
        ax.annotate(_mpl_text(r.label), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    xs = [p[0] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("training time per run (s)")
    ax.set_ylabel(_mpl_text(ylabel))
    ax.grid(True, alpha=0.3)
    caption = "Mean wall-clock training time per run against accuracy (reproduced rows; device in the efficiency notes)."
    return Plot("cost", "Training cost vs accuracy", caption, _png(fig))


def all_plots(report: Report) -> list[Plot]:
    """Every figure that the records support (a figure without data is left out)."""
    out = []
    for make in (accuracy_vs_params, per_task_bars, cost_vs_accuracy):
        plot = make(report)
        if plot is not None:
            out.append(plot)
    return out
