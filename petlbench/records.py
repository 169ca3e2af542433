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
  ``legacy-best-test``), ``top1_final`` (test at the last epoch), ``selected_epoch``,
  ``curve`` (list of ``{epoch, split, top1}``), ``train_loss`` (mean loss per epoch), and for
  ``tune`` the grid in ``tuning``.
- ``params``: the parameter accounting (:class:`petlbench.ParamCounts`).
- ``config``: ``method_hparams``, ``train`` (fully resolved), ``protocol``, ``backbone``,
  ``backbone_kwargs``, ``pretrained``, ``method_code`` (``{distribution, version}``, or ``{module,
  source_sha256}`` for a method registered from a script), ``normalization``, ``splits``
  (train/eval split names and sizes).
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
from pathlib import Path
from typing import Any

from petlbench.errors import PetlbenchError

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


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``path`` atomically: a reader sees the old file or the new one, never half.

    A record that is not ``ok`` never replaces an ``ok`` record of the same run: when two sweeps
    share an output folder, a failed (or killed) attempt must not erase a finished result. The
    check and the rename happen under a lock on the record's folder, so they cannot interleave
    with another writer's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        with _folder_lock(path.parent):
            if record.get("status") != "ok":
                current = read_record(path)
                if current is not None and current.get("status") == "ok" \
                        and current.get("run_id") == record.get("run_id"):
                    log.warning("kept the ok record %s; not replaced by this %s attempt", path, record.get("status"))
                    Path(tmp).unlink(missing_ok=True)
                    return path
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<folder>/.records.lock`` (best effort where locks are unsupported)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder / ".records.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a folder we may replace files in but not create one: go on unlocked
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
    """The record at ``path``, or None when it is missing, corrupt or of another schema version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: `[[[[...`, corrupt like any other
        return None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return None
    return data


def is_done(path: str | os.PathLike) -> bool:
    """A finished run: a readable record of this schema whose status is ok."""
    record = read_record(path)
    return record is not None and record.get("status") == "ok"


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
