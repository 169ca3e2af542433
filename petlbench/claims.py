"""Claims: two sweeps on one output folder (two shells, two machines on a shared disk) never run
the same run at once and never lose a finished result.

Before a run starts, its process creates ``<record folder>/.<run_id>.claim`` atomically (a
hard link of a fully written private file, which fails if the claim exists, on local disks and
on NFS; ``O_EXCL`` where links are missing), holding its host, pid, process start time and a random
token, and touches it every :func:`heartbeat_s` seconds while the run goes on. Another sweep
that finds the claim skips the run ("running in another sweep"); it takes the claim over only
when the claim is stale: its owner is a dead process on this host (same boot and pid namespace,
and the pid's start time matches, so a reused pid does not count as alive), it is the same Slurm
job requeued after preemption (a lower ``SLURM_RESTART_COUNT``), or its heartbeat is older than :func:`stale_after_s`
(``PETLBENCH_CLAIM_STALE_S``, default 600 s; the only test for owners on other hosts). Ages are
measured on the shared disk's clock (:func:`disk_now`), never by comparing this host's clock
with an mtime the disk stamped: hosts whose clocks disagree with the disk's by more than the
timeout neither break live claims nor keep dead ones. Something at a claim's name that is not
a regular file (a FIFO, a folder) is not a claim: it is never read and is moved aside at once.
A run is also skipped when, after the claim, its record turns out
to be ``ok`` and newer than this sweep: another sweep finished it in the meantime. Finally,
:func:`petlbench.records.write_record` never replaces an ``ok`` record by a failed one.

Hidden claim files are ignored by ``petlbench report``; a run's claim is removed when it ends.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.records import base_record, read_record
from petlbench.runspec import RunSpec
from petlbench.safeio import read_bounded, temporary_beside

STALE_ENV = "PETLBENCH_CLAIM_STALE_S"
DEFAULT_STALE_S = 600.0
#: Status of the (unwritten) record returned for a run another sweep holds.
CLAIMED = "claimed"


def stale_after_s() -> float:
    """Seconds without a heartbeat after which a claim of another host is considered abandoned."""
    try:
        value = float(os.environ.get(STALE_ENV, DEFAULT_STALE_S))
    except ValueError:
        return DEFAULT_STALE_S
    return value if value > 0 else DEFAULT_STALE_S


def heartbeat_s() -> float:
    """How often a live claim is touched: well inside the stale timeout."""
    return max(0.05, min(30.0, stale_after_s() / 5))


def claim_path(record_path: str | os.PathLike) -> Path:
    record_path = Path(record_path)
    return record_path.with_name(f".{record_path.stem}.claim")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _host_key() -> str:
    """This host *and* pid namespace: two containers with one hostname must not judge each other's pids."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(Path(path).read_text().strip())
        except OSError:
            pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


def _slurm_job() -> str | None:
    """The Slurm job id (one per array task, kept when Slurm requeues a preempted job)."""
    return os.environ.get("SLURM_JOB_ID") or None


