"""Published numbers shipped with petlbench, and how their method names map onto ours.

The mapping is declared by each method (``Method.published`` and ``Method.published_as``), never
listed here, so a plugin's rows are compared exactly like a built-in's.

A reference set is a CSV with the columns ``benchmark,method,task,accuracy,params_M,source_paper,
provenance``. The reporter adds its rows as "(published)" rows and cites ``source_paper`` and
``provenance`` in a footnote. A number that is not in the CSV stays missing: nothing is filled in.
"""

from __future__ import annotations

import importlib.resources
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from petlbench.errors import PetlbenchError, did_you_mean, read_user_text

COLUMNS = ("benchmark", "method", "task", "accuracy", "params_M", "source_paper", "provenance")

#: Shipped sets: name -> (file in petlbench/report/data, one-line description).
REFERENCE_SETS: Mapping[str, tuple[str, str]] = {
    "paper": (
        "paper_results.csv",
        "published ViT-B/16 (ImageNet-21k) numbers on VTAB-1k and FGVC, copied from secondary "
        "compilations (provenance per row); ARC/ARC_att not verified",
    ),
}

def published_name(method: str, suite: str, config: Mapping[str, Any] | None = None) -> str | None:
    """The reference-CSV method name that ``method`` run with ``config`` reproduces on ``suite``.

    Declared by the method itself (``Method.published`` / ``Method.published_as``), so built-ins and
    plugins map the same way. None for unknown methods and for methods without a published row.
    """
    from petlbench.registry import get_method

    try:
        cls = get_method(method)
    except PetlbenchError:
        return None
    full = {k: h.default for k, h in cls.hparams.items()}
    full.update(config or {})
    try:
        return cls.published_as(suite, full)
    except Exception:  # a plugin's mapping bug must not break the report
        return None


def declared_rows(suite: str) -> dict[str, str]:
    """{published name: registered method} for the rows each method's default configuration on
    ``suite`` (with the suite's presets) declares; the first method (by name) wins a shared row."""
    from petlbench.registry import get_method, list_methods

    out: dict[str, str] = {}
    for name in list_methods():
        try:
            config = get_method(name).resolve(suite=suite)
        except PetlbenchError:  # a broken plugin must not break the report
            continue
        row = published_name(name, suite, config)
        if row is not None:
            out.setdefault(row, name)
    return out


def our_method(published: str, suite: str) -> str | None:
    """The registered method whose default configuration for ``suite`` reproduces the published
    rows named ``published``, or None."""
    return declared_rows(suite).get(published.strip())


def list_reference_sets() -> dict[str, str]:
    """Name -> description of every shipped reference set."""
    return {name: desc for name, (_file, desc) in REFERENCE_SETS.items()}


@dataclass
class PublishedMethod:
    """One published method on one benchmark: per-task accuracy and where it came from."""

    name: str
    benchmark: str
    ours: str | None
    accuracy: dict[str, float] = field(default_factory=dict)  # canonical task name -> %
    params_m: float | None = None
    sources: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)

    @property
    def unverified(self) -> bool:
        return any(p.strip().upper().startswith("UNVERIFIED") for p in self.provenance)


def _read_csv(text: str, source: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"benchmark": str, "method": str, "task": str,
                                                    "source_paper": str, "provenance": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise PetlbenchError(f"reference file {source}: not a readable CSV ({exc}).") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise PetlbenchError(
            f"reference file {source}: column {missing[0]!r} is missing. Fix: use the columns {','.join(COLUMNS)}."
        )
    for col in ("accuracy", "params_M"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def load_reference(name: str) -> tuple[pd.DataFrame, str]:
    """The rows of reference set ``name`` (or of a CSV file path) and a label naming it."""
    if name in REFERENCE_SETS:
        filename = REFERENCE_SETS[name][0]
        text = importlib.resources.files("petlbench.report").joinpath("data", filename).read_text(encoding="utf-8")
        return _read_csv(text, f"petlbench/report/data/{filename}"), name
    path = Path(name).expanduser()
    if path.suffix.lower() == ".csv":
        text = read_user_text(path, f"--reference: file {str(path)!r}", "save the CSV as UTF-8")
        return _read_csv(text, str(path)), path.name
    raise PetlbenchError(
        "--reference: " + did_you_mean(name, REFERENCE_SETS, "reference set", label="Available")
        + " A CSV file with the same columns also works."
    )


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def published_methods(df: pd.DataFrame, benchmark_names: set[str], resolve_task: Any,
                      on_warning: Any = None, suite: str | None = None) -> list[PublishedMethod]:
    """Published rows of the benchmark whose name is in ``benchmark_names`` (matching keys).

    ``resolve_task`` maps a published task name onto the suite's canonical name (raises
    PetlbenchError when the suite has no such task; those rows are left out with a warning).
    ``suite`` (petlbench's suite name) fills ``ours`` from the methods' declared mappings.
    """
    from petlbench.data.suites import name_key

    out: dict[str, PublishedMethod] = {}
    unknown: list[str] = []
    ours = declared_rows(suite) if suite is not None else {}
    for row in df.itertuples(index=False):
        bench = str(row.benchmark)
        if name_key(bench) not in benchmark_names:
            continue
        try:
            task = resolve_task(str(row.task)).name
        except PetlbenchError:
            unknown.append(str(row.task))
            continue
        name = str(row.method).strip()
        pm = out.get(name)
        if pm is None:
            pm = out[name] = PublishedMethod(name=name, benchmark=bench, ours=ours.get(name))
        acc = _float(row.accuracy)
        if acc is not None:
            pm.accuracy[task] = acc
        params = _float(row.params_M)
        if params is not None and pm.params_m is None:
            pm.params_m = params
        for value, bucket in ((row.source_paper, pm.sources), (row.provenance, pm.provenance)):
            text = "" if pd.isna(value) else str(value).strip()
            if text and text not in bucket:
                bucket.append(text)
    if unknown and on_warning is not None:
        names = ", ".join(sorted(set(unknown)))
        on_warning(f"reference rows for tasks this suite does not define were left out: {names}")
    return list(out.values())
