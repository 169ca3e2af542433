"""The inline launcher: every run in this process, one after the other (debugging, notebooks, CI)."""

from __future__ import annotations

from typing import Any

from petlbench.launch.common import DoneFn, ExecuteFn, StartFn, call_guarded
from petlbench.runspec import RunSpec


def launch_inline(
    specs: list[RunSpec], execute: ExecuteFn, on_start: StartFn, on_done: DoneFn
) -> list[dict[str, Any]]:
    """Run ``specs`` in order here; a run that raises becomes a failed record, the rest go on."""
    records: list[dict[str, Any]] = []
    for spec in specs:
        on_start(spec)
        record = call_guarded(execute, spec)
        on_done(spec, record)
        records.append(record)
    return records
