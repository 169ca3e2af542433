"""Run records: one JSON file per run, written atomically, versioned.

Schema (``schema_version`` 1); every record has these top-level keys:

- ``schema_version`` (int), ``run_id`` (16 hex chars, hash of the run's identity), ``label``.
- ``suite``, ``task``, ``method``, ``seed``, ``protocol``.
- ``status``: ``"ok"`` or ``"failed"``; ``error``: null, or ``{type, message, traceback}``.
- ``metrics``: ``top1`` (percent, the protocol's reported number: final-epoch test accuracy for
  ``vtab1k``/``tune``, test at the best-validation epoch for ``fgvc``, best test epoch for
  ``legacy-best-test``), ``top1_final`` (test at the last epoch), ``selected_epoch``,
  ``curve`` (list of ``{epoch, split, top1}``), ``train_loss`` (mean loss per epoch), and for
  ``tune`` the grid in ``tuning``.
- ``params``: the parameter accounting (:class:`petlbench.ParamCounts`).
- ``config``: ``method_hparams``, ``train`` (fully resolved), ``protocol``, ``backbone``,
  ``backbone_kwargs``, ``pretrained``, ``normalization``, ``splits`` (train/eval split names and sizes).
- ``efficiency``: ``train_time_s``, ``train_images_per_s``, ``eval_time_s``, ``peak_gpu_mem_allocated``,
  ``peak_gpu_mem_reserved`` (bytes, training steps only; null on CPU), ``eval_peak_gpu_mem_allocated``,
  ``eval_peak_gpu_mem_reserved`` (the evaluations', measured apart), ``trainable_state_bytes``,
  ``compiled`` (true only when every training step ran compiled code; false with ``compile_error``
  when torch.compile failed or dynamo fell back to eager), with ``compile_graphs_built`` (graphs
  compiled during this run; 0 when it reused the process's), ``compile_graph_breaks`` and
  ``compile_backend`` when compiling; ``precision`` (the resolved arithmetic: ``requested``,
  ``autocast``, ``grad_scaler``, ``tf32``, ``reason``), ``evaluated_merged`` (a mergeable method is
  evaluated merged), and the deployed model's batch-1 latency next to the plain backbone's:
  ``deployed`` (merged/unmerged), ``latency_b1_s``, ``plain_latency_b1_s``, ``latency_ratio``.
- ``provenance``: ``petlbench_version``, ``git_commit``, ``git_dirty``, ``python``, ``torch``,
  ``timm``, ``device``, ``hostname``, ``weights_sha256``, ``weights_source``, ``data_root``,
  ``data_fingerprint`` (per split), ``start_time``, ``end_time`` (ISO 8601, UTC).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
        "status": status,
        "error": None,
        "metrics": {},
        "params": {},
        "config": {},
        "efficiency": {},
        "provenance": {},
    }


def write_record(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``path`` atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing, corrupt or of another schema version."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return None
    return data


def is_done(path: str | os.PathLike) -> bool:
    """A finished run: a readable record of this schema whose status is ok."""
    record = read_record(path)
    return record is not None and record.get("status") == "ok"
