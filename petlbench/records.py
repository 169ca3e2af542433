"""Run records: one JSON file per run, written atomically, versioned.

Schema (``schema_version`` 1); every record has these top-level keys:

- ``schema_version`` (int), ``run_id`` (16 hex chars, hash of the run's identity), ``label``.
- ``suite``, ``task``, ``method``, ``seed``, ``protocol``.
- ``identity``: everything ``run_id`` hashes (:meth:`petlbench.runspec.RunSpec.identity`), including
  ``method_code`` (the method's distribution and version), so a tool can tell which planned run a
  record belongs to and whether another version of the method's code made it.
- ``status``: ``"ok"`` or ``"failed"``; ``error``: null, or ``{type, message, traceback}``.
- ``metrics``: ``top1`` (percent, the protocol's reported number: final-epoch test accuracy for
  ``vtab1k``/``tune``, test at the best-validation epoch for ``fgvc``, best test epoch for
  ``legacy-best-test``; under ``paper``/``paper-best-test`` what the recipe selects),
  ``selection`` (``final`` | ``val`` | ``tune`` | ``best-test``, what was selected),
  ``selected_on`` (``val`` or ``test`` when an epoch was selected), ``top1_final`` (test at the last epoch), ``selected_epoch``,
  ``curve`` (list of ``{epoch, split, top1}``), ``train_loss`` (mean loss per epoch), and for
  ``tune`` the grid in ``tuning``.
- ``params``: the parameter accounting (:class:`petlbench.ParamCounts`).
- ``config``: ``method_hparams``, ``train`` (fully resolved), ``protocol``, ``backbone``,
  ``backbone_kwargs``, ``pretrained``, ``method_code`` (``{distribution, version}``, or ``{module,
  source_sha256}`` for a method registered from a script), ``normalization``, ``splits``
  (train/eval split names and sizes), ``recipe`` (``{name: harmonised | paper, source,
  differences}``: which training recipe ran; see docs/recipes.md) and ``effective`` (what the
  engine did with ``train``: the peak ``lr`` used after ``lr_base_batch`` scaling,
  ``epochs_trained`` with the cooldown, ``steps_per_epoch``, ``evaluated``: ``ema`` or ``trained``
  weights, ``probe_on_features``).
- ``efficiency``: ``train_time_s``, ``train_images_per_s``, ``eval_time_s``, ``peak_gpu_mem_allocated``,
  ``peak_gpu_mem_reserved`` (bytes, training steps only; null on CPU), ``eval_peak_gpu_mem_allocated``,
  ``eval_peak_gpu_mem_reserved`` (the evaluations', measured apart), ``trainable_state_bytes``,
  ``compiled`` (true only when every training step ran compiled code; false with ``compile_error``
  when torch.compile failed or dynamo fell back to eager), with ``compile_graphs_built`` (graphs
  compiled during this run; 0 when it reused the process's), ``compile_graph_breaks`` and
  ``compile_backend`` when compiling; ``precision`` (the resolved arithmetic: ``requested``,
  ``autocast``, ``grad_scaler``, ``tf32``, ``reason``), ``evaluated_merged`` (a mergeable method is
  evaluated merged), and the deployed model's batch-1 latency next to the plain backbone's:
  ``deployed`` (merged/unmerged), ``merged_backbone_kwargs`` (timm arguments the merged model needs
  beyond the run's, e.g. ``{"qkv_bias": true}`` when a shift was folded into a bias-less qkv), ``latency_b1_s``, ``plain_latency_b1_s``, ``latency_ratio`` and its
  relative half-spread ``latency_ratio_spread``; ``concurrency`` (``parallel_runs`` on the machine,
  ``torch_threads``, ``device``): under which load ``train_time_s`` was measured.
- ``provenance``: ``petlbench_version``, ``git_commit``, ``git_dirty``, ``method_code`` (distribution,
  version, ``class``, ``source_sha256`` of its file, ``display_name``), ``python``, ``torch``,
  ``timm``, ``device``, ``hostname``, ``weights_sha256``, ``weights_source``, ``data_root``,
  ``data_fingerprint`` (per split), ``start_time``, ``end_time`` (ISO 8601, UTC).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petlbench.errors import PetlbenchError
from petlbench.safeio import TooLarge, read_bounded, temporary_beside

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "run_id", "suite", "task", "method", "seed", "status", "metrics", "params",
            "config", "efficiency", "provenance")


def base_record(spec: Any, status: str) -> dict[str, Any]:
    """The identity part every record of ``spec`` (a RunSpec) starts from, whoever writes it."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": spec.run_id,
        "label": spec.label,
        "suite": spec.suite,
        "task": spec.task,
        "method": spec.method,
        "seed": spec.seed,
        "protocol": spec.protocol,
        "identity": spec.identity() if hasattr(spec, "identity") else {},
        "status": status,
        "error": None,
        "metrics": {},
        "params": {},
        "config": {},
        "efficiency": {},
        "provenance": {},
    }


#: No record petlbench writes comes near this (a long curve and a tuning grid are a few hundred kB);
#: a larger ``*.json`` in a results folder is not read (a 3 GB sparse file would exhaust memory).
MAX_RECORD_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Stored:
    """What lies at a record's path, as far as this petlbench can tell.

    ``record``: a record of this schema version (any content), else None. ``keep``: why the file
    must never be replaced by this petlbench (it cannot be read, it is of a newer schema version,
    it is too large to be a record of ours or a folder), else None. ``problem``: why an existing
    file is not a record (corrupt, another schema version, special file); such files are replaced.
    """

    record: dict[str, Any] | None = None
    keep: str | None = None
    problem: str | None = None


