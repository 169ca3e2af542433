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
from typing import TYPE_CHECKING, Any

from petlbench.claims import CLAIMED
from petlbench.config import (
    load_config_file,
    recipe_settings,
    resolve_train,
    split_overrides,
    suite_train_defaults,
    train_layers,
)
from petlbench.errors import PetlbenchError
from petlbench.protocols import (
    PAPER_PROTOCOLS,
    SELECTION_ROLES,
    check_protocol,
    default_protocol,
    selection_mode,
)
from petlbench.records import inspect_record, is_finished
from petlbench.registry import get_method, method_code
from petlbench.runner import check_input
from petlbench.runspec import RunSpec

if TYPE_CHECKING:
    from petlbench.method import Method

DEFAULT_BACKBONE = "vit_base_patch16_224"
PAPER_WEIGHTS_TAG = "vit_base_patch16_224.orig_in21k"


@dataclass
class Plan:
    specs: list[RunSpec]
    suite: Any
    data_root: Path | None  # None only in a --dry-run on a machine without the data
    protocol: str
    backbone: str
    pretrained: str | None
    weights_sha256: str | None
    #: Per method: the user's hyperparameter overrides, and the user's training overrides (for --dry-run).
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)


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


def _resolve_weights(suite, backbone: str | None, pretrained: str | None, backbone_kwargs: dict[str, Any]
                     ) -> tuple[str, dict[str, Any], str | None]:
    """Defaults: the demo suite brings its own micro-ViT; otherwise ViT-B/16 with the paper weights."""
    random_init = pretrained is not None and str(pretrained).lower() == "none"
    if suite.generator == "demo" and backbone is None:
        from petlbench.data import demo_backbone

        arch, kwargs = demo_backbone()
        if random_init:
            return arch, {**kwargs, **backbone_kwargs}, None
        if pretrained is None:
            from petlbench.data import demo_weights

            pretrained = str(demo_weights())  # shipped in the package: nothing to build
        return arch, {**kwargs, **backbone_kwargs}, str(pretrained)
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


#: Seeds are what numpy's legacy seeding takes (``np.random.seed``), and what every paper uses.
MAX_SEED = 2**32 - 1


def check_seeds(seeds: Sequence[int]) -> None:
    """Every seed a whole number in 0..:data:`MAX_SEED`: ``--seeds 10**23`` is one line when the
    sweep is planned, not an overflow inside the first run."""
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            text = repr(seed) if len(repr(seed)) <= 30 else repr(seed)[:30] + "..."
            raise PetlbenchError(f"--seeds: {text} is not a seed; seeds are whole numbers from 0 to {MAX_SEED}. "
                                 "Fix: e.g. --seeds 0,1,2")


def check_build_settings(arch: str, backbone_kwargs: Mapping[str, Any], trains: Iterable[Mapping[str, Any]]) -> None:
    """The training settings that change the backbone's build, checked at plan time like
    ``--backbone-arg``: each distinct set of drop rates (:func:`petlbench.model.backbone_build_kwargs`;
    e.g. Swin has no ``pos_drop_rate``), and ``head_norm=bn`` on a backbone with one head."""
    from petlbench.model import add_head_norm, backbone_build_kwargs, create_model
    from petlbench.runspec import canonical_json

    trains = list(trains)
    builds = {canonical_json(kw): kw for kw in (backbone_build_kwargs(backbone_kwargs, t) for t in trains)}
    for kw in builds.values():
        added = sorted(set(kw) - set(backbone_kwargs))
        if added:
            check_backbone(arch, kw, None, option=f"training setting {', '.join(map(repr, added))}")
    if any(t.get("head_norm") == "bn" for t in trains):
        add_head_norm(create_model(arch, "linear", 2, backbone_kwargs=dict(backbone_kwargs), device="meta"), "bn")


