"""Execute one :class:`~petlbench.runspec.RunSpec`: data -> model -> engine -> record.

Protocols (named, and recorded with every number):

- ``vtab1k`` (default for VTAB-layout suites): train on the suite's ``train`` split
  (train800val200), report test accuracy after the **final** epoch. No selection on test.
- ``tune``: try every ``tune_lr`` x ``tune_weight_decay`` on ``tune_train`` (train800) scored
  on ``tune_val`` (val200) at the final epoch; retrain the best on ``train`` and report test at
  the final epoch.
- ``fgvc`` (default for FGVC): train on ``train``, keep the epoch with the best ``tune_val``
  accuracy (evaluated every ``eval_every`` epochs, every epoch by default), report test there.
- ``legacy-best-test``: what the official ARC/RepAdapter scripts do: the best test accuracy
  over evaluations every ``eval_every`` epochs (default 1). Selected on test; always labelled.

A run never raises: any failure (bad data, non-finite loss, out of memory, a plugin's
exception) becomes a record with ``status: "failed"`` and the reason.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import socket
import subprocess
import traceback
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from petlbench.config import parse_floats
from petlbench.errors import PetlbenchError
from petlbench.records import base_record, write_record
from petlbench.runspec import RunSpec

PROTOCOLS: dict[str, str] = {
    "vtab1k": "train on train800val200; test accuracy after the final epoch (no selection on test)",
    "tune": "lr x wd grid trained on train800 and scored on val200; best retrained on train800val200; "
            "final-epoch test accuracy",
    "fgvc": "train on train; epoch selected on val; test accuracy at that epoch",
    "legacy-best-test": "best test accuracy over epochs (the official scripts' selection on the TEST set; "
                        "not comparable with honest protocols)",
}


def default_protocol(layout: str) -> str:
    return "fgvc" if layout == "fgvc_json" else "vtab1k"


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        from petlbench.errors import did_you_mean

        raise PetlbenchError("--protocol: " + did_you_mean(name, PROTOCOLS, "protocol", label="Known"))
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def _git() -> tuple[str | None, bool | None]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PetlbenchError("--device cuda was asked for but no CUDA device is visible. Fix: use --device cpu.")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class _Data:
    """The splits of one task, decoded once and shared by every model a run trains."""

    def __init__(self, spec: RunSpec) -> None:
        from petlbench import data as D

        self.suite = D.get_suite(spec.suite)
        self.task = self.suite.resolve_task(spec.task)
        self.root = D.resolve_data_root(self.suite, spec.data_root)
        self.tspec = D.transform_spec(self.suite.transform, self.suite.image_size)
        self._cached: dict[str, Any] = {}
        self.fingerprints: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def split(self, role: str, limit: int) -> Any:
        from petlbench import data as D

        name = self.suite.split_for(role)
        if name not in self._cached:
            index = D.read_split(self.suite, self.task, name, self.root)
            if limit:
                index = index.take(min(limit, len(index)))
            self.fingerprints[name] = D.cached_fingerprint(index)
            self._cached[name] = D.load_images(index, self.tspec)
            self.sizes[name] = len(index)
        return self._cached[name]

    def loader(self, role: str, train: bool, cfg: dict[str, Any], norm: Any, seed: int, device: torch.device) -> Any:
        from petlbench.data import DeviceLoader

        cached = self.split(role, cfg["limit_train"] if train else cfg["limit_eval"])
        return DeviceLoader.for_split(
            cached, train=train, batch_size=cfg["batch_size"] if train else cfg["eval_batch_size"],
            normalization=norm, seed=seed, device=device, drop_last=cfg["drop_last"] if train else False,
        )


def _build(spec: RunSpec, cfg: dict[str, Any], classes: int, device: torch.device):
    from petlbench.model import create_model, init_head

    kwargs = {**spec.backbone_kwargs}
    for key in ("drop_path_rate", "drop_rate"):
        if cfg[key]:
            kwargs[key] = cfg[key]
    model = create_model(spec.backbone, spec.method, classes, pretrained=spec.pretrained, backbone_kwargs=kwargs,
                         **spec.method_hparams)
    init_head(model.backbone.head, cfg["head_init"])
    if spec.weights_sha256 and model.weights and model.weights.sha256 != spec.weights_sha256:
        raise PetlbenchError(f"weights file {spec.pretrained} changed since the sweep was planned "
                             f"(sha256 {model.weights.sha256[:12]} != {spec.weights_sha256[:12]}).")
    return model.to(device)


def _normalization(model, cfg: dict[str, Any]):
    from petlbench.data import resolve_normalization

    if cfg["normalization"] == "backbone":
        dc = model.data_config
        return resolve_normalization(mean=dc["mean"], std=dc["std"])
    return resolve_normalization(cfg["normalization"])


def _run(spec: RunSpec, device: torch.device, on_epoch: Callable | None, record: dict[str, Any]) -> None:
    from petlbench.accounting import count_params
    from petlbench.bench import deployed_latency
    from petlbench.engine import evaluate, train
    from petlbench.model import calibrate

    cfg = dict(spec.train)
    data = _Data(spec)
    classes = data.task.classes
    protocol = spec.protocol
    metrics: dict[str, Any] = {}

    if protocol == "tune":
        grid = []
        for lr in parse_floats(cfg["tune_lr"], "tune_lr"):
            for wd in parse_floats(cfg["tune_weight_decay"], "tune_weight_decay"):
                trial = {**cfg, "lr": lr, "weight_decay": wd}
                seed_everything(spec.seed)
                model = _build(spec, trial, classes, device)
                norm = _normalization(model, trial)
                tune_train = data.loader("tune_train", True, trial, norm, spec.seed, device)
                calibrate(model, tune_train, device)  # before the optimiser: what trains may depend on it
                res = train(model, tune_train, {"val": data.loader("tune_val", False, trial, norm, spec.seed, device)},
                            trial, device, seed=spec.seed)
                grid.append({"lr": lr, "weight_decay": wd, "val_top1": res.curve[-1]["top1"]})
        chosen = max(grid, key=lambda g: g["val_top1"])  # first best on ties: grid order is fixed
        cfg.update(lr=chosen["lr"], weight_decay=chosen["weight_decay"])
        metrics["tuning"] = {"grid": grid, "selected": {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"]}}

    seed_everything(spec.seed)
    model = _build(spec, cfg, classes, device)
    norm = _normalization(model, cfg)
    train_loader = data.loader("train", True, cfg, norm, spec.seed, device)
    calibration = calibrate(model, train_loader, device)  # gradient-based selection (SPT, GPS) sees train only
    if protocol == "fgvc":
        evals, select, every = {"val": data.loader("tune_val", False, cfg, norm, spec.seed, device)}, "val", \
            cfg["eval_every"] or 1
    elif protocol == "legacy-best-test":
        evals, select, every = {"test": data.loader("test", False, cfg, norm, spec.seed, device)}, "test", \
            cfg["eval_every"] or 1
    else:
        evals, select, every = {"test": data.loader("test", False, cfg, norm, spec.seed, device)}, None, \
            cfg["eval_every"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = train(model, train_loader, evals, cfg, device, select_on=select, eval_every=every, seed=spec.seed,
                on_epoch=on_epoch)
    test_curve = [c for c in res.curve if c["split"] == "test"]
    if protocol == "fgvc":
        model.load_trainable_state_dict(res.best_state, source="best-validation state")
        model.eval()
        top1 = evaluate(model, data.loader("test", False, cfg, norm, spec.seed, device), device, cfg["precision"])
        metrics.update(top1=top1, top1_final=None, selected_epoch=res.best_epoch, val_top1=res.best_val)
    elif protocol == "legacy-best-test":
        metrics.update(top1=res.best_val, top1_final=test_curve[-1]["top1"], selected_epoch=res.best_epoch,
                       selected_on="test")
    else:
        metrics.update(top1=test_curve[-1]["top1"], top1_final=test_curve[-1]["top1"], selected_epoch=cfg["epochs"])
    metrics.update(curve=res.curve, train_loss=res.train_loss)

    counts = count_params(model)
    record["metrics"] = metrics
    record["params"] = counts.to_dict()
    record["config"].update(
        train=cfg,
        normalization=norm.as_dict(),
        splits={"train": data.suite.split_for("train"), "eval": sorted(evals), "sizes": data.sizes},
        calibration=calibration,
    )
    record["efficiency"] = {
        "train_time_s": round(res.train_time_s, 3),
        "train_images_per_s": round(res.train_images / res.train_time_s, 2) if res.train_time_s else None,
        "eval_time_s": round(res.eval_time_s, 3),
        "peak_gpu_mem_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_gpu_mem_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "trainable_state_bytes": counts.trainable_bytes,
        "compiled": res.compiled,
        "compile_error": res.compile_error,
        **deployed_latency(model, device, data.suite.image_size,
                           "bf16" if cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")
                           else "fp32"),
    }
    record["provenance"].update(
        weights_sha256=model.weights.sha256 if model.weights else None,
        weights_source=model.weights.source if model.weights else None,
        data_root=str(data.root),
        data_fingerprint=dict(data.fingerprints),
    )


def execute_spec(spec: RunSpec, quiet: bool = True, on_epoch: Callable[[int, int, float], None] | None = None,
                 device: str = "auto") -> dict[str, Any]:
    """Run ``spec`` in this process and write its record atomically; never raises for run failures."""
    import timm

    import petlbench

    commit, dirty = _git()
    record = base_record(spec, "running")
    record.update({
        "protocol_description": PROTOCOLS.get(spec.protocol),
        "config": {
            "method_hparams": spec.method_hparams, "train": spec.train, "protocol": spec.protocol,
            "backbone": spec.backbone, "backbone_kwargs": spec.backbone_kwargs, "pretrained": spec.pretrained,
        },
        "provenance": {
            "petlbench_version": petlbench.__version__, "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "hostname": socket.gethostname(), "pid": os.getpid(), "start_time": _now(),
        },
    })
    try:
        dev = _device(device)
        record["provenance"]["device"] = device_name(dev)
        _run(spec, dev, None if quiet else on_epoch, record)
        record["status"] = "ok"
    except Exception as exc:  # every failure is recorded, and the sweep goes on
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            message = "CUDA out of memory: " + message
        record["status"] = "failed"
        record["error"] = {"type": type(exc).__name__, "message": message,
                           "traceback": traceback.format_exc(limit=8)}
    record["provenance"]["end_time"] = _now()
    write_record(spec.record_path, record)
    return record

