"""What every launcher shares: the options, their validation, and the records a launcher writes
itself when a run dies before the engine could write one.

Imported by :mod:`petlbench.launch.inline`, :mod:`~petlbench.launch.local` and
:mod:`~petlbench.launch.slurm`; it imports none of them (the package imports one way).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from petlbench.errors import PetlbenchError
from petlbench.records import base_record, write_record
from petlbench.runspec import RunSpec

LAUNCHERS = ("inline", "local", "slurm")

ExecuteFn = Callable[[RunSpec], dict[str, Any]]
#: Runs one pack (a list of specs trained together, or a list of one) and returns one record per spec.
GroupExecuteFn = Callable[[list[RunSpec]], list[dict[str, Any]]]
StartFn = Callable[[RunSpec], Any]
DoneFn = Callable[[RunSpec, dict[str, Any]], Any]

#: Runs in flight at once on this machine (one per local worker), recorded with each run's train time.
PARALLEL_VAR = "PETLBENCH_PARALLEL_RUNS"
#: Thread-count variables set for local workers and Slurm jobs so parallel runs do not oversubscribe cores.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

log = logging.getLogger("petlbench.launch")


@dataclass
class LaunchOptions:
    """How to execute a sweep; each launcher reads only its own fields."""

    #: local: parallel runs. On GPUs at most one per GPU (fewer GPUs are used if smaller);
    #: on CPU defaults to half the usable cores.
    workers: int | None = None
    #: local: GPUs to use, as nvidia-smi numbers them (or GPU UUIDs / MIG instance ids); None =
    #: every visible GPU (or MIG instance), [] = CPU workers only.
    gpus: list[int | str] | None = None
    #: auto | cpu | cuda: handed to the engine; ``cpu`` also makes ``local`` ignore GPUs.
    device: str = "auto"
    #: local CPU workers: torch threads per worker (default: usable cores // workers).
    threads_per_worker: int | None = None
    slurm_partition: str | None = None
    slurm_time_min: int = 240
    slurm_account: str | None = None
    slurm_qos: str | None = None
    slurm_array_parallelism: int = 64
    slurm_mem_gb: float | None = None
    slurm_cpus_per_task: int | None = None
    #: GPUs per run; 0 for CPU-only clusters (no ``--gpus-per-node`` is sent then).
    slurm_gpus_per_task: int = 1
    #: submitit's folder (pickles, logs); default ``<output of the first spec>/.slurm``.
    slurm_folder: str | None = None
    #: Any other ``#SBATCH`` flag, e.g. ``{"constraint": "a100", "exclude": "node7"}``.
    slurm_parameters: dict[str, Any] = field(default_factory=dict)
    #: Longest pause between two ``squeue`` polls.
    slurm_poll_s: float = 10.0
    #: Slurm caps array sizes (MaxArraySize, 1001 by default); larger sweeps go in several arrays.
    slurm_max_array_size: int = 1000
    #: Ctrl-C / SIGTERM while waiting cancels the submitted jobs (else they keep running and
    #: write their records; re-running the sweep then skips them).
    slurm_cancel_on_interrupt: bool = True
    #: every launcher: runs sharing a frozen backbone (same task, method and settings; seeds differ)
    #: trained R at a time in one packed step; a local worker or a Slurm job runs one pack.
    pack: int = 1
    #: every launcher: train a ``tune`` grid's trials in one packed step.
    pack_tune: bool = False


def noop(*_args: Any) -> None:
    return None


def cuda_index(device: str) -> int:
    """N of ``cuda:N``; a malformed index is one line naming the option."""
    try:
        return int(device.split(":", 1)[1])
    except ValueError:
        raise PetlbenchError(f"--device {device!r} is not cuda:<index>. Fix: e.g. --device cuda:0") from None


def validate_options(options: LaunchOptions) -> None:
    """Reject unusable options before anything runs, whatever the launcher."""
    if options.workers is not None and options.workers < 1:
        raise PetlbenchError(f"workers must be at least 1, got {options.workers}.")
    if options.device not in ("auto", "cpu", "cuda") and not options.device.startswith("cuda:"):
        raise PetlbenchError(f"unknown device {options.device!r}. Use auto, cpu or cuda.")
    if options.device.startswith("cuda:"):
        cuda_index(options.device)  # every launcher: a malformed index is one line before anything runs
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise PetlbenchError(f"threads per worker must be at least 1, got {options.threads_per_worker}.")
    if isinstance(options.pack, bool) or not isinstance(options.pack, int) or options.pack < 1:
        raise PetlbenchError(f"--pack must be a whole number of runs of at least 1, got {options.pack!r}. "
                             "Fix: --pack 1 (one run at a time) or e.g. --pack 3 to train three seeds together.")
    if options.slurm_time_min < 1:
        raise PetlbenchError(f"--slurm-time must be at least 1 minute, got {options.slurm_time_min}.")
    if options.slurm_gpus_per_task < 0:
        raise PetlbenchError(f"--slurm-gpus-per-task must be 0 or more, got {options.slurm_gpus_per_task}.")
    if options.slurm_array_parallelism < 1:
        raise PetlbenchError(
            f"--slurm-array-parallelism must be at least 1, got {options.slurm_array_parallelism}."
        )


def worker_device(launcher: str, options: LaunchOptions) -> str:
    """The ``--device`` the engine gets inside a run's process.

    A local worker is pinned to its one GPU, which it sees as device 0, so ``cuda:N`` (which chose
    the GPU) becomes ``cuda`` there. A Slurm job sees only the GPUs Slurm gave it: ``cuda:N`` names a
    GPU of this machine, not of the job's node, so it becomes ``cuda`` for a single-GPU job and must
    be below ``--slurm-gpus-per-task`` otherwise; asking for CUDA in jobs that request no GPU is an error.
    """
    device = options.device
    if launcher == "local" and device.startswith("cuda:"):
        return "cuda"
    if launcher == "slurm" and device.startswith("cuda"):
        gpus = options.slurm_gpus_per_task
        if gpus == 0:
            raise PetlbenchError(f"--device {device} with --slurm-gpus-per-task 0: the jobs get no GPU. "
                                 "Fix: --slurm-gpus-per-task 1, or --device cpu / auto.")
        if device.startswith("cuda:"):
            index = cuda_index(device)
            if gpus == 1:
                return "cuda"
            if index >= gpus:
                raise PetlbenchError(f"--device {device}: each Slurm job has {gpus} GPU(s), seen as cuda:0 .. "
                                     f"cuda:{gpus - 1}. Fix: --device cuda, or a lower index.")
    return device


# --------------------------------------------------------------------------------------------
# records written by the launcher itself


def failed_record(spec: RunSpec, error_type: str, message: str) -> dict[str, Any]:
    """The record of a run that died before the engine could write one (same top-level keys)."""
    record = base_record(spec, "failed")
    record["error"] = {"type": error_type, "message": message}
    record["provenance"] = {"hostname": socket.gethostname(), "end_time": _utc_now()}
    return record


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fresh_record(spec: RunSpec, since: float) -> dict[str, Any] | None:
    """The record the engine wrote for this attempt (after ``since``), if it got that far."""
    path = spec.record_path
    try:
        if path.stat().st_mtime < since - 2.0:  # older: a previous attempt's record
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: a corrupt `[[[[...` file
        return None
    if not isinstance(data, dict) or data.get("status") not in ("ok", "failed"):
        return None
    if data.get("run_id") not in (None, spec.run_id):
        return None
    return data


def record_crash(spec: RunSpec, since: float, error_type: str, message: str) -> dict[str, Any]:
    """Keep the engine's record if it finished writing one; otherwise write a failed one."""
    record = _fresh_record(spec, since)
    if record is not None:
        return record
    record = failed_record(spec, error_type, message)
    try:
        write_record(spec.record_path, record)
    except OSError as exc:  # the sweep still learns about the failure through on_done
        log.warning("could not write the failed record %s: %s", spec.record_path, exc)
    return record


