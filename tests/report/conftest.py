"""Fixtures of the reporter tests: hand-written records, a results folder, tool lookups.

pdflatex and chromium are system tools (installed by .ci/report-deps.sh). Their tests skip when
the tool is missing, except on CI (the ``CI`` environment variable is set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.report.factory import golden_records, write_records

GOLDEN = Path(__file__).parent / "golden"


def require_tool(*names: str) -> str:
    """Path of the first tool found; skip (or fail on CI) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' / '.join(names)} is not installed (run .ci/report-deps.sh)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must run this test")
    pytest.skip(message)


@pytest.fixture
def records() -> list[dict[str, Any]]:
    return golden_records()


@pytest.fixture
def results_dir(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    folder = tmp_path / "results"
    write_records(folder, records)
    return folder


@pytest.fixture
def collected() -> list[str]:
    """A warning sink: pass ``collected.append`` as on_warning."""
    return []


def check_golden(name: str, text: str) -> None:
    """Compare with tests/report/golden/NAME; PETLBENCH_UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("PETLBENCH_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
        return
    assert path.is_file(), f"missing golden file {path}; create it with PETLBENCH_UPDATE_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    if text != expected:
        import difflib

        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), "golden", "now", n=1))
        pytest.fail(f"{name} differs from the golden file (PETLBENCH_UPDATE_GOLDEN=1 to accept):\n{diff[:6000]}")


def compile_latex(tex: str, folder: Path, name: str = "doc") -> Path:
    """Compile ``tex`` with pdflatex (skipped where it is missing, required on CI); fail on any error."""
    exe = require_tool("pdflatex")
    (folder / f"{name}.tex").write_text(tex, encoding="utf-8")
    proc = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", f"{name}.tex"],
                          cwd=folder, capture_output=True, text=True, timeout=120)
    log = (folder / f"{name}.log").read_text(errors="replace") if (folder / f"{name}.log").exists() else proc.stdout
    errors = [line for line in log.splitlines() if line.startswith("!")]
    assert proc.returncode == 0 and not errors, "\n".join(errors) or proc.stdout[-3000:]
    pdf = folder / f"{name}.pdf"
    assert pdf.stat().st_size > 1000
    return pdf
