"""Fake execute functions that run *inside Slurm jobs* during tests/test_slurm.py.

They live in their own importable module because submitit pickles the callable by reference
and the job unpickles it in a fresh Python on the node: ``tests.slurm_job`` must import there.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from petlbench.records import write_record
from petlbench.runspec import RunSpec


def job_ok(spec: RunSpec) -> dict[str, Any]:
    """Write an ok record saying which Python, job and host ran it."""
    record = {
        "run_id": spec.run_id, "suite": spec.suite, "task": spec.task, "method": spec.method,
        "seed": spec.seed, "status": "ok", "error": None, "metrics": {"top1": 42.0},
        "python": sys.executable,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "hostname": socket.gethostname(),
        "cwd": os.getcwd(),
    }
    write_record(spec.record_path, record)
    return record


def job_dies(spec: RunSpec) -> dict[str, Any]:
    """Seed 1 kills its job's Python hard (no result for submitit); the others succeed."""
    if spec.seed == 1:
        os._exit(3)
    return job_ok(spec)


def job_preemptible(spec: RunSpec) -> dict[str, Any]:
    """First attempt announces itself and runs until preempted; the requeued attempt finishes."""
    flag = Path(spec.output) / f"attempt-{spec.seed}"
    if not flag.exists():
        flag.write_text(os.environ.get("SLURM_JOB_ID", ""))
        time.sleep(300)
    return job_ok(spec)
