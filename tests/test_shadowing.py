"""The folder that holds a clone named petlbench: Python run there imports the clone folder as an
empty namespace package (with the editable install the README uses); the CLI says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from petlbench.cli import main
from petlbench.shadowing import namespace_trap


def _clone_parent(tmp_path: Path) -> Path:
    """A folder holding a 'clone': petlbench/ with pyproject.toml and the package one level down."""
    clone = tmp_path / "petlbench"
    (clone / "petlbench").mkdir(parents=True)
    (clone / "petlbench" / "__init__.py").write_text("")
    (clone / "pyproject.toml").write_text("[project]\nname = \"petlbench\"\n")
    return tmp_path


def _what_python_imports_in(folder: Path) -> str:
    code = "import petlbench; print('namespace' if getattr(petlbench, '__file__', None) is None else 'package')"
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300,
                          check=True).stdout.strip()


def test_the_detection_agrees_with_what_python_really_imports(tmp_path: Path) -> None:
    parent = _clone_parent(tmp_path)
    trapped = _what_python_imports_in(parent) == "namespace"  # True with an editable install
    message = namespace_trap(parent)
    assert (message is not None) == trapped
    if message is not None:
        assert "./petlbench (the petlbench clone)" in message and "Fix: run them from inside ./petlbench" in message
        assert "\n" not in message


def test_no_note_where_there_is_no_trap(tmp_path: Path) -> None:
    assert namespace_trap(tmp_path) is None  # no petlbench folder at all
    (tmp_path / "petlbench").mkdir()
    (tmp_path / "petlbench" / "__init__.py").write_text("")
    assert namespace_trap(tmp_path) is None  # a regular package there (another problem, not this one)
    assert _what_python_imports_in(tmp_path) == "package"


def test_the_cli_says_it_in_one_line_and_still_works(tmp_path: Path, monkeypatch) -> None:
    parent = _clone_parent(tmp_path)
    monkeypatch.chdir(parent)
    result = CliRunner().invoke(main, ["list", "backbones"])
    assert result.exit_code == 0 and "vit_base_patch16_224" in result.stdout
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == (0 if namespace_trap(parent) is None else 1)
