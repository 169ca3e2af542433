"""The data root a run reads: the user's ``--data-root`` (checked), or the data that a suite's
generator builds on first use (the offline demo).

Kept apart from :mod:`~petlbench.data.readers` so that reading split files never imports the
demo (which writes the files the readers then read).
"""

from __future__ import annotations

from pathlib import Path

from petlbench.data.demo import materialize_demo
from petlbench.data.readers import check_data_root
from petlbench.data.suites import Suite, get_suite
from petlbench.errors import PetlbenchError


def resolve_data_root(suite: Suite | str, data_root: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """The data root to read: the given one, or the built data of a suite with a generator (the demo)."""
    suite = get_suite(suite)
    if data_root is not None:
        return check_data_root(data_root)
    if suite.generator == "demo":
        return materialize_demo(cache_dir)
    raise PetlbenchError(
        f"suite {suite.name!r} needs its data on disk. Fix: pass --data-root (the folder that holds "
        f"{', '.join(suite.task_names[:3])}, ...)."
    )
