"""The slurm launcher: one array task per pack (one run, or ``--pack`` runs trained together)
through submitit, polled with ``squeue``.

Slurm is checked (tools on PATH, submitit installed, ``sinfo`` answers, the partition exists)
before anything is submitted. A job that ends without a result (killed, OOM, node failure,
cancelled) becomes a failed record naming its state and log; Ctrl-C or SIGTERM while waiting
cancels the jobs still open unless told otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petlbench.errors import PetlbenchError, did_you_mean
from petlbench.launch.common import (
    THREAD_VARS,
    DoneFn,
    GroupExecuteFn,
    LaunchOptions,
    StartFn,
    call_guarded_group,
    log,
    record_crash,
    sigterm_raises,
)
from petlbench.runspec import RunSpec


def _slurm_error(message: str) -> PetlbenchError:
    return PetlbenchError(f"Slurm is not usable: {message}. Fix that, or run with --launcher local.")


def check_slurm(options: LaunchOptions | None = None, timeout_s: float = 30.0) -> list[str]:
    """Fail fast, before anything is submitted, if Slurm cannot take jobs; returns the partitions."""
    for tool in ("sbatch", "squeue", "sinfo", "srun"):
        if shutil.which(tool) is None:
            raise _slurm_error(f"no `{tool}` on PATH (install the Slurm client tools or load its module)")
    try:
        import submitit  # noqa: F401
    except ImportError as exc:
        raise PetlbenchError(
            "the slurm launcher needs submitit, which is not installed. Fix: pip install submitit."
        ) from exc
    try:
        proc = subprocess.run(["sinfo", "-a", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise _slurm_error(f"`sinfo` got no answer from slurmctld within {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise _slurm_error(f"`sinfo` failed ({detail[-1] if detail else f'exit code {proc.returncode}'})")
    partitions = [p.strip().rstrip("*") for p in proc.stdout.split() if p.strip()]
    if not partitions:
        raise _slurm_error("`sinfo` lists no partition")
    if options is not None and options.slurm_partition:
        wanted = [p.strip() for p in options.slurm_partition.split(",")]
        for part in wanted:
            if part not in partitions:
                raise PetlbenchError(did_you_mean(part, partitions, "Slurm partition"))
    return partitions


def slurm_parameters(options: LaunchOptions, name: str = "petlbench") -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments for one run per array task."""
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": int(options.slurm_time_min),
        "nodes": 1,
        "tasks_per_node": 1,
        "slurm_array_parallelism": int(options.slurm_array_parallelism),
    }
    if options.slurm_gpus_per_task > 0:
        params["gpus_per_node"] = int(options.slurm_gpus_per_task)
    if options.slurm_cpus_per_task is not None:
        params["cpus_per_task"] = int(options.slurm_cpus_per_task)
    if options.slurm_mem_gb is not None:
        params["mem_gb"] = options.slurm_mem_gb
    if options.slurm_partition:
        params["slurm_partition"] = options.slurm_partition
    if options.slurm_account:
        params["slurm_account"] = options.slurm_account
    if options.slurm_qos:
        params["slurm_qos"] = options.slurm_qos
    if options.slurm_parameters:
        params["slurm_additional_parameters"] = dict(options.slurm_parameters)
    return params


def make_slurm_executor(folder: str | os.PathLike, options: LaunchOptions) -> Any:
    """A configured ``submitit.AutoExecutor`` (Slurm). Job files go to ``<folder>/<job id>/``."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    executor.update_parameters(**slurm_parameters(options))
    return executor


def _slurm_job_setup() -> None:
    """Inside the job: use the cores Slurm gave us, not every core of the node."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus or not cpus.isdigit():
        return
    for var in THREAD_VARS:
        os.environ.setdefault(var, cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(cpus))


try:
    from submitit.helpers import Checkpointable as _CheckpointableBase
except ImportError:  # submitit is only needed for the slurm launcher
    _CheckpointableBase = object  # type: ignore[assignment,misc]


