"""Sweeps: plan every run up front (validating all input before anything runs), skip finished
runs, execute the rest through a launcher, and summarise.

A sweep survives faults because each run is independent and its record is written atomically
at the end: killing the process loses at most the runs in flight, and the same command later
runs only what is missing (failed runs included; ``--force`` redoes everything).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.claims import CLAIMED
from petlbench.config import load_config_file, resolve_train, split_overrides
from petlbench.errors import PetlbenchError
from petlbench.records import is_done
from petlbench.registry import get_method, method_code
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
    #: Per method: the user's hyperparameter overrides, and the user's training overrides (for --dry-run).
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)


def _demo_weights(log: Callable[[str], None]) -> str:
    """The demo's pretrained micro-ViT, saying what happens when it is trained (first use only)."""
    from petlbench.data import demo_weights
    from petlbench.data.cache import cache_root
    from petlbench.data.demo import _weights_name

    if not (cache_root() / "weights" / _weights_name()).is_file():
        log("demo: first use: pretraining the demo micro-ViT on the upstream digits (once, cached; "
            "about 15 s on 2 cores)")
        started = time.perf_counter()
        path = demo_weights(log=lambda line: log(f"demo: pretraining: {line}"))
        log(f"demo: micro-ViT ready ({elapsed(started)})")
        return str(path)
    return str(demo_weights())


def _demo_data(suite: Any, log: Callable[[str], None]) -> Path:
    """The demo's data root, saying what happens when it is built (first use only)."""
    from petlbench import data as D
    from petlbench.data.cache import cache_root
    from petlbench.data.demo import DEMO_DATA_VERSION, DEMO_SUITE, _demo_hash

    built = cache_root() / "demo" / f"{DEMO_DATA_VERSION}-{_demo_hash(D.get_suite(DEMO_SUITE))}"
    if (built / "MANIFEST.json").is_file():
        return D.resolve_data_root(suite, None)
    log(f"demo: first use: writing the demo data ({len(suite.tasks)} tasks of real images from the "
        "scikit-learn/scikit-image wheels, VTAB-1k layout; once, cached)")
    started = time.perf_counter()
    root = D.resolve_data_root(suite, None)
    log(f"demo: data ready in {root} ({elapsed(started)})")
    return root


def _quiet(_line: str) -> None:
    pass


def _resolve_weights(suite, backbone: str | None, pretrained: str | None, backbone_kwargs: dict[str, Any],
                     log: Callable[[str], None] = _quiet) -> tuple[str, dict[str, Any], str | None]:
    """Defaults: the demo suite brings its own micro-ViT; otherwise ViT-B/16 with the paper weights."""
    random_init = pretrained is not None and str(pretrained).lower() == "none"
    if suite.generator == "demo" and backbone is None:
        from petlbench.data import demo_backbone

        arch, kwargs = demo_backbone()
        if random_init:
            return arch, {**kwargs, **backbone_kwargs}, None
        return arch, {**kwargs, **backbone_kwargs}, str(pretrained or _demo_weights(log))
    backbone = backbone or DEFAULT_BACKBONE
    if random_init:
        return backbone, backbone_kwargs, None
    if pretrained is None:
        if backbone.split(".")[0] != DEFAULT_BACKBONE:
            raise PetlbenchError(
                f"no --pretrained weights for backbone {backbone!r}. Fix: pass a local weights file, a cached timm "
                "tag, or --pretrained none for random init (meaningless for transfer results)."
            )
        pretrained = PAPER_WEIGHTS_TAG  # resolved from the local cache only; the error says what to pass
    return backbone, backbone_kwargs, str(pretrained)


def check_backbone(arch: str, kwargs: Mapping[str, Any], image_size: int | None,
                   option: str = "--backbone-arg") -> None:
    """Build ``arch`` with ``kwargs`` on the meta device and push one ``image_size`` input through it,
    so a bad backbone argument or an input size the backbone does not take is one line at plan time,
    not a timm assertion in the middle of training."""
    import torch

    from petlbench.model import create_model

    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its default settings"
    try:
        model = create_model(arch, "linear", 2, backbone_kwargs=dict(kwargs), device="meta")
    except PetlbenchError as exc:
        if not kwargs:  # e.g. an unknown architecture: the message names --backbone itself
            raise
        raise PetlbenchError(f"{option}: {exc}") from None
    except Exception as exc:  # timm validates lazily: whatever it raises is a bad argument
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PetlbenchError(f"{option}: timm cannot build {arch} with {shown} ({type(exc).__name__}: {first}). "
                             f"Fix: check the values (e.g. {option} img_size=224).") from None
    if image_size is None:
        return
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    except NotImplementedError:  # an op without a meta kernel: the size cannot be checked here
        return
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PetlbenchError(
            f"backbone {arch} with {shown} does not take the suite's {image_size}x{image_size} inputs ({first}). "
            f"Fix: pass {option} img_size={image_size} (or a backbone/suite whose input sizes agree)."
        ) from None