def check_methods(arch: str, backbone_kwargs: Mapping[str, Any], configs: Iterable[tuple[type[Method], Mapping[str, Any]]],
                  classes: int, log: Callable[[str], None]) -> None:
    """Refuse, when the sweep is planned and in one line, a method configuration that cannot run on
    the backbone: a family the method is not defined on (with its reason), a hyperparameter the
    model cannot take (a rank wider than the backbone), a role its placement needs, or a merge with
    nowhere to fold -- rather than a failed run hours later. Each distinct (method, hyperparameters)
    is built once on the meta device (:func:`petlbench.model.build_on_meta`). A mergeable method
    that this backbone makes run unmerged is not refused; ``log`` hears why, once per method."""
    from petlbench.model import build_on_meta
    from petlbench.runspec import canonical_json

    done: set[str] = set()
    noted: set[str] = set()
    for cls, hparams in configs:
        key = canonical_json({"method": cls.name, "hparams": dict(hparams)})
        if key in done:
            continue
        done.add(key)
        try:
            model = build_on_meta(arch, cls.name, classes, dict(backbone_kwargs), hparams)
        except PetlbenchError as exc:
            text = str(exc)
            raise PetlbenchError(text if repr(cls.name) in text else f"--method {cls.name} on --backbone {arch}: {text}"
                                 ) from None
        if model is not None and cls.mergeable and not model.method.mergeable and cls.name not in noted:
            noted.add(cls.name)
            log(f"note: method {cls.name!r} cannot merge into {arch} ({model.method.unmerged_reason}); its runs are "
                "evaluated and deployed unmerged.")


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
    dry_run: bool = False,
) -> Plan:
    """Validate everything a sweep needs and return its runs; raises PetlbenchError on bad input.

    ``log`` hears about slow first-use work (building the demo data).
    ``dry_run``: data or weights that are not on this machine are a note (through ``log``), not an
    error, so the runs and their recipes can be listed anywhere; their data is then not checked
    and, without the weights' hash, their run ids are not those of the real runs.
    """
    from petlbench import data as D
    from petlbench.model import create_model

    the_suite = D.get_suite(suite)
    suite_defaults = suite_train_defaults(the_suite)
    selected = the_suite.select(tasks)
    if not methods:
        raise PetlbenchError("--method is required. Fix: e.g. --method arc (see `petlbench list methods`).")
    method_classes = [get_method(m) for m in dict.fromkeys(methods)]
    if not seeds:
        raise PetlbenchError("--seeds is empty. Fix: e.g. --seeds 0,1,2")
    check_seeds(seeds)
    file_cfg = load_config_file(config_file) if config_file else {"set": {}, "methods": {}}
    for name in file_cfg["methods"]:
        get_method(name)
    train_user, per_method = split_overrides({**file_cfg["set"], **(sets or {})}, method_classes)
    protocol = check_protocol(protocol or default_protocol(the_suite.layout))
    # Every setting of every run, resolved (and so checked) before any slow work: a typo in --set
    # must not wait for the backbone check or a first-use build of the demo data.
    if protocol in PAPER_PROTOCOLS:
        for cls in method_classes:
            check_recipe_tasks(cls, the_suite)
    resolved = {(task.name, cls.name): (
        cls.resolve({**file_cfg["methods"].get(cls.name, {}), **per_method[cls.name]},
                    suite=the_suite.name, task=task.name),
        resolve_train(suite_defaults, cls, the_suite.name, task.name, train_user, protocol=protocol),
    ) for task in selected for cls in method_classes}
    trains = {key: train for key, (_, train) in resolved.items()}
    for train in trains.values():
        check_input(the_suite, protocol, train)  # crops, resizes and train+val against suite and selection

    log = log or _quiet
    arch, bkw, weights = _resolve_weights(the_suite, backbone, pretrained, dict(backbone_kwargs or {}))
    check_backbone(arch, bkw, the_suite.image_size)
    check_build_settings(arch, bkw, trains.values())
    check_methods(arch, bkw, [(cls, resolved[(task.name, cls.name)][0]) for task in selected for cls in method_classes],
                  selected[0].classes, log)
    try:
        probe = create_model(arch, "linear", selected[0].classes, pretrained=weights, backbone_kwargs=bkw)
        sha = probe.weights.sha256 if probe.weights else None
        del probe
    except PetlbenchError as exc:
        if not dry_run:
            raise
        log(f"note: {exc} (--dry-run goes on without the weights' sha256: the run ids shown are not the real ones)")
        sha = None

    root: Path | None = None
    if the_suite.generator == "demo" and data_root is None:
        root = _demo_data(the_suite, log)
    else:
        try:
            root = D.resolve_data_root(the_suite, data_root)
        except PetlbenchError as exc:
            if not dry_run:
                raise
            log(f"note: {exc} (--dry-run lists the runs without checking their data)")
    if root is not None:
        roles = {role for train in trains.values()
                 for role in SELECTION_ROLES[selection_mode(protocol, train, the_suite.layout)]}
        if any(train["train_split"] == "train+val" for train in trains.values()):
            roles.add("tune_val")  # val is trained on: check it too
        report = D.check_suite(the_suite, root, [t.name for t in selected],
                               splits=sorted({the_suite.split_for(r) for r in roles}), decode=False)
        report.raise_for_errors()

    specs = []
    codes = {cls.name: method_code(cls.name) for cls in method_classes}
    for task in selected:
        for cls in method_classes:
            hparams, train = resolved[(task.name, cls.name)]
            for seed in seeds:
                specs.append(RunSpec(
                    suite=the_suite.name, task=task.name, method=cls.name, seed=int(seed), protocol=protocol,
                    backbone=arch, method_hparams=hparams, train=train, backbone_kwargs=bkw,
                    pretrained=weights, weights_sha256=sha, data_root=str(root) if root else None, output=str(output),
                    method_code=codes[cls.name],
                ))
    return Plan(specs, the_suite, root, protocol, arch, weights, sha,
                method_overrides={cls.name: {**file_cfg["methods"].get(cls.name, {}), **per_method[cls.name]}
                                  for cls in method_classes},
                train_overrides=dict(train_user))


