"""The local launcher: one long-lived worker process per GPU of this machine (pinned with
``CUDA_VISIBLE_DEVICES``), or CPU workers sharing the cores so parallel runs do not oversubscribe them.

Workers are spawned (fork would copy CUDA state and threads) and fed one pack at a time (one run,
or ``--pack`` runs trained together) through a pipe; a worker that dies (segfault, OOM killer) costs
only its pack, whose runs become failed records, and a fresh worker takes its place for the rest.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from petlbench.errors import PetlbenchError
from petlbench.launch.common import (
    PARALLEL_VAR,
    THREAD_VARS,
    DoneFn,
    GroupExecuteFn,
    LaunchOptions,
    StartFn,
    call_guarded_group,
    cuda_index,
    record_crash,
    sigterm_raises,
)
from petlbench.runspec import RunSpec


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


#: Worker GPUs are numbered like nvidia-smi (PCI bus order), not CUDA's default "fastest first".
DEVICE_ORDER = "PCI_BUS_ID"


def _is_mig(device_id: str) -> bool:
    return device_id.upper().startswith("MIG-")


def nvidia_smi_devices(timeout_s: float = 30.0) -> list[str] | None:
    """``nvidia-smi -L`` as worker device ids, in its order: a GPU's index, or the UUIDs of its MIG
    instances where it has any (one worker each). None without a working nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    devices: list[str] = []
    gpu: str | None = None
    migs: list[str] = []

    def flush() -> None:
        if gpu is not None:
            devices.extend(migs or [gpu])

    for line in proc.stdout.splitlines():
        if m := re.match(r"\s*GPU (\d+):", line):
            flush()
            gpu, migs = m.group(1), []
        elif (m := re.match(r"\s*MIG .*\(UUID: (MIG-[^)\s]+)\)", line)) and gpu is not None:
            migs.append(m.group(1))
    flush()
    return devices


def detect_gpus() -> list[str]:
    """The devices this process may use, each as the ``CUDA_VISIBLE_DEVICES`` value that pins one
    worker to it: nvidia-smi indices, GPU UUIDs or MIG instance ids, as the user's own
    ``CUDA_VISIBLE_DEVICES`` names them (a worker's variable replaces the parent's, so an index
    would name a different GPU than the UUID it stood for)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch build with CUDA, no driver: a CPU machine
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if any(_is_mig(v) for v in ids):
            # CUDA enumerates at most one MIG instance per process, so device_count cannot
            # vouch for the list: every instance named gets its own worker.
            return ids
        return ids[:count]  # CUDA ignores everything from the first entry that names no device
    if count == 0:
        return []
    listed = nvidia_smi_devices()
    if listed and any(_is_mig(v) for v in listed):
        return listed
    return [str(i) for i in range(count)]


def _slot_name(device_id: str) -> str:
    return f"gpu{device_id}" if device_id.isdigit() else device_id


def plan_local_slots(
    options: LaunchOptions, n_runs: int, gpus: Sequence[int | str] | None = None, cpus: int | None = None
) -> list[Slot]:
    """Decide the local workers: one per GPU or MIG instance (pinned with CUDA_VISIBLE_DEVICES, GPUs
    numbered in PCI bus order like nvidia-smi), else CPU workers sharing the cores so that parallel
    runs do not oversubscribe them."""
    cpus = cpus or usable_cpus()
    if gpus is None:
        gpus = [] if options.device == "cpu" else (options.gpus if options.gpus is not None else detect_gpus())
        if options.device.startswith("cuda:"):
            index = cuda_index(options.device)
            if index >= len(gpus):
                raise PetlbenchError(f"--device {options.device}: only {len(gpus)} GPU(s) are visible. "
                                     f"Fix: --device cuda:0 .. cuda:{max(0, len(gpus) - 1)}, or --device cuda for all.")
            gpus = [gpus[index]]
    ids = [str(g).strip() for g in gpus]
    if options.device.startswith("cuda") and not ids:
        raise PetlbenchError("--device cuda was asked for but no GPU is visible. Fix: use --device cpu.")
    if ids:
        chosen = ids[: options.workers] if options.workers else ids
        chosen = chosen[: max(1, n_runs)]
        threads = options.threads_per_worker or max(1, cpus // len(chosen))
        order = os.environ.get("CUDA_DEVICE_ORDER", DEVICE_ORDER)  # an explicit choice of the user's stands
        return [
            Slot(_slot_name(g), {"CUDA_VISIBLE_DEVICES": g, "CUDA_DEVICE_ORDER": order, PARALLEL_VAR: str(len(chosen)),
                                 **{v: str(threads) for v in THREAD_VARS}}, threads)
            for g in chosen
        ]
    workers = options.workers or max(1, cpus // 2)
    workers = min(workers, max(1, n_runs))
    threads = options.threads_per_worker or max(1, cpus // workers)
    # Hide GPUs from CPU workers: a CPU run must not grab a device behind the user's back.
    env = {"CUDA_VISIBLE_DEVICES": "", PARALLEL_VAR: str(workers), **{v: str(threads) for v in THREAD_VARS}}
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


def _worker_main(conn: Any, execute: GroupExecuteFn, env: dict[str, str], threads: int) -> None:
    """A long-lived worker: receive (index, spec dicts of a pack), run it, send (index, records);
    None stops it."""
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
        index, spec_dicts = message
        records = call_guarded_group(execute, [RunSpec.from_dict(d) for d in spec_dicts])
        conn.send((index, records))


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


def launch_local(
    groups: list[list[RunSpec]], options: LaunchOptions, execute: GroupExecuteFn, on_start: StartFn,
    on_done: DoneFn,
) -> list[list[dict[str, Any]] | None]:
    """Run the packs in ``groups`` on the planned worker slots; returns their records, per group."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # fork would copy CUDA state and threads; spawn starts clean
    slots = plan_local_slots(options, len(groups))
    pending: deque[int] = deque(range(len(groups)))
    results: list[list[dict[str, Any]] | None] = [None] * len(groups)
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
        """Give the worker the next pack, or tell it to stop."""
        if not pending:
            worker.index = None
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            return
        index = pending.popleft()
        worker.index, worker.started_at = index, time.time()
        for spec in groups[index]:
            on_start(spec)
        with contextlib.suppress(OSError):  # died between runs: its sentinel reports it as this pack's
            worker.conn.send((index, [spec.to_dict() for spec in groups[index]]))

    def finish(index: int, records: list[dict[str, Any]]) -> None:
        results[index] = records
        for spec, record in zip(groups[index], records, strict=True):
            on_done(spec, record)

    def retire(worker: _Worker) -> None:
        workers.remove(worker)
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()

    with sigterm_raises():
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
                        index, records = got
                        finish(index, records)
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
                        records = [record_crash(spec, worker.started_at, "WorkerDied",
                                                f"{reason} ({worker.slot.name})") for spec in groups[index]]
                        worker.index = None
                        retire(worker)
                        finish(index, records)
                        if pending:  # a fresh process for the same GPU / core share
                            replacement = start_worker(worker.slot)
                            workers.append(replacement)
                            assign(replacement)
        finally:
            _stop_workers(workers)
    return results  # a pack that never finished (only on an exception) stays None


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
