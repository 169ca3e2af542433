"""What a non-editable install (a wheel) contains: every subpackage and the package data the code reads.

pyproject.toml lists its packages by hand (``methods/`` and ``suites/`` are mapped to other names),
so a new subpackage that is not added there is silently left out of the wheel: an editable
install (every test run) still works, ``pip install .`` then fails with ModuleNotFoundError.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    listed = set(_setuptools()["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "petlbench").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_the_demo_weights_are_package_data() -> None:
    from petlbench.data import demo

    shipped = Path(demo.__file__).with_name(demo.DEMO_WEIGHTS_FILE)
    assert shipped.is_file()
    patterns = _setuptools()["package-data"].get("petlbench.data", [])
    assert any(fnmatch(shipped.name, p) for p in patterns), "add it to [tool.setuptools.package-data]"