def check_methods(arch: str, kwargs: Mapping[str, Any], methods: Sequence[tuple[type, Sequence[Mapping[str, Any]]]],
                  log: Callable[[str], None] | None = None) -> None:
    """Refuse, at plan time, a method that cannot run on the backbone (with its one-line reason),
    so no run fails after training: each method is built on the meta device (no memory, no
    weights) with its first task's hyperparameters, which runs its ``check_backbone`` and
    ``apply``; every other distinct per-task configuration goes through ``check_backbone``.
    (A mergeable method that cannot fold into this backbone is not refused: it runs, and is
    evaluated and deployed unmerged; ``log`` hears its ``unmerged_reason``.)"""
    from petlbench.backbone import Backbone
    from petlbench.model import create_model

    net = None
    for cls, configs in methods:
        seen: list[Mapping[str, Any]] = []
        for config in configs:
            if config in seen:
                continue
            try:
                if not seen:
                    model = create_model(arch, cls.name, 2, backbone_kwargs=dict(kwargs), device="meta", **config)
                    net = model.net
                    if log is not None and cls.mergeable and not model.method.mergeable:
                        log(f"note: method {cls.name!r} cannot merge into {arch} ({model.method.unmerged_reason}); "
                            "its runs are evaluated and deployed unmerged.")
                else:
                    cls(**config).check_backbone(Backbone(net, arch))
            except PetlbenchError as exc:
                text = str(exc)
                raise PetlbenchError(text if repr(cls.name) in text else f"--method {cls.name}: {text}") from None
            seen.append(config)


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
    log: Callable[[str], None] | None = None,
) -> Plan:
    """Validate everything a sweep needs and return its runs; raises PetlbenchError on bad input.

    ``log`` hears about slow first-use work (building the demo data, pretraining its micro-ViT).
    """
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

    log = log or _quiet
    arch, bkw, weights = _resolve_weights(the_suite, backbone, pretrained, dict(backbone_kwargs or {}), log)
    check_backbone(arch, bkw, the_suite.image_size)
    check_methods(arch, bkw, [(cls, [cls.resolve({**file_cfg["methods"].get(cls.name, {}), **per_method[cls.name]},
                                                 suite=the_suite.name, task=t.name) for t in selected])
                              for cls in method_classes], log)
    probe = create_model(arch, "linear", selected[0].classes, pretrained=weights, backbone_kwargs=bkw)
    sha = probe.weights.sha256 if probe.weights else None
    del probe

    if the_suite.generator == "demo" and data_root is None:
        root = _demo_data(the_suite, log)
    else:
        root = D.resolve_data_root(the_suite, data_root)
    roles = {"train", "test"} | ({"tune_train", "tune_val"} if protocol == "tune" else set()) \
        | ({"tune_val"} if protocol == "fgvc" else set())
    report = D.check_suite(the_suite, root, [t.name for t in selected],
                           splits=sorted({the_suite.split_for(r) for r in roles}), decode=False)
    report.raise_for_errors()

    specs = []
    codes = {cls.name: method_code(cls.name) for cls in method_classes}
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
                    weights_sha256=sha, data_root=str(root), output=str(output), method_code=codes[cls.name],
                ))
    return Plan(specs, the_suite, root, protocol, arch, weights, sha,
                method_overrides={cls.name: {**file_cfg["methods"].get(cls.name, {}), **per_method[cls.name]}
                                  for cls in method_classes},
                train_overrides=dict(train_user))


def describe(plan_: Plan, spec: RunSpec) -> str:
    """The resolved hyperparameters and training settings of ``spec``, each non-default value tagged
    with where it came from: ``[preset]`` (the method's published values), ``[suite]`` (the suite's
    train_defaults) or ``[set]`` (--set / --config)."""
    from petlbench.config import TRAIN_HPARAMS

    cls = get_method(spec.method)
    user = plan_.method_overrides.get(spec.method, {})
    current = {**{k: h.default for k, h in cls.hparams.items()}, **cls.validate(user)}
    preset = cls.preset(spec.suite, spec.task, current)

    def tag(key: str, value: Any, default: Any, sources: list[tuple[str, Mapping[str, Any]]]) -> str:
        text = f"{key}={value}"
        for name, table in sources:
            if key in table:
                return f"{text} [{name}]"
        return text if value == default else f"{text} [?]"

    hp = [tag(k, v, cls.hparams[k].default, [("set", user), ("preset", preset)])
          for k, v in spec.method_hparams.items()] if spec.method_hparams else ["(none)"]
    suite_defaults = dict(getattr(plan_.suite, "train_defaults", {}) or {})
    table = cls.train_presets.get(spec.suite, {})
    train_preset = {**table.get("*", {}), **table.get(spec.task, {})}
    shown = [k for k in ("epochs", "batch_size", "lr", "weight_decay") if k in spec.train]
    shown += [k for k, v in spec.train.items() if k not in shown and k in TRAIN_HPARAMS
              and v != TRAIN_HPARAMS[k].default]
    train = [tag(k, spec.train[k], TRAIN_HPARAMS[k].default if k in TRAIN_HPARAMS else None,
                 [("set", plan_.train_overrides), ("preset", train_preset), ("suite", suite_defaults)])
             for k in shown]
    return f"method: {', '.join(hp)}; train: {', '.join(train)}"


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


