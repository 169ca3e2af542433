"""Execute one :class:`~petlbench.runspec.RunSpec`: data -> model -> engine -> record.

Protocols (named, and recorded with every number):

- ``vtab1k`` (default for VTAB-layout suites): train on the suite's ``train`` split
  (train800val200), report test accuracy after the **final** epoch. No selection on test.
- ``tune``: try every ``tune_lr`` x ``tune_weight_decay`` on ``tune_train`` (train800) scored
  on ``tune_val`` (val200) at the final epoch; retrain the best on ``train`` and report test at
  the final epoch.
- ``fgvc`` (default for FGVC): train on ``train``, keep the epoch with the best ``tune_val``
  accuracy (evaluated every ``eval_every`` epochs, every epoch by default), report test there.
- ``legacy-best-test``: what the official ARC scripts do: the best test accuracy over
  evaluations every ``eval_every`` epochs (every epoch unless the user sets it; a suite's
  ``train_defaults`` cadence does not apply). Selected on test; always labelled.

The four above are *harmonised*: one training recipe for every method. The *paper* protocols train
each method with its official recipe (``Method.recipes``, docs/recipes.md):

- ``paper``: the recipe's ``selection`` (``final``, ``val``, ``tune``), except that a test-set
  selection (``best-test``) becomes the final epoch: honest numbers with the official recipe.
- ``paper-best-test``: the official selection exactly, best-of-N on the TEST set at the recipe's
  ``eval_every`` cadence (every epoch by default) included. Labelled like ``legacy-best-test``.

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
from petlbench.engine import on_device
from petlbench.errors import PetlbenchError
from petlbench.packing import UNPACKABLE
from petlbench.protocols import (  # noqa: F401  (re-exported: protocols are defined torch-free for the report)
    PAPER_PROTOCOLS,
    PROTOCOLS,
    SELECTION_ROLES,
    TEST_SELECTED,
    check_protocol,
    default_protocol,
    selection_mode,
)
from petlbench.records import base_record, write_record
from petlbench.runspec import RunSpec


def recipe_info(method: str, suite: str, task: str | None, protocol: str) -> dict[str, Any]:
    """``config.recipe`` of a record: which recipe trained the run, where it comes from and what it
    deliberately does not reproduce. ``harmonised`` whenever the protocol is harmonised or the
    method declares no paper recipe for ``suite``."""
    from petlbench.config import recipe_settings
    from petlbench.registry import get_method

    cls = get_method(method)
    if protocol not in PAPER_PROTOCOLS or cls.recipe_origin(suite) is None:
        return {"name": "harmonised", "source": None, "differences": None}
    return {"name": "paper", "source": cls.recipe_source.get(suite), "differences": cls.recipe_differences.get(suite),
            "declared_as": cls.recipe_origin(suite),
            "published_runs": recipe_settings(cls, suite, task)[1].get("published_runs")}


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
    """The run's device, with an explicit index for CUDA (``cuda`` alone means the current device),
    so every tensor, event and stream of the run names the same GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise PetlbenchError("--device cuda was asked for but no CUDA device is visible. Fix: use --device cpu.")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'' if n == 1 else 's'})"


def _parallel_runs() -> int:
    """Runs in flight on this machine while this one trained (the local launcher's worker count)."""
    try:
        return max(1, int(os.environ.get("PETLBENCH_PARALLEL_RUNS", "1")))
    except ValueError:
        return 1


def selects_on_val(protocol: str, cfg: dict[str, Any], layout: str) -> bool:
    """Whether a run picks what it reports by accuracy on the val split (``tune_val``) of the model
    it trains (the ``tune`` grid trains on ``tune_train`` only, so it is not such a selection)."""
    return selection_mode(protocol, cfg, layout) == "val"


def check_input(suite: Any, protocol: str, cfg: dict[str, Any]) -> None:
    """The input recipe of a run (``train_crop``, ``eval_resize``, ``interpolation``,
    ``train_split``) is valid for its suite and protocol, and so is ``head_norm``'s batch size; one
    line at plan time otherwise."""
    from petlbench import data as D
    from petlbench.model import check_head_norm

    D.input_spec(suite, cfg)
    check_head_norm(cfg, None)
    if cfg.get("train_split", "protocol") == "train+val":
        D.train_val_splits(suite)
        if selects_on_val(protocol, cfg, suite.layout):
            raise PetlbenchError(
                f"training setting 'train_split': train+val trains on the val split, and protocol {protocol!r} "
                "selects on val. Fix: select without val (--protocol vtab1k, final epoch; or a recipe's "
                "selection: final) or drop train_split."
            )