def check_recipe_tasks(cls: type, suite: Any) -> None:
    """A recipe keyed by a task its suite does not define would silently never apply: one line."""
    origin = cls.recipe_origin(suite.name)
    if origin is None:
        return
    unknown = sorted(set(getattr(cls, origin)[suite.name]) - set(suite.task_names) - {"*"})
    if unknown:
        raise PetlbenchError(
            f"method {cls.name!r}: {origin}[{suite.name!r}] names {', '.join(map(repr, unknown))}, not a task of suite "
            f"{suite.name!r}. Fix: key the recipe by the suite's task names ({', '.join(suite.task_names[:4])}, ...) "
            "or '*'."
        )


def recipe_notes(plan_: Plan, pack: int = 1) -> list[str]:
    """What ``--dry-run`` says once per method about its training recipe under this protocol: under
    the paper protocols the recipe's source and deliberate differences, what is selected (a test-set
    selection turned into the final epoch under ``paper``), how many runs the published number
    averages against the seeds requested, or that no recipe is declared (the harmonised settings
    then apply); under the harmonised protocols that a declared recipe is not used; under every
    protocol what a path cannot do as asked (a linear probe with mixup trains on images, mixed or
    averaged runs do not pack)."""
    from petlbench.packing import UNPACKABLE
    from petlbench.runner import _method_packs

    notes: list[str] = []
    suite = plan_.suite.name
    by_method: dict[str, list[RunSpec]] = {}
    for spec in plan_.specs:
        by_method.setdefault(spec.method, []).append(spec)
    for name, specs in by_method.items():
        cls = get_method(name)
        if plan_.protocol in PAPER_PROTOCOLS:
            origin = cls.recipe_origin(suite)
            if origin is None:
                why = cls.recipe_differences.get(suite)
                notes.append(f"recipe {name} on {suite}: the method declares no paper recipe for {suite}; these runs "
                             "use the harmonised settings (recorded as recipe 'harmonised')" + (f". Why: {why}" if why else ""))
            else:
                notes.append(f"recipe {name} on {suite}: paper; source: {cls.recipe_source.get(suite) or 'not declared'}")
                notes.append(f"recipe {name} on {suite}: differences: "
                             f"{cls.recipe_differences.get(suite) or 'none declared'}")
                if origin == "train_presets":
                    notes.append(f"recipe {name} on {suite}: declared as `train_presets` (the old name of `recipes`): "
                                 "read as its paper recipe, applied under the paper protocols only")
            declared = {s.train.get("selection", "protocol") for s in specs}
            if "best-test" in declared and plan_.protocol == "paper":
                notes.append(f"recipe {name} on {suite}: the official script selects the best TEST epoch; --protocol "
                             "paper reports the final epoch instead (--protocol paper-best-test reproduces the "
                             "official selection, labelled test-selected)")
            wanted = max((recipe_settings(cls, suite, s.task)[1].get("published_runs", 1) for s in specs), default=1)
            seeds = len({s.seed for s in specs})
            if wanted > seeds:
                notes.append(f"recipe {name} on {suite}: the published number is a mean of {wanted} runs; this sweep "
                             f"requests {seeds} seed{'' if seeds == 1 else 's'} per task. Fix: e.g. --seeds "
                             f"{','.join(str(i) for i in range(wanted))} for the same count")
        elif cls.recipe_origin(suite) is not None:
            notes.append(f"recipe {name} on {suite}: harmonised (protocol {plan_.protocol}: one recipe for every "
                         "method); its paper recipe applies under --protocol paper / paper-best-test only")
        unpackable = sorted({k for s in specs for k in UNPACKABLE if s.train.get(k)})
        if pack > 1 and unpackable and _method_packs(name):
            notes.append(f"{name}: runs with {', '.join(unpackable)} train alone (a packed step has one batch layout "
                         "and no per-run weight average)")
        if cls.frozen_features and any(s.train.get("mixup") or s.train.get("cutmix") for s in specs):
            notes.append(f"{name}: linear probing with mixup/cutmix trains on (mixed) images, not on features "
                         "extracted once: mixing is not defined on cached features")
    return notes