def inspect_record(path: str | os.PathLike) -> Stored:
    """Read the record at ``path`` (regular files of at most :data:`MAX_RECORD_BYTES` only), saying
    what is there when it is not a usable record of this schema."""
    try:
        raw = read_bounded(path, MAX_RECORD_BYTES)
    except FileNotFoundError:
        return Stored()
    except TooLarge as exc:
        return Stored(keep=f"is {exc}")
    except OSError as exc:
        if os.path.isdir(path):  # cannot be replaced by a file anyway
            return Stored(keep="is a folder")
        if exc.errno is None:  # open_regular: a FIFO, a device: not data, so it may be replaced
            return Stored(problem=str(exc))
        return Stored(keep=f"cannot be read ({exc.strerror or exc})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: `[[[[...`, corrupt like any other
        return Stored(problem="corrupt (not UTF-8 JSON)")
    if not isinstance(data, dict):
        return Stored(problem="not a run record")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        return Stored(keep=f"is of schema_version {version}, newer than the {SCHEMA_VERSION} this petlbench "
                           "reads and writes")
    if version != SCHEMA_VERSION:
        return Stored(problem=f"schema_version {version!r}")
    return Stored(record=data)


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``path`` atomically: a reader sees the old file or the new one, never half.

    The file gets the permissions ``open`` would give it (``0666`` less the umask), so a folder
    shared by a group stays readable by the group. A record that is not ``ok`` never replaces an
    ``ok`` record of the same run: when two sweeps share an output folder, a failed (or killed)
    attempt must not erase a finished result. Nothing ever replaces a file this petlbench cannot
    read or does not understand (another user's unreadable record, a newer schema version): a
    warning says so and the file stays. The check and the rename happen under a lock on the
    record's folder, so they cannot interleave with another writer's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        with _folder_lock(path.parent):
            current = inspect_record(path)
            kept = None
            if current.keep is not None:
                kept = f"kept {path}: it {current.keep}; not replaced by this {record.get('status')} attempt"
            elif record.get("status") != "ok" and current.record is not None \
                    and current.record.get("status") == "ok" and current.record.get("run_id") == record.get("run_id"):
                kept = f"kept the ok record {path}; not replaced by this {record.get('status')} attempt"
            if kept is not None:
                log.warning("%s", kept)
                tmp.unlink(missing_ok=True)
                return path
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<folder>/.records.lock`` (best effort where locks are unsupported).

    The lock file is created like ``open`` creates files (``0666`` less the umask), so everyone
    who shares the folder can lock it; one that is not writable for us is locked read-only
    (``flock`` needs no write access on local disks).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = folder / ".records.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except PermissionError:
        try:
            fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = -1
    except OSError:
        fd = -1
    if fd < 0:  # a folder we may replace files in but not create one: go on unlocked
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing, unreadable, corrupt or of another schema version."""
    return inspect_record(path).record


def is_finished(record: dict[str, Any] | None) -> bool:
    """Whether ``record`` (as :func:`read_record` returns it) is a result: an ``ok`` record that
    ``petlbench report`` can show. One the report would skip (no ``metrics``, ``provenance`` not
    an object, a number out of range) is not, so the sweep runs it again."""
    from petlbench.report.loading import record_problem  # the report's rules (no pandas imported)

    return record is not None and record.get("status") == "ok" and record_problem(record) is None


def is_done(path: str | os.PathLike) -> bool:
    """A finished run: the record at ``path`` is a result (:func:`is_finished`)."""
    return is_finished(read_record(path))


def check_output(output: str | os.PathLike, folders: Iterable[str | os.PathLike] = (), *,
                 create: bool = True) -> Path:
    """Make sure records can be written under ``output`` before anything runs.

    Creates the folder (and each record folder in ``folders``) and writes and removes a probe
    file in each: an output that is a file, lies below a file, or is read-only is one error line
    up front rather than a sweep whose every result is lost at the end. With ``create=False``
    nothing is created (the CLI checks this early, before validating the rest of the input).
    """
    root = Path(output).expanduser()
    if not create:
        if root.exists():
            _check_folder(root, root)
        else:
            above = next(p for p in root.parents if p.exists() or p == p.parent)
            what, fix = "--output", "Fix: pass --output a folder you can write to (it is created if missing)."
            if not above.is_dir():
                raise PetlbenchError(f"{what} {root} cannot be created: it lies below the file {above}. {fix}")
            if not os.access(above, os.W_OK | os.X_OK):
                raise PetlbenchError(f"{what} {root} cannot be created: {above} is not writable. {fix}")
        return root
    for folder in dict.fromkeys([root, *(Path(f).expanduser() for f in folders)]):
        _check_folder(root, folder)
    return root


def _check_folder(root: Path, folder: Path) -> None:
    what = "--output" if folder == root else f"--output {root}: record folder"
    fix = "Fix: pass --output a folder you can write to (it is created if missing)."
    if folder.exists() and not folder.is_dir():
        raise PetlbenchError(f"{what} {folder} is a file, not a folder. {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        above = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        where = f"it lies below the file {above}" if above else "a part of its path is a file"
        raise PetlbenchError(f"{what} {folder} cannot be created: {where}. {fix}") from None
    except OSError as exc:
        raise PetlbenchError(f"{what} {folder} cannot be created ({exc.strerror or exc}). {fix}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".petlbench-write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PetlbenchError(f"{what} {folder} cannot hold records ({exc.strerror or exc}: read-only?). {fix}") from None