class _Data:
    """The splits of one task, decoded once and shared by every model a run trains."""

    def __init__(self, spec: RunSpec) -> None:
        from petlbench import data as D

        self.suite = D.get_suite(spec.suite)
        self.task = self.suite.resolve_task(spec.task)
        self.root = D.resolve_data_root(self.suite, spec.data_root)
        self.tspec = D.input_spec(self.suite, spec.train)
        self.union = spec.train.get("train_split", "protocol") == "train+val"
        self._cached: dict[tuple[tuple[str, ...], bool], Any] = {}
        self.fingerprints: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def split_names(self, role: str) -> tuple[str, ...]:
        """The split(s) that play ``role``: train and val for the ``train`` role under train+val."""
        from petlbench import data as D

        if role == "train" and self.union:
            return D.train_val_splits(self.suite)
        return (self.suite.split_for(role),)

    def refuse_val_selection(self) -> None:
        """Selection on val is meaningless when val is part of training."""
        if self.union:
            raise PetlbenchError("train_split train+val trains on val: nothing can be selected on val.")

    def split(self, role: str, limit: int, train: bool = True) -> Any:
        """The role's split(s), stored for the training or the evaluation recipe."""
        from petlbench import data as D

        names = self.split_names(role)
        if (names, train) not in self._cached:
            parts = []
            for name in names:
                index = D.read_split(self.suite, self.task, name, self.root)
                if limit and len(names) == 1:
                    index = index.take(min(limit, len(index)))
                self.fingerprints[name] = D.cached_fingerprint(index)
                self.sizes[name] = len(index)
                parts.append(index)
            index = parts[0] if len(parts) == 1 else D.concat_splits(*parts)
            if limit and len(parts) > 1:
                index = index.take(min(limit, len(index)))
                self.sizes["+".join(names)] = len(index)
            self._cached[(names, train)] = D.load_images(index, self.tspec, train=train)
        return self._cached[(names, train)]

    def describe(self) -> dict[str, Any]:
        """The input recipe and what is stored for each split, for the record."""
        return {"transform": self.tspec.describe(), "train_split": "+".join(self.split_names("train")),
                "stored": {"+".join(names) + (" (train)" if train else " (eval)"): cached.describe()
                           for (names, train), cached in self._cached.items()}}

    def loader(self, role: str, train: bool, cfg: dict[str, Any], norm: Any, seed: int, device: torch.device) -> Any:
        from petlbench.data import DeviceLoader

        cached = self.split(role, cfg["limit_train"] if train else cfg["limit_eval"], train)
        loader = DeviceLoader.for_split(
            cached, train=train, batch_size=cfg["batch_size"] if train else cfg["eval_batch_size"],
            normalization=norm, seed=seed, device=device, drop_last=cfg["drop_last"] if train else False,
        )
        if train:
            from petlbench.model import check_head_norm

            check_head_norm(cfg, loader.num_samples)  # a head BatchNorm needs real batches of >= 2 images
        return loader


def _build(spec: RunSpec, cfg: dict[str, Any], classes: int, device: torch.device):
    from petlbench.model import add_head_norm, backbone_build_kwargs, create_model, init_head

    kwargs = backbone_build_kwargs(spec.backbone_kwargs, cfg)  # drop rates are part of the backbone's build
    # The backbone is built, loaded and hashed once per process (petlbench.model.BACKBONES).
    model = create_model(spec.backbone, spec.method, classes, pretrained=spec.pretrained, backbone_kwargs=kwargs,
                         reuse_backbone=True, **spec.method_hparams)
    for head in model.backbone.heads:  # distilled DeiT has two, initialised alike
        init_head(head, cfg["head_init"])
    add_head_norm(model, cfg["head_norm"])
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


