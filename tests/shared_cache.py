"""One petlbench cache per test process for modules that use the demo suite, so its data are
built once, not once per module."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache


@lru_cache(maxsize=1)
def _folder() -> str:
    path = tempfile.mkdtemp(prefix="petlbench-test-cache-")
    atexit.register(shutil.rmtree, path, True)
    return path


@contextmanager
def demo_cache_env() -> Iterator[str]:
    """``PETLBENCH_CACHE`` pointing at the process's shared test cache (or the one already set)."""
    old = os.environ.get("PETLBENCH_CACHE")
    cache = old or _folder()
    os.environ["PETLBENCH_CACHE"] = cache
    try:
        yield cache
    finally:
        if old is None:
            os.environ.pop("PETLBENCH_CACHE", None)