def _slurm_restarts() -> int:
    """How often Slurm requeued this job: a claim from a lower count is from a life that ended."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` on this host is still the process that wrote the claim."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        pass
    now = _proc_start(pid)
    return started is None or now is None or now == started


#: A claim is a few hundred bytes; anything much larger is not one (and is not read).
MAX_CLAIM_BYTES = 64 * 1024


def _read(path: Path) -> dict[str, Any] | None:
    """The claim's content; None when unreadable, corrupt or not a regular file (a FIFO is never
    opened for a blocking read: it would hang the sweep)."""
    try:
        data = json.loads(read_bounded(path, MAX_CLAIM_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def disk_now(folder: Path) -> float:
    """The current time on the clock of the disk that holds ``folder``.

    Modification times of files on a shared disk are stamped by its server, and the hosts of a
    cluster may disagree with it (and with each other) by minutes. A claim's age is the disk's
    "now" minus the claim's mtime, both from the same clock: the mtime of a probe file created
    here and now. Falls back to this host's clock where nothing can be created.
    """
    try:
        fd, probe = temporary_beside(folder / "petlbench-clock")
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def owner_text(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another sweep (claim file being written)"
    return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('started')}"


def is_stale(path: Path, owner: dict[str, Any] | None, stale_after: float | None = None) -> bool:
    """Whether the claim at ``path`` may be taken over (its owner is gone or silent too long).

    Its age is measured on the disk's clock (:func:`disk_now`), not this host's. Something at
    the claim's name that is not a regular file (a FIFO, a folder) was not made by petlbench and
    claims nothing: stale at once.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return True
    except OSError:  # e.g. a symlink loop: not a claim either
        return True
    if not stat.S_ISREG(st.st_mode):
        return True
    age = disk_now(path.parent) - st.st_mtime
    if owner is None:  # unreadable: only a crash mid-write on a disk without hard links leaves one
        return age > min(30.0, stale_after if stale_after is not None else stale_after_s())
    if owner.get("slurm_job") is not None and owner.get("slurm_job") == _slurm_job() \
            and isinstance(owner.get("slurm_restarts"), int) and owner["slurm_restarts"] < _slurm_restarts():
        return True  # our own Slurm job, requeued after preemption: its earlier life is over
    if owner and owner.get("host_key") == _host_key() and isinstance(owner.get("pid"), int) \
            and not _alive(owner["pid"], owner.get("pid_start")):
        return True
    return age > (stale_after if stale_after is not None else stale_after_s())


@dataclass
class Claim:
    """A held claim; :meth:`release` (or the context manager) removes it."""

    path: Path
    token: str
    info: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def held(self) -> bool:
        data = _read(self.path)
        return data is not None and data.get("token") == self.token

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self.held():  # taken over after we looked stale: stop touching someone else's claim
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s(),), daemon=True,
                                        name=f"petlbench-claim-{self.path.name}")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class Busy:
    """The run is claimed by a live owner."""

    path: Path
    owner: dict[str, Any] | None