class _Prepared:
    """A run ready to train: its resolved settings, model and loaders (shared by the packed path)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def _run(spec: RunSpec, device: torch.device, on_epoch: Callable | None, record: dict[str, Any],
         pack_tune: bool = False) -> None:
    from petlbench.engine import train
    from petlbench.memory import PhasePeaks

    prep = _prepare(spec, device, pack_tune=pack_tune)
    peaks = PhasePeaks(device)  # training and evaluation measured apart (each resets the counter)
    res = train(prep.model, prep.train_loader, prep.evals, prep.cfg, device, select_on=prep.select,
                eval_every=prep.every, seed=spec.seed, on_epoch=on_epoch, peaks=peaks)
    _finish(spec, prep, res, peaks, device, record)


def _tune_packed(spec: RunSpec, cfg: dict[str, Any], trials: list[tuple[float, float]], data: _Data, classes: int,
                 device: torch.device) -> list[Any] | None:
    """The ``tune`` grid's trials trained in one packed step (see petlbench/packing.py), or None
    when they cannot be packed (then they train one by one)."""
    from petlbench.packing import pack_problem, train_packed

    if len(trials) < 2 or not _method_packs(spec.method):
        return None
    models, loaders, evals, cfgs = [], [], [], []
    for lr, wd in trials:
        trial = {**cfg, "lr": lr, "weight_decay": wd}
        seed_everything(spec.seed)
        model = _build(spec, trial, classes, device)
        norm = _normalization(model, trial)
        models.append(model)
        cfgs.append(trial)
        loaders.append(data.loader("tune_train", True, trial, norm, spec.seed, device))
        evals.append({"val": data.loader("tune_val", False, trial, norm, spec.seed, device)})
    if pack_problem(models, cfgs, loaders, device):
        return None
    return train_packed(models, loaders, evals, cfgs, device)


def _prepare(spec: RunSpec, device: torch.device, data: _Data | None = None, pack_tune: bool = False) -> _Prepared:
    """Settings, ``tune`` selection, model and loaders of ``spec`` (``data`` may be shared by runs
    of the same task). ``pack_tune``: train the ``tune`` grid's trials packed."""
    from petlbench.engine import train
    from petlbench.model import calibrate

    cfg = dict(spec.train)
    data = data if data is not None else _Data(spec)
    classes = data.task.classes
    mode = selection_mode(spec.protocol, cfg, data.suite.layout)
    metrics: dict[str, Any] = {}

    if mode == "tune":
        grid = []
        trials = [(lr, wd) for lr in parse_floats(cfg["tune_lr"], "tune_lr")
                  for wd in parse_floats(cfg["tune_weight_decay"], "tune_weight_decay")]
        packed = _tune_packed(spec, cfg, trials, data, classes, device) if pack_tune else None
        for i, (lr, wd) in enumerate(trials):
            if packed is None:
                trial = {**cfg, "lr": lr, "weight_decay": wd}
                seed_everything(spec.seed)
                model = _build(spec, trial, classes, device)
                norm = _normalization(model, trial)
                tune_train = data.loader("tune_train", True, trial, norm, spec.seed, device)
                calibrate(model, tune_train, device)  # before the optimiser: what trains may depend on it
                res = train(model, tune_train, {"val": data.loader("tune_val", False, trial, norm, spec.seed, device)},
                            trial, device, seed=spec.seed)
            else:
                res = packed[i]
            grid.append({"lr": lr, "weight_decay": wd, "val_top1": res.curve[-1]["top1"]})
        chosen = max(grid, key=lambda g: g["val_top1"])  # first best on ties: grid order is fixed
        cfg.update(lr=chosen["lr"], weight_decay=chosen["weight_decay"])
        metrics["tuning"] = {"grid": grid, "selected": {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"]},
                             "packed": packed is not None}

    seed_everything(spec.seed)
    model = _build(spec, cfg, classes, device)
    norm = _normalization(model, cfg)
    # Selection on val never trains on val: train800 (VTAB) or train (FGVC) then.
    train_role = "tune_train" if mode == "val" else "train"
    train_loader = data.loader(train_role, True, cfg, norm, spec.seed, device)
    calibration = calibrate(model, train_loader, device)  # gradient-based selection (SPT, GPS) sees train only
    if mode == "val":
        data.refuse_val_selection()
        evals, select, every = {"val": data.loader("tune_val", False, cfg, norm, spec.seed, device)}, "val", \
            cfg["eval_every"] or 1
    elif mode == "best-test":  # the official cadence: the recipe's (or the user's) eval_every, else every epoch
        evals, select, every = {"test": data.loader("test", False, cfg, norm, spec.seed, device)}, "test", \
            cfg["eval_every"] or 1
    else:
        evals, select, every = {"test": data.loader("test", False, cfg, norm, spec.seed, device)}, None, \
            cfg["eval_every"]
    return _Prepared(cfg=cfg, data=data, metrics=metrics, model=model, norm=norm, train_loader=train_loader,
                     evals=evals, select=select, every=every, calibration=calibration, mode=mode,
                     train_role=train_role)


def _finish(spec: RunSpec, prep: _Prepared, res: Any, peaks: Any, device: torch.device,
            record: dict[str, Any]) -> None:
    """The protocol's number from a trained run, and its record."""
    from petlbench.accounting import count_params
    from petlbench.bench import deployed_latency
    from petlbench.engine import deployable, effective_settings, evaluate
    from petlbench.precision import Precision

    cfg, data, metrics, model, norm, evals = prep.cfg, prep.data, prep.metrics, prep.model, prep.norm, prep.evals
    mode = prep.mode
    test_curve = [c for c in res.curve if c["split"] == "test"]
    if mode == "val":
        model.load_trainable_state_dict(res.best_state, source="best-validation state")
        model.eval()
        with peaks.phase("eval"):
            top1 = evaluate(deployable(model)[0], data.loader("test", False, cfg, norm, spec.seed, device), device,
                            Precision(**res.precision))  # the plan training resolved and recorded
        metrics.update(top1=top1, top1_final=None, selected_epoch=res.best_epoch, val_top1=res.best_val,
                       selected_on="val")
    elif mode == "best-test":
        metrics.update(top1=res.best_val, top1_final=test_curve[-1]["top1"], selected_epoch=res.best_epoch,
                       selected_on="test")
    else:
        metrics.update(top1=test_curve[-1]["top1"], top1_final=test_curve[-1]["top1"],
                       selected_epoch=len(res.train_loss))
    metrics.update(selection=mode, curve=res.curve, train_loss=res.train_loss)

    counts = count_params(model)
    record["metrics"] = metrics
    record["params"] = counts.to_dict()
    record["config"].update(
        train=cfg,
        normalization=norm.as_dict(),
        pooling=model.pooling,
        splits={"train": "+".join(data.split_names(prep.train_role)), "eval": sorted(evals), "sizes": data.sizes},
        input=data.describe(),
        calibration=prep.calibration,
        effective=effective_settings(cfg, res),
    )
    record["efficiency"] = {
        "train_time_s": round(res.train_time_s, 3),
        "train_images_per_s": round(res.train_images / res.train_time_s, 2) if res.train_time_s else None,
        "eval_time_s": round(res.eval_time_s, 3),
        "peak_gpu_mem_allocated": peaks.get("train"),  # training steps only
        "peak_gpu_mem_reserved": peaks.get("train", "reserved"),
        "eval_peak_gpu_mem_allocated": peaks.get("eval"),  # evaluations (test split resident, no gradients)
        "eval_peak_gpu_mem_reserved": peaks.get("eval", "reserved"),
        "trainable_state_bytes": counts.trainable_bytes,
        # Train time depends on what else ran at the same time: say under which concurrency it was measured.
        "concurrency": {"parallel_runs": _parallel_runs(), "torch_threads": torch.get_num_threads(),
                        "device": device.type},
        "compiled": res.compiled,
        "compile_error": res.compile_error,
        **res.compile_info,
        "precision": res.precision,
        "evaluated_merged": res.evaluated_merged,
        **deployed_latency(model, device, data.suite.image_size,
                           "bf16" if res.precision.get("autocast") == "bf16" else "fp32"),
    }
    record["provenance"].update(
        weights_sha256=model.weights.sha256 if model.weights else None,
        weights_source=model.weights.source if model.weights else None,
        data_root=str(data.root),
        data_fingerprint=dict(data.fingerprints),
    )


def _start_record(spec: RunSpec) -> dict[str, Any]:
    import timm

    import petlbench

    commit, dirty = _git()
    record = base_record(spec, "running")
    record.update({
        "protocol_description": PROTOCOLS.get(spec.protocol),
        "config": {
            "method_hparams": spec.method_hparams, "train": spec.train, "protocol": spec.protocol,
            "backbone": spec.backbone, "backbone_kwargs": spec.backbone_kwargs, "pretrained": spec.pretrained,
            "method_code": spec.method_code,
        },
        "provenance": {
            "petlbench_version": petlbench.__version__, "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "hostname": socket.gethostname(), "pid": os.getpid(), "start_time": _now(),
        },
    })
    try:
        from petlbench.registry import method_provenance

        record["provenance"]["method_code"] = method_provenance(spec.method)
        record["config"]["recipe"] = recipe_info(spec.method, spec.suite, spec.task, spec.protocol)
    except PetlbenchError:  # an unknown method fails later, with its own message
        pass
    return record


def execute_spec(spec: RunSpec, quiet: bool = True, on_epoch: Callable[[int, int, float], None] | None = None,
                 device: str = "auto", pack_tune: bool = False) -> dict[str, Any]:
    """Run ``spec`` in this process and write its record atomically; never raises for run failures.

    ``pack_tune``: train a ``tune`` grid's trials in one packed step (equal numbers to within
    floating-point summation order; see petlbench/packing.py)."""
    record = _start_record(spec)
    try:
        dev = _device(device)
        record["provenance"]["device"] = device_name(dev)
        with on_device(dev):  # every CUDA call of the run (loaders, events, latency timing) on its GPU
            _run(spec, dev, None if quiet else on_epoch, record, pack_tune=pack_tune)
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



# ------------------------------------------------------------------ several runs per step


def _method_packs(name: str) -> bool:
    """False for methods packing always refuses (see :func:`petlbench.packing.pack_problem`):
    linear probing (features once, nothing to pack) and calibrated methods (per-run masks). Known
    from the class, so such runs are never grouped, built and calibrated only to fall back."""
    from petlbench.registry import get_method

    try:
        cls = get_method(name)
    except PetlbenchError:  # an unknown method fails in its own run, with its own message
        return False
    return not (cls.frozen_features or cls.needs_calibration)


def pack_key(spec: RunSpec) -> tuple | None:
    """Specs with equal keys differ only in their seed and can train packed (None: never packed)."""
    if not _method_packs(spec.method) or any(spec.train.get(k) for k in UNPACKABLE):
        return None
    from petlbench.data import get_suite

    if selection_mode(spec.protocol, spec.train, get_suite(spec.suite).layout) == "tune":
        return None  # a tune run trains a grid first (its trials may pack among themselves: --pack-tune)
    from petlbench.runspec import canonical_json

    ident = {**spec.identity(), "seed": None, "pretrained": spec.pretrained, "data_root": spec.data_root}
    return (canonical_json(ident),)


def pack_groups(specs: list[RunSpec], size: int) -> list[list[RunSpec]]:
    """``specs`` in groups of at most ``size`` that can share a packed step (order kept; a spec
    that cannot be packed is a group of one)."""
    groups: list[list[RunSpec]] = []
    open_groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        key = pack_key(spec) if size > 1 else None
        if key is None:
            groups.append([spec])
            continue
        group = open_groups.get(key)
        if group is None or len(group) >= size:
            group = open_groups[key] = []
            groups.append(group)
        group.append(spec)
    return groups


def execute_packed(specs: list[RunSpec], quiet: bool = True, device: str = "auto",
                   pack_tune: bool = False) -> list[dict[str, Any]]:
    """Run ``specs`` (one :func:`pack_groups` group) in packed steps and write their records.

    When they cannot be packed, or the packed training fails (one run's non-finite loss, out of
    memory), each spec runs alone through :func:`execute_spec`, so a pack never costs a result.
    ``pack_tune`` is handed to those (a ``tune`` run is never packed with others, its grid may be).
    """
    from petlbench.memory import PhasePeaks
    from petlbench.packing import train_packed  # it checks pack_problem; a ValueError says why not

    if len(specs) < 2 or len({pack_key(s) for s in specs}) != 1 or pack_key(specs[0]) is None:
        return [execute_spec(s, quiet=quiet, device=device, pack_tune=pack_tune) for s in specs]
    records = [_start_record(s) for s in specs]
    try:
        dev = _device(device)
        with on_device(dev):
            data = _Data(specs[0])
            preps = [_prepare(s, dev, data) for s in specs]
            models = [p.model for p in preps]
            peaks = PhasePeaks(dev)  # one pack, one set of peaks: what the R runs needed together
            results = train_packed(models, [p.train_loader for p in preps], [p.evals for p in preps],
                                   [p.cfg for p in preps], dev, select_on=preps[0].select, eval_every=preps[0].every,
                                   peaks=peaks)
            for spec, prep, res, record in zip(specs, preps, results, records, strict=True):
                record["provenance"]["device"] = device_name(dev)
                _finish(spec, prep, res, peaks, dev, record)
                record["efficiency"]["packed_runs"] = len(specs)
                record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to honest one-by-one runs
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        out = [execute_spec(s, quiet=quiet, device=device, pack_tune=pack_tune) for s in specs]
        for record, spec in zip(out, specs, strict=True):
            record["efficiency"]["pack_fallback"] = reason
            write_record(spec.record_path, record)
        return out
    for spec, record in zip(specs, records, strict=True):
        record["provenance"]["end_time"] = _now()
        write_record(spec.record_path, record)
    return records