def describe(plan_: Plan, spec: RunSpec) -> str:
    """The resolved hyperparameters and training settings of ``spec``, each non-default value tagged
    with where it came from: ``[preset]`` (the method's published hyperparameters), ``[recipe]``
    (its paper training recipe, paper protocols only), ``[suite]`` (the suite's train_defaults) or
    ``[set]`` (--set / --config); then what the run selects."""
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
    layers = train_layers(suite_defaults, cls, spec.suite, spec.task, plan_.train_overrides, protocol=spec.protocol)
    stated = {k for _name, layer in layers for k in layer}  # a recipe's item is listed even at the engine default
    shown = [k for k in ("epochs", "batch_size", "lr", "weight_decay") if k in spec.train]
    shown += [k for k, v in spec.train.items() if k not in shown and k in TRAIN_HPARAMS
              and (v != TRAIN_HPARAMS[k].default or k in stated)]
    train = [tag(k, spec.train[k], TRAIN_HPARAMS[k].default if k in TRAIN_HPARAMS else None, layers[::-1])
             for k in shown]
    if spec.train.get("lr_base_batch"):
        from petlbench.engine import peak_lr

        train.append(f"peak lr used={peak_lr(spec.train):g} (lr x batch_size / lr_base_batch)")
    mode = selection_mode(spec.protocol, spec.train, plan_.suite.layout)
    return f"method: {', '.join(hp)}; train: {', '.join(train)}; selects: {_SELECTS[mode]}"


_SELECTS = {"final": "final epoch", "val": "best validation epoch", "tune": "lr x wd grid on validation, then final",
            "best-test": "best TEST epoch"}


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
    """The planned runs without a finished record (all of them with ``force``), except runs whose
    record must stay as it is (:func:`kept`), which are never run, even with ``force``.

    A finished record is an ``ok`` record that ``petlbench report`` can show: one it would skip
    (no ``metrics``, a damaged field) is run again.
    """
    todo = []
    for spec in plan_.specs:
        stored = inspect_record(spec.record_path)
        if stored.keep is None and (force or not is_finished(stored.record)):
            todo.append(spec)
    return todo


