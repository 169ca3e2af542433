"""Sweeps: plan every run up front (validating all input before anything runs), skip finished
runs, execute the rest through a launcher, and summarise.

A sweep survives faults because each run is independent and its record is written atomically
at the end: killing the process loses at most the runs in flight, and the same command later
runs only what is missing (failed runs included; ``--force`` redoes everything).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petlbench.claims import CLAIMED
from petlbench.config import load_config_file, resolve_train, split_overrides
from petlbench.errors import PetlbenchError
from petlbench.records import is_done
from petlbench.registry import get_method
from petlbench.runner import check_protocol, default_protocol
from petlbench.runspec import RunSpec

DEFAULT_BACKBONE = "vit_base_patch16_224"
PAPER_WEIGHTS_TAG = "vit_base_patch16_224.orig_in21k"


@dataclass
class Plan:
    specs: list[RunSpec]
    suite: Any
    data_root: Path
    protocol: str
    backbone: str
    pretrained: str | None
    weights_sha256: str | None


def _resolve_weights(suite, backbone: str | None, pretrained: str | None,
                     backbone_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any], str | None]:
    """Defaults: the demo suite brings its own micro-ViT; otherwise ViT-B/16 with the paper weights."""
    if suite.generator == "demo" and backbone is None:
        from petlbench.data import demo_backbone, demo_weights

        arch, kwargs = demo_backbone()
        return arch, {**kwargs, **backbone_kwargs}, str(pretrained or demo_weights())
    backbone = backbone or DEFAULT_BACKBONE
    if pretrained is None:
        if backbone.split(".")[0] != DEFAULT_BACKBONE:
            raise PetlbenchError(
                f"no --pretrained weights for backbone {backbone!r}. Fix: pass a local weights file, a cached timm "
                "tag, or --pretrained none for random init (meaningless for transfer results)."
            )
        pretrained = PAPER_WEIGHTS_TAG  # resolved from the local cache only; the error says what to pass
    if str(pretrained).lower() == "none":
        return backbone, backbone_kwargs, None
    return backbone, backbone_kwargs, str(pretrained)


def plan(
    suite: str,
    methods: Sequence[str],
    tasks: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    *,
    backbone: str | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    data_root: str | None = None,
    output: str = "results",
    protocol: str | None = None,
    sets: Mapping[str, Any] | None = None,
    config_file: str | None = None,
) -> Plan:
    """Validate everything a sweep needs and return its runs; raises PetlbenchError on bad input."""
    from petlbench import data as D
    from petlbench.model import create_model

    the_suite = D.get_suite(suite)
    selected = the_suite.select(tasks)
    if not methods:
        raise PetlbenchError("--method is required. Fix: e.g. --method arc (see `petlbench list methods`).")
    method_classes = [get_method(m) for m in dict.fromkeys(methods)]
    if not seeds:
        raise PetlbenchError("--seeds is empty. Fix: e.g. --seeds 0,1,2")
    file_cfg = load_config_file(config_file) if config_file else {"set": {}, "methods": {}}
    for name in file_cfg["methods"]:
        get_method(name)
    train_user, per_method = split_overrides({**file_cfg["set"], **(sets or {})}, method_classes)
    protocol = check_protocol(protocol or default_protocol(the_suite.layout))

    arch, bkw, weights = _resolve_weights(the_suite, backbone, pretrained, dict(backbone_kwargs or {}))
    probe = create_model(arch, "linear", selected[0].classes, pretrained=weights, backbone_kwargs=bkw)
    sha = probe.weights.sha256 if probe.weights else None
    del probe

    root = D.resolve_data_root(the_suite, data_root)
    roles = {"train", "test"} | ({"tune_train", "tune_val"} if protocol == "tune" else set()) \
        | ({"tune_val"} if protocol == "fgvc" else set())
    report = D.check_suite(the_suite, root, [t.name for t in selected],
                           splits=sorted({the_suite.split_for(r) for r in roles}), decode=False)
    report.raise_for_errors()

    specs = []
    suite_defaults = dict(getattr(the_suite, "train_defaults", {}) or {})
    for task in selected:
        for cls in method_classes:
            hparams = cls.resolve({**file_cfg["methods"].get(cls.name, {}), **per_method[cls.name]},
                                  suite=the_suite.name, task=task.name)
            train = resolve_train(suite_defaults, cls, the_suite.name, task.name, train_user)
            for seed in seeds:
                specs.append(RunSpec(
                    suite=the_suite.name, task=task.name, method=cls.name, seed=int(seed), protocol=protocol,
                    backbone=arch, method_hparams=hparams, train=train, backbone_kwargs=bkw, pretrained=weights,
                    weights_sha256=sha, data_root=str(root), output=str(output),
                ))
    return Plan(specs, the_suite, root, protocol, arch, weights, sha)


class Progress:
    """Sweep bar (runs done/total, current run, ETA) and, inline, per-run epoch progress."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        self.quiet = quiet
        self.current = ""
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="run", desc="sweep", file=sys.stderr,
                            dynamic_ncols=True)

    def start(self, spec: RunSpec) -> None:
        self.current = spec.label
        if self.bar is not None:
            self.bar.set_postfix_str(spec.label)

    def epoch(self, epoch: int, epochs: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.current} epoch {epoch}/{epochs} loss {loss:.3f}")

    def done(self, spec: RunSpec, record: Mapping[str, Any]) -> None:
        status = record.get("status")
        err = record.get("error") or {}
        line = None
        if status == CLAIMED:
            line = f"SKIPPED {spec.label}: {err.get('message')}"
        elif status != "ok":
            line = f"FAILED {spec.label}: {err.get('type')}: {err.get('message')}"
        if self.bar is not None:
            self.bar.update(1)
            if line:
                self.bar.write(line)
        elif line:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pending(plan_: Plan, force: bool = False) -> list[RunSpec]:
    """The planned runs without a finished record (all of them with ``force``)."""
    return [s for s in plan_.specs if force or not is_done(s.record_path)]


def execute(plan_: Plan, todo: list[RunSpec], launcher: str = "inline", options: Any = None, *,
            quiet: bool = False, device: str = "auto") -> list[dict[str, Any]]:
    """Run ``todo`` (see :func:`pending`); returns the records of the runs made."""
    from petlbench.launch import LaunchOptions, launch

    progress = Progress(len(plan_.specs), len(plan_.specs) - len(todo), quiet)
    if options is None:
        options = LaunchOptions()
    run_fn = None
    if launcher == "inline":
        def run_fn(spec: RunSpec) -> dict[str, Any]:
            from petlbench.runner import execute_spec

            return execute_spec(spec, quiet=quiet, on_epoch=progress.epoch, device=device)
    try:
        return launch(todo, launcher, options, execute=run_fn, on_start=progress.start, on_done=progress.done)
    finally:
        progress.close()


def collect(specs: Iterable[RunSpec]) -> list[dict[str, Any]]:
    from petlbench.records import read_record

    return [r for s in specs if (r := read_record(s.record_path)) is not None]


def elapsed(since: float) -> str:
    s = int(time.perf_counter() - since)
    return f"{s // 60}m{s % 60:02d}s"
