"""benchmarks/gpu-evidence on a CPU: it refuses to run without CUDA in one line, checks its
arguments, writes synthetic data that petlbench reads as VTAB-1k, and its sweep plans."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petlbench.data.check import check_suite
from petlbench.data.readers import read_split

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu-evidence"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # what a machine without a GPU sees
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=env)


def _module():
    loader = importlib.machinery.SourceFileLoader("gpu_evidence", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_evidence", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK) and SCRIPT.read_text().startswith("#!/usr/bin/env python")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_stops_at_once_in_one_line(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-evidence: no CUDA device") and "--dry-run" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [(["--budget-s", "5"], "--budget-s 5"), (["--epochs", "0"], "--epochs 0")])
def test_bad_arguments_are_refused(args: list[str], needle: str) -> None:
    result = _run(*args, "--dry-run")
    assert result.returncode == 2 and needle in result.stderr


def test_the_synthetic_data_are_vtab1k_that_petlbench_reads(tmp_path: Path) -> None:
    counts = _module().make_synthetic_vtab(tmp_path)
    assert counts == {t: {"train800": 800, "val200": 200, "test": 500, "train800val200": 1000}
                      for t in ("cifar", "eurosat")}
    report = check_suite("vtab", tmp_path, ["cifar", "eurosat"], splits=["train800val200", "test"], decode=False)
    report.raise_for_errors()  # only warnings: the test splits are shorter than VTAB's
    index = read_split("vtab", "cifar", "train800val200", tmp_path)
    assert len(index) == 1000 and set(index.labels) <= set(range(100)) and len(set(index.labels)) > 50


def test_dry_run_builds_the_data_and_plans_the_sweep(tmp_path: Path) -> None:
    result = _run("--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "would run bench-packing:" in result.stdout and "bench_packing.py --compile" in result.stdout
    assert "--pack 3 --set compile=true" in result.stdout and "--pretrained none" in result.stdout
    assert "the sweep plans: 6 runs (0 already done)" in result.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes no figures