def call_guarded(execute: ExecuteFn, spec: RunSpec) -> dict[str, Any]:
    """Run ``execute``; an exception it lets escape becomes a failed record instead of a crash."""
    started = time.time()
    try:
        record = execute(spec)
    except Exception as exc:  # the engine never raises, but a plugin or a fake may
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return record_crash(spec, started, type(exc).__name__, message)
    if not isinstance(record, dict):
        return record_crash(spec, started, "TypeError", f"execute returned {type(record).__name__}, not a record")
    return record


def each(execute: ExecuteFn, specs: list[RunSpec]) -> list[dict[str, Any]]:
    """A pack run one spec at a time through a per-spec ``execute`` (top-level: pickles as a partial)."""
    return [call_guarded(execute, spec) for spec in specs]


def call_guarded_group(execute: GroupExecuteFn, specs: list[RunSpec]) -> list[dict[str, Any]]:
    """Run a pack; an exception, or a wrong answer, becomes one failed record per member (an
    engine record written meanwhile is kept)."""
    started = time.time()
    try:
        records = execute(specs)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [record_crash(s, started, type(exc).__name__, message) for s in specs]
    if not isinstance(records, list) or len(records) != len(specs) or not all(isinstance(r, dict) for r in records):
        return [record_crash(s, started, "TypeError", "execute returned no record per run of the pack") for s in specs]
    return records


# --------------------------------------------------------------------------------------------
# signals


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so cleanup (killing workers, scancel) runs."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while waiting on runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
