"""The inline launcher: every run in this process, one after the other (debugging, notebooks, CI)."""

from __future__ import annotations

from typing import Any

from petlbench.launch.common import DoneFn, GroupExecuteFn, StartFn, call_guarded_group
from petlbench.runspec import RunSpec


def launch_inline(
    groups: list[list[RunSpec]], execute: GroupExecuteFn, on_start: StartFn, on_done: DoneFn
) -> list[list[dict[str, Any]]]:
    """Run the packs in ``groups`` in order here (one record per spec, per group); a pack that
    raises becomes failed records, the rest go on."""
    out: list[list[dict[str, Any]]] = []
    for group in groups:
        for spec in group:
            on_start(spec)
        records = call_guarded_group(execute, group)
        for spec, record in zip(group, records, strict=True):
            on_done(spec, record)
        out.append(records)
    return out
