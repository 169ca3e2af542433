"""The efficiency table says what the records can support: a merged model is the plain backbone
(no timed ratio), a figure whose spread exceeds its effect is "n.m." (not measurable), spreads are
between seeds (not between tasks of different sizes), and the plots do not overstate either."""

from __future__ import annotations

import csv
import io

from petlbench.report import build_report, render
from petlbench.report.plots import accuracy_vs_params, cost_vs_accuracy
from tests.report.factory import make_record


def _quiet(**kw):
    return {"on_warning": lambda m: None, **kw}


def _run(method: str, task: str, seed: int, *, train_time: float = 60.0, latency: float | None = None,
         spread: float | None = None, deployed: str | None = None, **kw) -> dict:
    r = make_record(method, task, seed, 60.0 + seed, train_time=train_time, latency_ratio=latency, **kw)
    if spread is not None:
        r["efficiency"]["latency_ratio_spread"] = spread
    if deployed is not None:
        r["efficiency"]["deployed"] = deployed
    return r


def _cells(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_merged_rows_are_the_plain_backbone_not_a_noisy_ratio() -> None:
    # What the issue saw on the CPU demo: merged ARC at 0.60x ± 0.40.
    recs = [_run("arc", "cifar", 0, latency=0.2, spread=0.1, deployed="merged", hparams={}),
            _run("arc", "dtd", 0, latency=1.0, spread=0.1, deployed="merged", hparams={})]
    report = build_report(recs, **_quiet())
    e = report.rows[0].efficiency
    assert e.deploys_plain and e.latency_ratio == 0.6
    md = render(report, "markdown", table="efficiency")
    assert _cells(md, "ARC")[-1] == "= backbone" and "0.60×" not in md
    assert "= backbone (ARC): deployed merged, which is the plain backbone" in md
    row = next(csv.DictReader(io.StringIO(render(report, "csv", table="efficiency"))))
    assert row["latency_shown_as"] == "plain backbone (merged)" and row["latency_ratio"] == "0.6"  # kept as measured


def test_a_latency_ratio_is_shown_only_when_its_spread_is_smaller_than_its_effect() -> None:
    slower = [_run("vpt_deep", "cifar", s, latency=1.30 + 0.02 * s, spread=0.01, deployed="unmerged", hparams={})
              for s in (0, 1)]
    noisy = [_run("adapter", "cifar", s, latency=1.02, spread=0.05, deployed="unmerged", hparams={}) for s in (0, 1)]
    merged_with_extra = _run("lora", "cifar", 0, latency=1.5, spread=0.02, deployed="merged")
    merged_with_extra["params"]["extra_after_merge"] = 4096  # something stays after merging: not the backbone
    report = build_report([*slower, *noisy], **_quiet())
    md = render(report, "markdown", table="efficiency")
    assert _cells(md, "VPT-Deep")[-1] == "1.31× ± 0.01"  # std 0.014 over runs, timer spread 0.013
    assert _cells(md, "Adapter")[-1] == "n.m."  # ± 0.051 > 0.02 from 1x
    assert "n.m.: not measurable here" in md and "Adapter (latency)" in md and "VPT-Deep (latency)" not in md
    md = render(build_report([merged_with_extra], **_quiet()), "markdown", table="efficiency")
    assert _cells(md, "LoRA")[-1] == "1.50× ± 0.03" and "= backbone" not in md


def test_train_time_spread_is_between_seeds_not_between_tasks() -> None:
    # One seed on a small and a large task: no seed spread at all (the tasks' sizes are not noise).
    one_seed = [_run("lora", "cifar", 0, train_time=10.0), _run("lora", "dtd", 0, train_time=500.0)]
    e = build_report(one_seed, **_quiet()).rows[0].efficiency
    assert e.train_time_s == 255.0 and e.train_time_std is None and e.train_time_measurable
    md = render(build_report(one_seed, **_quiet()), "markdown", table="efficiency")
    assert "| 4.2 min |" in md
    # Two seeds per task: the pooled spread between seeds.
    seeds = [_run("lora", t, s, train_time=b + 10.0 * s) for t, b in (("cifar", 10.0), ("dtd", 500.0)) for s in (0, 1)]
    e = build_report(seeds, **_quiet()).rows[0].efficiency
    assert abs(e.train_time_std - 7.0711) < 1e-3 and e.train_time_measurable
    # A machine so loaded that seeds of one task differ by more than the time itself: not measurable.
    loaded = [_run("lora", "cifar", 0, train_time=5.0), _run("lora", "cifar", 1, train_time=900.0)]
    report = build_report(loaded, **_quiet())
    assert not report.rows[0].efficiency.train_time_measurable
    md = render(report, "markdown", table="efficiency")
    assert _cells(md, "LoRA")[5] == "n.m." and "LoRA (train time)" in md
    row = next(csv.DictReader(io.StringIO(render(report, "csv", table="efficiency"))))
    assert row["train_time_shown_as"] == "not measurable"


def test_cost_error_bar_stops_at_zero_seconds() -> None:
    recs = [_run("lora", "cifar", 0, train_time=5.0), _run("lora", "cifar", 1, train_time=60.0),
            _run("linear", "cifar", 0, train_time=20.0, hparams={})]
    plot = cost_vs_accuracy(build_report(recs, **_quiet()))
    ax = plot.figure.axes[0]
    xs = [x for coll in ax.collections for seg in coll.get_segments() for x, _y in seg]
    assert xs and min(xs) >= 0.0  # LoRA: 32.5 s ± 38.9 s; the bar's left end is 0, not -6.4 s
    assert "cut at zero" in plot.caption


def test_pareto_caption_mentions_published_rows_only_when_there_are_some() -> None:
    recs = [make_record("lora", "cifar", 0, 70.0), make_record("linear", "cifar", 0, 60.0, hparams={})]
    mine = accuracy_vs_params(build_report(recs, **_quiet()))
    assert "published" not in mine.caption and "hollow" not in mine.caption
    with_paper = accuracy_vs_params(build_report(recs, reference="paper", **_quiet()))
    assert "hollow grey: published rows" in with_paper.caption