def kept(plan_: Plan) -> list[tuple[RunSpec, str]]:
    """Planned runs whose record this petlbench must not replace, with why: a file it cannot read
    (another user's, without read permission for us), a record of a newer schema version (made by
    a newer petlbench), a file too large to be a record, a folder. Rerunning them would overwrite
    (or, for an unreadable file, possibly overwrite) a result: they are left alone."""
    return [(spec, stored.keep) for spec in plan_.specs
            if (stored := inspect_record(spec.record_path)).keep is not None]


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
    """What resuming this sweep keeps and redoes beyond the plain "already done", one line each:

    records this petlbench must leave alone (:func:`kept`: unreadable, newer schema), never run;
    ``ok`` records the report cannot show (no ``metrics``, damaged fields), run again; runs whose only finished records were made by another version of the method's code are run
    again (the old records stay, and the report shows them as rows of their own); finished runs
    of the same version whose source file has changed since are kept, with a hint to --force; so
    are finished runs made on data at another path (the data path is not part of a run's
    identity, so moved data is not redone, but different data under another path would be
    taken as done: the note says so, and the report separates runs by data fingerprint).
    """
    from petlbench.records import read_record
    from petlbench.registry import method_provenance
    from petlbench.report.loading import record_problem

    rerun: dict[str, dict[str, None]] = {}
    edited: dict[str, int] = {}
    elsewhere: dict[str, dict[str, None]] = {}
    folders: dict[Path, list[dict[str, Any]]] = {}
    current_sha = {}
    keep: dict[str, list[RunSpec]] = {}
    unusable: list[tuple[RunSpec, str]] = []
    for spec in plan_.specs:
        if spec.method not in current_sha:
            current_sha[spec.method] = method_provenance(spec.method).get("source_sha256")
        stored = inspect_record(spec.record_path)
        if stored.keep is not None:
            keep.setdefault(stored.keep, []).append(spec)
            continue
        record = stored.record
        if record is not None and record.get("status") == "ok" and (problem := record_problem(record)) is not None:
            unusable.append((spec, problem))
        done = is_finished(record)
        if done and not force:
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
    for why, specs in keep.items():
        notes.append(f"{len(specs)} run(s) are left alone, not run{' even with --force' if force else ''}: the record "
                     f"{specs[0].record_path}{' (and others)' if len(specs) > 1 else ''} {why}. "
                     f"Fix: {_keep_fix(why)}")
    if unusable and not force:
        spec, problem = unusable[0]
        notes.append(f"{len(unusable)} ok record(s) cannot be shown by `petlbench report` and are run again "
                     f"(e.g. {spec.record_path}: {problem})")
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


def _keep_fix(why: str) -> str:
    if why.startswith("cannot be read"):
        return ("ask the file's owner to make it readable to you (chmod g+r; records of this petlbench honour the "
                "umask, e.g. umask 002 for a group folder), or pass another --output.")
    if "newer than" in why:
        return "report and resume it with the newer petlbench that wrote it, or pass another --output."
    return "move it out of the results folder."


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


@dataclass
class Outcome:
    """How a sweep ended, counted by this sweep's own attempts (not by what is on disk: a failed
    ``--force`` redo leaves the earlier ``ok`` record in place, and is still a failure)."""

    ok: int = 0  #: finished: done before this sweep, or made ok by it
    failed: int = 0  #: attempts of this sweep that failed
    failed_kept_ok: int = 0  #: of those, runs whose earlier ok record stayed (the table shows it)
    elsewhere: int = 0  #: running in another sweep
    kept: int = 0  #: records left alone (unreadable, newer schema): neither run nor reportable here
    missing: int = 0  #: neither done nor attempted (e.g. a lost Slurm job)

    @property
    def complete(self) -> bool:
        return not (self.failed or self.elsewhere or self.kept or self.missing)

    def line(self) -> str:
        parts = [f"{self.ok} ok", f"{self.failed} failed"]
        if self.failed_kept_ok:
            parts[-1] += f" ({self.failed_kept_ok} kept an earlier ok record)"
        parts.append(f"{self.missing} missing")
        if self.elsewhere:
            parts[-1] += f" ({self.elsewhere} running in another sweep)"
        if self.kept:
            parts.append(f"{self.kept} left alone (records this petlbench cannot read or replace)")
        return ", ".join(parts)


def outcome(plan_: Plan, todo: Sequence[RunSpec], ran: Sequence[Mapping[str, Any]]) -> Outcome:
    """Count the sweep: runs it attempted by the records its launcher returned, the others by disk."""
    attempted = {r.get("run_id"): r for r in ran}
    todo_ids = {s.run_id for s in todo}
    out = Outcome()
    for spec in plan_.specs:
        stored = inspect_record(spec.record_path)
        if spec.run_id not in todo_ids:
            if stored.keep is not None:
                out.kept += 1
            elif is_finished(stored.record):
                out.ok += 1
            else:
                out.missing += 1
            continue
        record = attempted.get(spec.run_id)
        status = record.get("status") if record is not None else None
        if status == "ok":
            out.ok += 1
        elif status == CLAIMED:
            out.elsewhere += 1
        elif status is None:
            out.missing += 1
        else:
            out.failed += 1
            if is_finished(stored.record):
                out.failed_kept_ok += 1
    return out


def collect(specs: Iterable[RunSpec]) -> list[dict[str, Any]]:
    from petlbench.records import read_record

    return [r for s in specs if (r := read_record(s.record_path)) is not None]


def elapsed(since: float) -> str:
    s = int(time.perf_counter() - since)
    return f"{s // 60}m{s % 60:02d}s"