class SlurmRun(_CheckpointableBase):  # type: ignore[misc,valid-type]
    """The callable each array task runs: one pack (spec dicts in, one record per spec out).
    Checkpointable, so on preemption (or time-out) submitit requeues it: the pack restarts from
    scratch, which is safe because a record is only written when a run ends."""

    def __init__(self, execute: GroupExecuteFn) -> None:
        self.execute = execute

    def __call__(self, spec_dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _slurm_job_setup()
        return call_guarded_group(self.execute, [RunSpec.from_dict(d) for d in spec_dicts])

    def checkpoint(self, spec_dicts: list[dict[str, Any]]) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, spec_dicts)


_SLURM_ENDED = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "REVOKED", "SPECIAL_EXIT",
}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SUSPENDED", "SIGNALING"}
_RESULT_GRACE_S = 15.0  # a finished job's result pickle may lag behind its state on NFS


def _squeue_states(job_ids: Sequence[str]) -> dict[str, tuple[str, str]] | None:
    """{array task id: (state, reason)} for the given jobs, finished ones included while slurmctld
    remembers them; None if squeue could not answer (a transient error: decide nothing)."""
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        if "invalid job id" in proc.stderr.lower():  # all of them purged already
            return {}
        return None
    states: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2:
            states[parts[0]] = (parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2] if len(parts) > 2 else "")
    return states


def _sacct_state(job_id: str) -> str | None:
    """Final state from accounting, for jobs slurmctld already forgot (None without accounting)."""
    if shutil.which("sacct") is None:
        return None
    try:
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if proc.returncode == 0 and len(parts) >= 3 and parts[0] == job_id:
            return f"{parts[1]} (exit code {parts[2]})"
    return None


def _tail(text: str | None, lines: int = 15) -> str:
    if not text:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class _SlurmTask:
    index: int
    job: Any
    submitted_at: float
    started: bool = False
    ended_since: float | None = None
    ended_state: str = ""
    missing_polls: int = 0


def _result_ready(task: _SlurmTask) -> bool:
    folder = task.job.paths.folder
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)  # refreshes NFS attribute caches (what submitit does)
    try:
        written = task.job.paths.result_pickle.stat().st_mtime
    except OSError:
        return False
    # A result older than our submission belongs to an earlier job that had the same id (a
    # cluster whose job ids restarted) and shares its folder: not ours.
    return written >= task.submitted_at - 60


def _slurm_result(task: _SlurmTask, group: list[RunSpec]) -> list[dict[str, Any]]:
    """The records a finished job returned, or failed records saying why there are none."""
    from submitit.core.utils import UncompletedJobError

    def crashed(error_type: str, message: str) -> list[dict[str, Any]]:
        return [record_crash(spec, task.submitted_at, error_type, message) for spec in group]

    try:
        records = task.job.result()
    except UncompletedJobError as exc:  # FailedJobError included: the callable raised in the job
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
        return crashed(type(exc).__name__,
                       f"Slurm job {task.job.job_id}: " + (lines[-3] if len(lines) >= 3 else " ".join(lines)))
    except Exception as exc:  # unreadable result pickle and the like
        return crashed(type(exc).__name__, f"Slurm job {task.job.job_id}: {exc}")
    if not isinstance(records, list) or len(records) != len(group) or not all(isinstance(r, dict) for r in records):
        return crashed("TypeError", f"Slurm job {task.job.job_id} returned no record per run")
    return records


def _slurm_lost(task: _SlurmTask, group: list[RunSpec]) -> list[dict[str, Any]]:
    """A job that ended at the Slurm level (killed, OOM, node failure, cancelled) without a result."""
    job = task.job
    state = task.ended_state or _sacct_state(job.job_id) or "unknown state (no longer in squeue)"
    message = f"Slurm job {job.job_id} ended without a result: {state}"
    try:
        detail = " | ".join(_tail(job.stderr(), 5).splitlines())
    except Exception:
        detail = ""
    if detail:
        message += f"; stderr tail: {detail}"
    message += f"; logs: {job.paths.stderr}"
    return [record_crash(spec, task.submitted_at, "UncompletedJobError", message) for spec in group]


def _scancel(job_ids: Sequence[str]) -> None:
    if not job_ids:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)
    log.warning("cancelled Slurm job(s) %s", ", ".join(job_ids))


