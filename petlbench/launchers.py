"""Execution backends: run a list of :class:`~petlbench.runspec.RunSpec` inline, on every GPU of
this machine, or as a Slurm job array.

Every launcher has the same contract, so the sweep logic does not care where runs happen:

- ``execute(spec) -> record`` runs one spec and writes its record (the engine's
  :func:`petlbench.runner.execute_spec` by default). It is passed in so tests can inject fakes,
  and for ``local``/``slurm`` it must be picklable (a top-level function or a ``functools.partial``
  of one), because it runs in another process.
- ``on_start(spec)`` and then ``on_done(spec, record)`` are called exactly once per spec, in the
  calling process, as runs start and finish (progress bars hang off these).
- :func:`launch` returns the records in the order of ``specs``, whatever order they finished in.
- A run whose process dies (segfault, ``os._exit``, OOM killer, Slurm failure) never hangs or
  aborts the sweep: it is reported as a failed record, written to ``spec.record_path`` unless the
  engine managed to write one, and the other runs go on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.errors import PetlbenchError, did_you_mean
from petlbench.records import base_record, write_record
from petlbench.runspec import RunSpec

LAUNCHERS = ("inline", "local", "slurm")

ExecuteFn = Callable[[RunSpec], dict[str, Any]]
StartFn = Callable[[RunSpec], Any]
DoneFn = Callable[[RunSpec, dict[str, Any]], Any]

log = logging.getLogger(__name__)


@dataclass
class LaunchOptions:
    """How to execute a sweep; each launcher reads only its own fields."""

    #: local: parallel runs. On GPUs at most one per GPU (fewer GPUs are used if smaller);
    #: on CPU defaults to half the usable cores.
    workers: int | None = None
    #: local: physical GPU ids to use (as nvidia-smi numbers them); None = every visible GPU,
    #: [] = CPU workers only.
    gpus: list[int] | None = None
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


# --------------------------------------------------------------------------------------------
# entry points


def default_execute(spec: RunSpec, device: str = "auto") -> dict[str, Any]:
    """The engine, imported lazily so that importing launchers (and pickling this) stays cheap."""
    from petlbench.runner import execute_spec

    return execute_spec(spec, quiet=True, device=device)


def launch(
    specs: Sequence[RunSpec],
    launcher: str = "inline",
    options: LaunchOptions | None = None,
    execute: ExecuteFn | None = None,
    on_start: StartFn | None = None,
    on_done: DoneFn | None = None,
) -> list[dict[str, Any]]:
    """Execute ``specs`` with ``launcher`` (inline | local | slurm); returns records in spec order.

    Raises :class:`PetlbenchError` for unusable options or an unreachable Slurm, before anything
    runs; run failures never raise, they come back as records with ``status == "failed"``.
    """
    if launcher not in LAUNCHERS:
        raise PetlbenchError(did_you_mean(launcher, LAUNCHERS, "launcher"))
    options = options or LaunchOptions()
    _validate(options)
    specs = list(specs)
    if execute is None:
        # A local worker is pinned to its one GPU, which it sees as device 0: "cuda:N" chose the GPU.
        worker_device = "cuda" if launcher == "local" and options.device.startswith("cuda:") else options.device
        execute = functools.partial(default_execute, device=worker_device)
    on_start = on_start or _noop
    on_done = on_done or _noop
    if not specs:  # nothing to run needs no cluster
        return []
    if launcher == "slurm":
        check_slurm(options)  # before anything is submitted
    if launcher == "inline":
        return _launch_inline(specs, execute, on_start, on_done)
    if launcher == "local":
        return _launch_local(specs, options, execute, on_start, on_done)
    return _launch_slurm(specs, options, execute, on_start, on_done)


def _noop(*_args: Any) -> None:
    return None


def _cuda_index(device: str) -> int:
    try:
        return int(device.split(":", 1)[1])
    except ValueError:
        raise PetlbenchError(f"--device {device!r} is not cuda:<index>. Fix: e.g. --device cuda:0") from None


def _validate(options: LaunchOptions) -> None:
    if options.workers is not None and options.workers < 1:
        raise PetlbenchError(f"workers must be at least 1, got {options.workers}.")
    if options.device not in ("auto", "cpu", "cuda") and not options.device.startswith("cuda:"):
        raise PetlbenchError(f"unknown device {options.device!r}. Use auto, cpu or cuda.")
    if options.device.startswith("cuda:"):
        _cuda_index(options.device)  # every launcher: a malformed index is one line before anything runs
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        raise PetlbenchError(f"threads per worker must be at least 1, got {options.threads_per_worker}.")
    if options.slurm_time_min < 1:
        raise PetlbenchError(f"--slurm-time must be at least 1 minute, got {options.slurm_time_min}.")
    if options.slurm_gpus_per_task < 0:
        raise PetlbenchError(f"--slurm-gpus-per-task must be 0 or more, got {options.slurm_gpus_per_task}.")
    if options.slurm_array_parallelism < 1:
        raise PetlbenchError(
            f"--slurm-array-parallelism must be at least 1, got {options.slurm_array_parallelism}."
        )


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
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("status") not in ("ok", "failed"):
        return None
    if data.get("run_id") not in (None, spec.run_id):
        return None
    return data


def _record_crash(spec: RunSpec, since: float, error_type: str, message: str) -> dict[str, Any]:
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


def _call_guarded(execute: ExecuteFn, spec: RunSpec) -> dict[str, Any]:
    """Run ``execute``; an exception it lets escape becomes a failed record instead of a crash."""
    started = time.time()
    try:
        record = execute(spec)
    except Exception as exc:  # the engine never raises, but a plugin or a fake may
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _record_crash(spec, started, type(exc).__name__, message)
    if not isinstance(record, dict):
        return _record_crash(spec, started, "TypeError", f"execute returned {type(record).__name__}, not a record")
    return record


# --------------------------------------------------------------------------------------------
# inline


def _launch_inline(specs: list[RunSpec], execute: ExecuteFn, on_start: StartFn, on_done: DoneFn) -> list[dict]:
    records: list[dict[str, Any]] = []
    for spec in specs:
        on_start(spec)
        record = _call_guarded(execute, spec)
        on_done(spec, record)
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# local: one process per GPU (or per share of the CPU cores)


@dataclass(frozen=True)
class Slot:
    """One worker process: the environment it starts with and its torch thread count."""

    name: str
    env: dict[str, str]
    threads: int


def usable_cpus() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def detect_gpus() -> list[int]:
    """Physical ids of the GPUs this process may use (honours CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch build with CUDA, no driver: a CPU machine
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if all(v.isdigit() for v in ids) and len(ids) >= count:
            return [int(v) for v in ids[:count]]
    return list(range(count))


#: Runs in flight at once on this machine (one per local worker), recorded with each run's train time.
PARALLEL_VAR = "PETLBENCH_PARALLEL_RUNS"
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def plan_local_slots(
    options: LaunchOptions, n_runs: int, gpus: list[int] | None = None, cpus: int | None = None
) -> list[Slot]:
    """Decide the local workers: one per GPU (pinned with CUDA_VISIBLE_DEVICES), else CPU workers
    sharing the cores so that parallel runs do not oversubscribe them."""
    cpus = cpus or usable_cpus()
    if gpus is None:
        gpus = [] if options.device == "cpu" else (options.gpus if options.gpus is not None else detect_gpus())
        if options.device.startswith("cuda:"):
            index = _cuda_index(options.device)
            if index >= len(gpus):
                raise PetlbenchError(f"--device {options.device}: only {len(gpus)} GPU(s) are visible. "
                                     f"Fix: --device cuda:0 .. cuda:{max(0, len(gpus) - 1)}, or --device cuda for all.")
            gpus = [gpus[index]]
    if options.device.startswith("cuda") and not gpus:
        raise PetlbenchError("--device cuda was asked for but no GPU is visible. Fix: use --device cpu.")
    if gpus:
        chosen = gpus[: options.workers] if options.workers else list(gpus)
        chosen = chosen[: max(1, n_runs)]
        threads = options.threads_per_worker or max(1, cpus // len(chosen))
        return [
            Slot(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": str(g), PARALLEL_VAR: str(len(chosen)),
                             **{v: str(threads) for v in _THREAD_VARS}}, threads)
            for g in chosen
        ]
    workers = options.workers or max(1, cpus // 2)
    workers = min(workers, max(1, n_runs))
    threads = options.threads_per_worker or max(1, cpus // workers)
    # Hide GPUs from CPU workers: a CPU run must not grab a device behind the user's back.
    env = {"CUDA_VISIBLE_DEVICES": "", PARALLEL_VAR: str(workers), **{v: str(threads) for v in _THREAD_VARS}}
    return [Slot(f"cpu{i}", env, threads) for i in range(workers)]


def _set_parent_death_signal() -> None:
    """Linux: have the kernel SIGTERM this worker if the parent dies without cleaning up (SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn: Any, execute: ExecuteFn, env: dict[str, str], threads: int) -> None:
    """A long-lived worker: receive (index, spec dict), run it, send (index, record); None stops it."""
    os.environ.update(env)  # already inherited at spawn; repeated for spawn methods that don't
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it terminates us on Ctrl-C
    _set_parent_death_signal()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, spec_dict = message
        record = _call_guarded(execute, RunSpec.from_dict(spec_dict))
        conn.send((index, record))


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Temporarily set variables so a spawned child starts with them (before it imports torch)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so cleanup (killing workers, scancel) runs."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker process disappeared"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with code {exitcode} before finishing the run"


@dataclass
class _Worker:
    slot: Slot
    process: Any
    conn: Any
    index: int | None = None
    started_at: float = 0.0


def _launch_local(
    specs: list[RunSpec], options: LaunchOptions, execute: ExecuteFn, on_start: StartFn, on_done: DoneFn
) -> list[dict[str, Any]]:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # fork would copy CUDA state and threads; spawn starts clean
    slots = plan_local_slots(options, len(specs))
    pending: deque[int] = deque(range(len(specs)))
    results: list[dict[str, Any] | None] = [None] * len(specs)
    workers: list[_Worker] = []

    def start_worker(slot: Slot) -> _Worker:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_worker_main, args=(child_conn, execute, slot.env, slot.threads),
                              name=f"petlbench-{slot.name}", daemon=False)
        with _environ(slot.env):
            process.start()
        child_conn.close()
        return _Worker(slot, process, parent_conn)

    def assign(worker: _Worker) -> None:
        """Give the worker the next run, or tell it to stop."""
        if not pending:
            worker.index = None
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            return
        index = pending.popleft()
        worker.index, worker.started_at = index, time.time()
        on_start(specs[index])
        with contextlib.suppress(OSError):  # died between runs: its sentinel reports it as this run's
            worker.conn.send((index, specs[index].to_dict()))

    def finish(index: int, record: dict[str, Any]) -> None:
        results[index] = record
        on_done(specs[index], record)

    def retire(worker: _Worker) -> None:
        workers.remove(worker)
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()

    with _sigterm_raises():
        try:
            for slot in slots:
                if not pending:
                    break
                worker = start_worker(slot)
                workers.append(worker)
                assign(worker)
            while any(w.index is not None for w in workers):
                busy = [w for w in workers if w.index is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for worker in busy:
                    got, dead = None, worker.process.sentinel in ready
                    if worker.conn in ready or dead:
                        try:
                            if worker.conn.poll():
                                got = worker.conn.recv()
                        except (EOFError, OSError):  # pipe closed: the process is going away
                            dead = True
                    if got is not None:
                        index, record = got
                        finish(index, record)
                        assign(worker)
                        if worker.index is None:
                            retire(worker)
                    elif dead:
                        worker.process.join(timeout=10)
                        if worker.process.is_alive():  # closed its pipe but hangs: finish it off
                            worker.process.kill()
                            worker.process.join()
                        index = worker.index
                        assert index is not None
                        reason = _death_reason(worker.process.exitcode)
                        record = _record_crash(specs[index], worker.started_at, "WorkerDied",
                                               f"{reason} ({worker.slot.name})")
                        worker.index = None
                        retire(worker)
                        finish(index, record)
                        if pending:  # a fresh process for the same GPU / core share
                            replacement = start_worker(worker.slot)
                            workers.append(replacement)
                            assign(replacement)
        finally:
            _stop_workers(workers)
    return [r for r in results if r is not None]


def _stop_workers(workers: list[_Worker]) -> None:
    """Terminate whatever still runs (Ctrl-C, SIGTERM, an error in a callback): promptly, then kill."""
    for worker in workers:
        if worker.process.is_alive() and worker.index is not None:
            worker.process.terminate()
        else:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
    deadline = time.monotonic() + 5.0
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        with contextlib.suppress(OSError):
            worker.conn.close()


# --------------------------------------------------------------------------------------------
# slurm (submitit job arrays)


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
    for var in _THREAD_VARS:
        os.environ.setdefault(var, cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(cpus))


try:
    from submitit.helpers import Checkpointable as _CheckpointableBase
except ImportError:  # submitit is only needed for the slurm launcher
    _CheckpointableBase = object  # type: ignore[assignment,misc]


class SlurmRun(_CheckpointableBase):  # type: ignore[misc,valid-type]
    """The callable each array task runs. Checkpointable, so on preemption (or time-out) submitit
    requeues it: the run restarts from scratch, which is safe because a record is only written
    when a run ends."""

    def __init__(self, execute: ExecuteFn) -> None:
        self.execute = execute

    def __call__(self, spec_dict: dict[str, Any]) -> dict[str, Any]:
        _slurm_job_setup()
        return _call_guarded(self.execute, RunSpec.from_dict(spec_dict))

    def checkpoint(self, spec_dict: dict[str, Any]) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, spec_dict)


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


def _slurm_result(task: _SlurmTask, spec: RunSpec) -> dict[str, Any]:
    """The record a finished job returned, or a failed record saying why there is none."""
    from submitit.core.utils import UncompletedJobError

    try:
        record = task.job.result()
    except UncompletedJobError as exc:  # FailedJobError included: the callable raised in the job
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
        message = f"Slurm job {task.job.job_id}: " + (lines[-3] if len(lines) >= 3 else " ".join(lines))
        return _record_crash(spec, task.submitted_at, type(exc).__name__, message)
    except Exception as exc:  # unreadable result pickle and the like
        return _record_crash(spec, task.submitted_at, type(exc).__name__, f"Slurm job {task.job.job_id}: {exc}")
    if not isinstance(record, dict):
        return _record_crash(spec, task.submitted_at, "TypeError", f"Slurm job {task.job.job_id} returned no record")
    return record


def _slurm_lost(task: _SlurmTask, spec: RunSpec) -> dict[str, Any]:
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
    return _record_crash(spec, task.submitted_at, "UncompletedJobError", message)


def _scancel(job_ids: Sequence[str]) -> None:
    if not job_ids:
        return
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)
    log.warning("cancelled Slurm job(s) %s", ", ".join(job_ids))


def _launch_slurm(
    specs: list[RunSpec], options: LaunchOptions, execute: ExecuteFn, on_start: StartFn, on_done: DoneFn
) -> list[dict[str, Any]]:
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    folder = Path(options.slurm_folder or Path(specs[0].output) / ".slurm").absolute()
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_slurm_executor(folder, options)
    runner = SlurmRun(execute)
    results: list[dict[str, Any] | None] = [None] * len(specs)
    tasks: dict[int, _SlurmTask] = {}
    array_ids: list[str] = []

    def finish(index: int, record: dict[str, Any]) -> None:
        task = tasks.get(index)
        if task is None or not task.started:  # ended before a poll saw it running
            if task is not None:
                task.started = True
            on_start(specs[index])
        results[index] = record
        on_done(specs[index], record)

    with _sigterm_raises():
        try:
            size = max(1, options.slurm_max_array_size)
            for first in range(0, len(specs), size):
                chunk = list(range(first, min(first + size, len(specs))))
                try:
                    jobs = executor.map_array(runner, [specs[i].to_dict() for i in chunk])
                except (FailedJobError, FailedSubmissionError, subprocess.SubprocessError, OSError) as exc:
                    reason = str(exc).strip().splitlines()
                    reason_line = reason[-1] if reason else type(exc).__name__
                    if not array_ids:  # nothing is queued yet: a configuration problem, say so
                        raise PetlbenchError(
                            f"sbatch rejected the job array: {reason_line}. Check --slurm-partition/"
                            "--slurm-account/--slurm-qos/--slurm-time, or use --launcher local."
                        ) from exc
                    for i in chunk:
                        finish(i, _record_crash(specs[i], time.time(), "FailedSubmissionError",
                                                f"sbatch failed: {reason_line}"))
                    continue
                now = time.time()
                for i, job in zip(chunk, jobs, strict=True):
                    tasks[i] = _SlurmTask(i, job, now)
                array_ids.append(str(jobs[0].job_id).split("_")[0])
            log.info("submitted %d run(s) as Slurm job(s) %s", len(tasks), ", ".join(array_ids))

            delay = 1.0
            while any(results[i] is None for i in tasks):
                open_ids = sorted({str(t.job.job_id).split("_")[0] for i, t in tasks.items() if results[i] is None})
                states = _squeue_states(open_ids)
                now = time.time()
                for i, task in tasks.items():
                    if results[i] is not None:
                        continue
                    if _result_ready(task):
                        finish(i, _slurm_result(task, specs[i]))
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
                            on_start(specs[i])
                        if state in _SLURM_ENDED:
                            if task.ended_since is None:
                                task.ended_since = now
                            task.ended_state = state + (f" ({reason})" if reason and reason != "None" else "")
                        else:  # requeued after preemption: it lives again
                            task.ended_since, task.ended_state = None, ""
                    if task.ended_since is not None and now - task.ended_since >= _RESULT_GRACE_S:
                        finish(i, _slurm_lost(task, specs[i]))
                if any(results[i] is None for i in tasks):
                    time.sleep(delay)
                    delay = min(delay * 1.5, max(1.0, options.slurm_poll_s))
        except BaseException:
            if options.slurm_cancel_on_interrupt:
                _scancel(sorted({str(t.job.job_id).split("_")[0] for i, t in tasks.items() if results[i] is None}))
            raise
    return [r for r in results if r is not None]
