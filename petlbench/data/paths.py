"""Where petlbench keeps what it builds (decoded images, fingerprints, demo data and weights).

A leaf module (no petlbench.data imports), so the cache, the fingerprints and the demo can all
ask for the cache folder without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PETLBENCH_CACHE"


def cache_root(override: str | Path | None = None) -> Path:
    """petlbench's cache folder: ``override``, else ``$PETLBENCH_CACHE``, else ``~/.cache/petlbench``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "petlbench"