def launch_slurm(
    groups: list[list[RunSpec]], options: LaunchOptions, execute: GroupExecuteFn, on_start: StartFn,
    on_done: DoneFn,
) -> list[list[dict[str, Any]] | None]:
    """Submit the packs in ``groups`` as job arrays (one task each) and wait for them; returns
    their records, per group."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(options.slurm_folder or Path(groups[0][0].output) / ".slurm").absolute()
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_slurm_executor(folder, options)
    runner = SlurmRun(execute)
    results: list[list[dict[str, Any]] | None] = [None] * len(groups)
    tasks: dict[int, _SlurmTask] = {}
    array_ids: list[str] = []

    def start(index: int) -> None:
        for spec in groups[index]:
            on_start(spec)

    def finish(index: int, records: list[dict[str, Any]]) -> None:
        task = tasks.get(index)
        if task is None or not task.started:  # ended before a poll saw it running
            if task is not None:
                task.started = True
            start(index)
        results[index] = records
        for spec, record in zip(groups[index], records, strict=True):
            on_done(spec, record)

    with sigterm_raises():
        try:
            size = max(1, options.slurm_max_array_size)
            for first in range(0, len(groups), size):
                chunk = list(range(first, min(first + size, len(groups))))
                try:
                    jobs = executor.map_array(runner, [[s.to_dict() for s in groups[i]] for i in chunk])
                except (FailedJobError, FailedSubmissionError, subprocess.SubprocessError, OSError) as exc:
                    reason = str(exc).strip().splitlines()
                    reason_line = reason[-1] if reason else type(exc).__name__
                    if not array_ids:  # nothing is queued yet: a configuration problem, say so
                        raise PetlbenchError(
                            f"sbatch rejected the job array: {reason_line}. Check --slurm-partition/"
                            "--slurm-account/--slurm-qos/--slurm-time, or use --launcher local."
                        ) from exc
                    for i in chunk:
                        finish(i, [record_crash(s, time.time(), "FailedSubmissionError", f"sbatch failed: {reason_line}")
                                   for s in groups[i]])
                    continue
                now = time.time()
                for i, job in zip(chunk, jobs, strict=True):
                    tasks[i] = _SlurmTask(i, job, now)
                array_ids.append(str(jobs[0].job_id).split("_")[0])
            log.info("submitted %d pack(s) of run(s) as Slurm job(s) %s", len(tasks), ", ".join(array_ids))

            delay = 1.0
            while any(results[i] is None for i in tasks):
                open_ids = sorted({str(t.job.job_id).split("_")[0] for i, t in tasks.items() if results[i] is None})
                states = _squeue_states(open_ids)
                now = time.time()
                for i, task in tasks.items():
                    if results[i] is not None:
                        continue
                    if _result_ready(task):
                        finish(i, _slurm_result(task, groups[i]))
                        continue
                    if states is None:
                        continue
                    entry = states.get(str(task.job.job_id))
                    if entry is None:
                        task.missing_polls += 1
                        if task.missing_polls >= 3 and now - task.submitted_at > 10 and task.ended_since is None:
                            task.ended_since = now
                    else:
                        task.missing_polls = 0
                        state, reason = entry
                        if state in _SLURM_RUNNING and not task.started:
                            task.started = True
                            start(i)
                        if state in _SLURM_ENDED:
                            if task.ended_since is None:
                                task.ended_since = now
                            task.ended_state = state + (f" ({reason})" if reason and reason != "None" else "")
                        else:  # requeued after preemption: it lives again
                            task.ended_since, task.ended_state = None, ""
                    if task.ended_since is not None and now - task.ended_since >= _RESULT_GRACE_S:
                        finish(i, _slurm_lost(task, groups[i]))
                if any(results[i] is None for i in tasks):
                    time.sleep(delay)
                    delay = min(delay * 1.5, max(1.0, options.slurm_poll_s))
        except BaseException:
            if options.slurm_cancel_on_interrupt:
                _scancel(sorted({str(t.job.job_id).split("_")[0] for i, t in tasks.items() if results[i] is None}))
            raise
    return results  # a pack that never finished (only on an exception) stays None
