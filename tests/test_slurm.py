"""The slurm launcher against a real Slurm (CI starts a one-node cluster with .ci/slurm-setup.sh).

Skipped where no Slurm answers, except in CI (``CI`` set): there a missing or broken cluster is a
failure, so a broken setup script cannot turn these tests into silent skips.
The job functions live in ``tests/slurm_job.py``: submitit pickles them by reference and the job
imports them in a fresh Python, so they must be importable from the job's working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from petlbench.launch import LaunchOptions, launch
from petlbench.launch import slurm as slurm_launcher
from petlbench.runspec import RunSpec
from tests import slurm_job

REPO = Path(__file__).resolve().parents[1]
USABLE = {"idle", "mixed", "allocated", "completing"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def slurm_problem() -> str | None:
    """Why Slurm cannot run jobs here, or None when a node is up."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no sinfo/sbatch on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    states = [s.rstrip("*~#!%$@^-+") for s in proc.stdout.split()]
    if not any(s in USABLE for s in states):
        return f"no node is up (states: {', '.join(states) or 'none'})"
    return None


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = slurm_problem()
    if problem:
        if in_ci():
            pytest.fail(f"CI is set but Slurm is not usable: {problem}. Did .ci/slurm-setup.sh run?")
        pytest.skip(f"no usable Slurm here: {problem}")
    # Jobs inherit this environment (sbatch --export=ALL): make `tests.slurm_job` importable there.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def make_spec(output: Path, seed: int) -> RunSpec:
    return RunSpec(suite="demo", task="digits", method="linear", seed=seed, protocol="vtab1k", backbone="micro",
                   method_hparams={}, train={"epochs": 1}, output=str(output))


CPU_ONLY = LaunchOptions(slurm_gpus_per_task=0, slurm_time_min=60, slurm_poll_s=2.0)


def test_slurm_array_runs_every_spec(slurm: None, tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed) for seed in range(3)]
    started: list[str] = []
    done: list[tuple[str, str]] = []
    records = launch(specs, "slurm", CPU_ONLY, execute=slurm_job.job_ok,
                     on_start=lambda s: started.append(s.run_id),
                     on_done=lambda s, r: done.append((s.run_id, r["status"])))
    assert [r["run_id"] for r in records] == [s.run_id for s in specs]
    assert sorted(started) == sorted(s.run_id for s in specs)
    assert sorted(done) == sorted((s.run_id, "ok") for s in specs)
    array_ids = set()
    for spec, record in zip(specs, records, strict=True):
        on_disk = json.loads(spec.record_path.read_text())
        assert on_disk["status"] == "ok" and on_disk["run_id"] == spec.run_id
        assert record["slurm_job_id"] and record["slurm_job_id"].isdigit()  # ran as a Slurm job
        array_ids.add(record["slurm_array_job_id"])
        assert record["python"] == sys.executable  # the job ran in this venv's Python
    assert len(array_ids) == 1 and None not in array_ids  # one job array for the sweep
    assert (tmp_path / ".slurm").is_dir()  # submitit's folder defaults to <output>/.slurm


def test_slurm_job_death_is_a_failed_run(slurm: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_launcher, "_RESULT_GRACE_S", 2.0)
    specs = [make_spec(tmp_path, seed) for seed in range(2)]
    records = launch(specs, "slurm", CPU_ONLY, execute=slurm_job.job_dies)
    assert [r["status"] for r in records] == ["ok", "failed"]
    error = records[1]["error"]
    assert error["type"] == "UncompletedJobError"
    assert "Slurm job" in error["message"] and "FAILED" in error["message"], error
    on_disk = json.loads(specs[1].record_path.read_text())  # written by the launcher
    assert on_disk["status"] == "failed" and on_disk["run_id"] == specs[1].run_id


def test_slurm_preempted_job_is_requeued(slurm: None, tmp_path: Path) -> None:
    spec = make_spec(tmp_path, 0)
    out: dict[str, Any] = {}

    def sweep() -> None:
        try:
            out["records"] = launch([spec], "slurm", CPU_ONLY, execute=slurm_job.job_preemptible)
        except BaseException as exc:  # pragma: no cover - reported below
            out["error"] = exc

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    flag = tmp_path / "attempt-0"
    deadline = time.monotonic() + 120
    while not (flag.exists() and flag.read_text()):
        assert thread.is_alive(), out
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    job_id = flag.read_text()
    # No wait for submitit's signal handlers: its process_job installs them (_handle_signals)
    # before it calls the job function, which wrote the flag, so they are in place already.
    # What Slurm does to a preempted (or timing-out) job, the way submitit's own tests simulate it.
    subprocess.run(["scancel", "--signal", "SIGTERM", job_id], check=True)
    subprocess.run(["scancel", "--signal", "USR2", job_id], check=True)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the requeued job never finished"
    assert "error" not in out, out
    (record,) = out["records"]
    assert record["status"] == "ok"
    assert record["slurm_job_id"] == job_id and record["slurm_restart_count"] == "1"


def _first_demo_task() -> str:
    import importlib.resources

    import yaml

    suite = yaml.safe_load((importlib.resources.files("petlbench_suites") / "demo.yaml").read_text())
    first_group = next(iter(suite["groups"].values()))
    return first_group[0]["name"]


@pytest.mark.skipif(not (in_ci() or os.environ.get("PETLBENCH_SLURM_E2E") == "1"),
                    reason="end to end through the CLI: set PETLBENCH_SLURM_E2E=1 (always on in CI)")
def test_cli_run_through_slurm(slurm: None, tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "petlbench.cli", "run", "--suite", "demo", "--method", "linear",
           "--task", _first_demo_task(), "--set", "epochs=1", "--launcher", "slurm",
           "--slurm-gpus-per-task", "0", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(p.read_text()) for p in out.rglob("*.json") if ".slurm" not in p.parts]
    assert len(records) == 1 and records[0]["status"] == "ok", records
    assert list((out / ".slurm").glob("*/*_result.pkl")), "no Slurm job ran"