def acquire(record_path: str | os.PathLike, stale_after: float | None = None) -> Claim | Busy:
    """Claim the run whose record is ``record_path``; :class:`Busy` when a live owner holds it."""
    path = claim_path(record_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner: dict[str, Any] | None = None
    for _ in range(5):
        token = secrets.token_hex(16)
        info = {"token": token, "host": socket.gethostname(), "host_key": _host_key(), "pid": os.getpid(),
                "pid_start": _proc_start(os.getpid()), "slurm_job": _slurm_job(),
                "slurm_restarts": _slurm_restarts(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if not _create(path, info):
            owner = _read(path)
            if not is_stale(path, owner, stale_after):
                return Busy(path, owner)
            _break(path, owner)
            continue
        claim = Claim(path, token, info)
        claim.start_heartbeat()
        return claim
    return Busy(path, owner)


def _create(path: Path, info: dict[str, Any]) -> bool:
    """Create the claim file with its content in one step; False if a claim exists.

    The content is written to a private file first and hard-linked to the claim's name (link
    fails if the name exists: atomic, also on NFS), so a process killed at any moment never
    leaves an empty claim that nobody can judge. File systems without hard links get
    ``O_EXCL`` plus a write.
    """
    _sweep_temporaries(path)
    tmp = path.with_name(f"{path.name}.{info['token'][:12]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as open does
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _sweep_temporaries(path: Path, older_than_s: float = 60.0) -> None:
    """Remove this claim's private files left by processes killed while creating or breaking one
    (their age on the disk's clock, so a host whose clock runs ahead never removes a live one)."""
    leftovers = [*path.parent.glob(f"{path.name}.*.tmp"), *path.parent.glob(f"{path.name}.stale.*")]
    if not leftovers:
        return
    now = disk_now(path.parent)
    for leftover in leftovers:
        try:
            if now - leftover.stat().st_mtime > older_than_s:
                _remove(leftover)
        except OSError:
            pass


def _remove(path: Path) -> None:
    """Remove a file, FIFO or empty folder moved aside; anything else stays (never delete a tree)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):  # unlink of a folder: EISDIR on Linux, EPERM elsewhere
        try:
            path.rmdir()
        except OSError:
            pass
    except OSError:
        pass


def _break(path: Path, judged: dict[str, Any] | None) -> None:
    """Remove a stale claim, atomically: rename it aside, then make sure it is the one judged stale.

    Two sweeps may judge the same claim stale at once; the rename lets only one of them move it.
    If what was moved is a fresh claim made in between by a third party, it is put back.
    """
    aside = path.with_name(f"{path.name}.stale.{secrets.token_hex(6)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read(aside)
    same = (moved or {}).get("token") == (judged or {}).get("token")
    if not same and moved is not None and not is_stale(aside, moved):
        try:
            os.link(aside, path)  # put the live claim back (fails if yet another claim exists)
        except OSError:
            pass
    _remove(aside)


def _finished_since(spec: RunSpec, since: float) -> dict[str, Any] | None:
    """The run's ok record if it was written after ``since`` (this host's clock; by another sweep),
    else None. The record's mtime is compared on the disk's clock: ``since`` is moved by the
    difference between the disk's clock and this host's, measured now."""
    path = spec.record_path
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    since += disk_now(path.parent) - time.time()
    if mtime < since:  # no slack: --force right after a sweep must redo what that sweep wrote
        return None
    record = read_record(path)
    if record is None or record.get("status") != "ok" or record.get("run_id") != spec.run_id:
        return None
    return record


def claimed_record(spec: RunSpec, busy: Busy) -> dict[str, Any]:
    """What a launcher reports for a run another sweep is running (never written to disk)."""
    record = base_record(spec, CLAIMED)
    record["error"] = {"type": "Claimed", "message": f"running in another sweep: {owner_text(busy.owner)} "
                                                     f"({busy.path})"}
    return record


def run_group_claimed(execute_group: Callable[[list[RunSpec]], list[dict[str, Any]]], specs: list[RunSpec], *,
                      since: float) -> list[dict[str, Any]]:
    """Run a pack of ``specs`` (runs trained together, see ``petlbench run --pack``) through
    ``execute_group`` while holding the claim of every member.

    Every member is claimed before any trains; a member another sweep holds comes back as a
    ``claimed`` record and one another sweep finished as that sweep's record, and only the members
    this process holds train (packed if two or more are left). Returns the records in ``specs`` order.

    ``since`` is when this sweep's launch began (this host's clock): an ``ok`` record newer than
    that was written by another sweep, so the run is not repeated (an older one is redone, which
    is what ``--force`` asked for). Records are dated on the disk's clock, so a host whose clock
    differs from the shared disk's does not take a new record for an old one. Top-level so that ``functools.partial(run_group_claimed, execute_group, since=...)`` pickles.
    """
    out: list[dict[str, Any] | None] = [None] * len(specs)
    held: list[tuple[int, Claim]] = []
    try:
        for i, spec in enumerate(specs):
            done = _finished_since(spec, since)
            if done is not None:
                out[i] = done
                continue
            claim = acquire(spec.record_path)
            if isinstance(claim, Busy):
                out[i] = claimed_record(spec, claim)
            else:
                held.append((i, claim))
        mine = []
        for i, _claim in held:
            done = _finished_since(specs[i], since)  # finished while we were claiming
            if done is not None:
                out[i] = done
            else:
                mine.append(i)
        if mine:
            records = execute_group([specs[i] for i in mine])
            if len(records) != len(mine):
                raise TypeError(f"the pack's execute returned {len(records)} records for {len(mine)} runs")
            for i, record in zip(mine, records, strict=True):
                out[i] = record
    finally:
        for _i, claim in held:
            claim.release()
    return [r for r in out if r is not None]
