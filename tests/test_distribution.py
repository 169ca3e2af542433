"""What a non-editable install (a wheel) contains: every subpackage and the package data the code reads.

Packages are discovered by setup.py (``methods/`` and ``suites/`` are mapped to other names); a
hand-written list once left ``petlbench.launch`` out of the wheel: an editable install (every test
run) still worked, ``pip install .`` then failed with ModuleNotFoundError. CI also builds the wheel
and runs a demo from it (.ci/wheel-check.sh).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_subpackage_is_discovered_for_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **_kw: None)  # read setup.py's discovery, build nothing
    found = set(runpy.run_path(str(ROOT / "setup.py"))["discovered"]())
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "petlbench").rglob("__init__.py")}
    on_disk |= {"petlbench_methods", "petlbench_suites"}
    assert on_disk - found == set()


def test_the_demo_weights_are_package_data() -> None:
    from petlbench.data import demo

    shipped = Path(demo.__file__).with_name(demo.DEMO_WEIGHTS_FILE)
    assert shipped.is_file()
    patterns = _setuptools()["package-data"].get("petlbench.data", [])
    assert any(fnmatch(shipped.name, p) for p in patterns), "add it to [tool.setuptools.package-data]"