def _without_code(identity: Mapping[str, Any]) -> str:
    from petlbench.runspec import canonical_json

    return canonical_json({k: v for k, v in identity.items() if k != "method_code"})


def _code_text(code: Any) -> str:
    if not isinstance(code, Mapping) or not code:
        return "an unrecorded version"
    if code.get("distribution"):
        return f"{code['distribution']} {code.get('version')}"
    return f"module {code.get('module')} (source {str(code.get('source_sha256'))[:12]})"


def resume_notes(plan_: Plan, force: bool = False) -> list[str]:
    """What resuming this sweep keeps and redoes beyond the plain "already done", one line per method:

    runs whose only finished records were made by another version of the method's code are run
    again (the old records stay, and the report shows them as rows of their own); finished runs
    of the same version whose source file has changed since are kept, with a hint to --force; so
    are finished runs made on data at another path (the data path is not part of a run's
    identity, so moved data is not redone, but different data under another path would be
    taken as done: the note says so, and the report separates runs by data fingerprint).
    """
    from petlbench.records import read_record
    from petlbench.registry import method_provenance

    rerun: dict[str, dict[str, None]] = {}
    edited: dict[str, int] = {}
    elsewhere: dict[str, dict[str, None]] = {}
    folders: dict[Path, list[dict[str, Any]]] = {}
    current_sha = {}
    for spec in plan_.specs:
        if spec.method not in current_sha:
            current_sha[spec.method] = method_provenance(spec.method).get("source_sha256")
        done = is_done(spec.record_path)
        if done and not force:
            record = read_record(spec.record_path) or {}
            old = (record.get("provenance") or {}).get("method_code") or {}
            if old.get("source_sha256") and current_sha[spec.method] and \
                    old["source_sha256"] != current_sha[spec.method]:
                edited[spec.method] = edited.get(spec.method, 0) + 1
            old_root = (record.get("provenance") or {}).get("data_root")
            if old_root and spec.data_root and Path(old_root) != Path(spec.data_root):
                elsewhere.setdefault(spec.method, {})[str(old_root)] = None
            continue
        folder = spec.record_path.parent
        if folder not in folders:
            folders[folder] = [r for f in sorted(folder.glob("*.json")) if (r := read_record(f)) is not None] \
                if folder.is_dir() else []
        mine = _without_code(spec.identity())
        for record in folders[folder]:
            ident = record.get("identity")
            if record.get("status") == "ok" and isinstance(ident, Mapping) and _without_code(ident) == mine \
                    and ident.get("method_code") != spec.method_code:
                rerun.setdefault(spec.method, {})[_code_text(ident.get("method_code"))] = None
    notes = []
    for method, olds in rerun.items():
        now = _code_text(next(s.method_code for s in plan_.specs if s.method == method))
        notes.append(f"method {method!r} is now {now}; its finished runs made by {', '.join(olds)} are run again "
                     "(the old records stay, and `petlbench report` shows them as separate rows)")
    for method, n in edited.items():
        notes.append(f"method {method!r}: the source file changed since {n} finished run(s) were made, with the "
                     "same version; they are kept as done (pass --force to redo them, or bump the plugin's version)")
    for method, roots in elsewhere.items():
        notes.append(f"method {method!r}: finished runs made on data at {', '.join(roots)} are kept as done (the data "
                     "path is not part of a run's identity); if that data differs from this sweep's, pass --force "
                     "or another --output (`petlbench report` keeps runs of different data fingerprints apart)")
    return notes


def execute(plan_: Plan, todo: list[RunSpec], launcher: str = "inline", options: Any = None, *,
            quiet: bool = False, device: str | None = None) -> list[dict[str, Any]]:
    """Run ``todo`` (see :func:`pending`); returns the records of the runs made.

    ``device``, when given, replaces ``options.device``: every run, packed or not, uses the one device.
    """
    import dataclasses

    from petlbench.launch import LaunchOptions, launch

    progress = Progress(len(plan_.specs), len(plan_.specs) - len(todo), quiet)
    if options is None:
        options = LaunchOptions()
    if device is not None:
        options = dataclasses.replace(options, device=device)
    device = options.device  # inline: the engine's device is the option's (see launch.worker_device)
    run_fn = None
    if launcher == "inline" and options.pack <= 1:  # packs use the launcher's packed engine (no epoch bar)
        def run_fn(spec: RunSpec) -> dict[str, Any]:
            from petlbench.runner import execute_spec

            return execute_spec(spec, quiet=quiet, on_epoch=progress.epoch, device=device,
                                pack_tune=options.pack_tune)
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
