"""The ``petlbench`` command line.

User mistakes end in one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from petlbench.errors import PetlbenchError


def parse_sets(pairs: Sequence[str], option: str = "--set") -> dict[str, str]:
    """``key=value`` strings -> dict (values stay strings; methods coerce them)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PetlbenchError(f"{option} {pair!r} is not key=value. Fix: e.g. {option} rank=8")
        out[key.strip()] = value.strip()
    return out


def parse_backbone_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``--backbone-arg key=value`` strings -> timm keyword arguments (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for key, value in parse_sets(pairs, "--backbone-arg").items():
        shown = value if len(value) <= 60 else value[:60] + "..."
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise PetlbenchError(f"--backbone-arg {key}={shown!r}: not a valid YAML value "
                                 f"({str(exc).splitlines()[0]}). Fix: e.g. --backbone-arg depth=2") from None
        except RecursionError:  # `[[[[...` thousands deep
            raise PetlbenchError(f"--backbone-arg {key}={shown!r}: nested too deeply. "
                                 "Fix: e.g. --backbone-arg depth=2") from None
    return out


def split_list(values: Sequence[str]) -> list[str]:
    """Repeatable and comma-separated at once: ``--task a,b --task c`` -> [a, b, c]."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


class _Group(click.Group):
    """Turns PetlbenchError into one line + exit 2, wherever it is raised."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PetlbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="petlbench")
def main() -> None:
    """Benchmark parameter-efficient transfer learning methods on vision transformers."""
    from petlbench.shadowing import namespace_trap

    trap = namespace_trap()
    if trap is not None:  # the command works; a script the user saves next to it would not
        click.echo(f"note: {trap}", err=True)


@main.group("list")
def list_group() -> None:
    """List registered methods or supported backbones."""


@list_group.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_methods_cmd(as_json: bool) -> None:
    """Registered methods (built-in and plugins), with hyperparameters.

    A method plugin that fails to import is named with its error on one ``warning:`` line (stderr);
    the others are listed as usual and the exit status is 1.
    """
    from petlbench.registry import get_method, list_methods

    rows = []
    broken = []
    for name in list_methods():
        try:
            cls = get_method(name)
        except PetlbenchError as exc:  # a plugin that fails to import: name it, list the others
            broken.append(str(exc))
            continue
        rows.append({
            "name": name,
            "display_name": cls.display_name or name,
            "mergeable": cls.mergeable,
            "families": sorted(cls.families),
            "summary": cls.summary,
            "hparams": {k: h.default for k, h in cls.hparams.items()},
        })
    for line in broken:
        click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            merge = "merges" if r["mergeable"] else "no merge"
            hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items())
            shown = f" ({r['display_name']})" if r["display_name"] != r["name"] else ""
            click.echo(f"{r['name']:<{width}}  [{merge}; {'/'.join(r['families'])}]{shown}  {r['summary']}")
            if hp:
                click.echo(f"{'':<{width}}    {hp}")
    if broken:  # the listing is complete but for them; a script can tell
        sys.exit(1)


@list_group.command("backbones")
@click.option("--filter", "pattern", default="", help="Wildcard filter, e.g. 'vit_base*'.")
def list_backbones_cmd(pattern: str) -> None:
    """timm architectures of the supported families (ViT incl. CLIP/DINOv2/SigLIP/MAE, distilled DeiT,
    EVA-02, Swin, ConvNeXt); `petlbench backbone describe --backbone ARCH` shows one's roles."""
    import fnmatch

    from petlbench.model import supported_backbones

    for name in supported_backbones():
        if not pattern or fnmatch.fnmatch(name, pattern):
            click.echo(name)


@main.group("backbone")
def backbone_group() -> None:
    """Inspect a backbone: its family, its roles, and which methods run on it."""


@backbone_group.command("describe")
@click.option("--backbone", "-b", required=True, help="timm architecture, e.g. eva02_base_patch14_224.")
@click.option("--backbone-arg", "backbone_args", multiple=True, metavar="KEY=VALUE",
              help="timm.create_model argument, e.g. img_size=32 (values parsed as YAML; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def backbone_describe_cmd(backbone: str, backbone_args: tuple[str, ...], as_json: bool) -> None:
    """The roles BACKBONE has (token prefix, pre-norm, pooling, heads, qkv, MLP, LayerScale, grid),
    why the ones it lacks are missing, and for every method: merges, runs unmerged, or refused and
    why. Built on the meta device: nothing is allocated or downloaded."""
    from petlbench.model import describe_backbone
    from petlbench.sweep import check_backbone

    kwargs = parse_backbone_args(backbone_args)
    check_backbone(backbone, kwargs, None)  # a bad --backbone-arg is one line naming it
    info = describe_backbone(backbone, kwargs)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['arch']}: family {info['family']} ({info['model_class']})")
    click.echo(f"  {info['summary']}")
    click.echo("roles:")
    for role, value in info["roles"].items():
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else value
        click.echo(f"  {role:<13} {'-' if value is None else shown}")
    if info["absent"]:
        click.echo("absent roles:")
        for role, why in info["absent"].items():
            click.echo(f"  {role:<20} {why}")
    click.echo("methods:")
    width = max(len(m) for m in info["methods"])
    for name, verdict in info["methods"].items():
        click.echo(f"  {name:<{width}}  {verdict}")


@main.command("params")
@click.option("--method", "-m", required=True, help="Registered method name (see `petlbench list methods`).")
@click.option("--backbone", "-b", default=None,
              help="timm architecture [default: vit_base_patch16_224; the demo suite's own micro-ViT with --suite demo].")
@click.option("--num-classes", "-c", type=click.IntRange(min=1), default=None,
              help="Classes of the head [default: the --task's; with --suite alone, each task's own; else 100].")
@click.option("--backbone-arg", "backbone_args", multiple=True, metavar="KEY=VALUE",
              help="timm.create_model argument, e.g. img_size=32 (values parsed as YAML; repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Method hyperparameter override.")
@click.option("--suite", default=None, help="Apply the method's presets for this suite (e.g. vtab).")
@click.option("--task", default=None, help="Apply the method's presets for this task (e.g. cifar).")
@click.option("--pretrained", default=None, help="Weights file (count only; loading verifies it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def params_cmd(method: str, backbone: str | None, backbone_args: tuple[str, ...], num_classes: int | None,
               sets: tuple[str, ...], suite: str | None, task: str | None, pretrained: str | None,
               as_json: bool) -> None:
    """Parameter accounting of METHOD on BACKBONE (random init, offline; nothing is downloaded)."""
    from petlbench.accounting import count_params
    from petlbench.model import create_model
    from petlbench.sweep import DEFAULT_BACKBONE, check_backbone

    bkw = parse_backbone_args(backbone_args)
    the_suite = None
    if suite:
        from petlbench.data import get_suite

        the_suite = get_suite(suite)
    if backbone is None:
        backbone = DEFAULT_BACKBONE
        if the_suite is not None and the_suite.generator == "demo":  # as `petlbench run --suite demo` does
            from petlbench.data import demo_backbone

            backbone, demo_kwargs = demo_backbone()
            bkw = {**demo_kwargs, **bkw}
    if bkw or the_suite is not None:
        check_backbone(backbone, bkw, the_suite.image_size if the_suite is not None else None)
    # Which heads to count: one (-c, the --task's, or 100 without a suite), or every task's of the suite.
    if num_classes is not None or the_suite is None:
        heads = [(task, num_classes or 100)]
    elif task is not None:
        heads = [(task, the_suite.resolve_task(task).classes)]
    else:
        heads = [(t.name, t.classes) for t in the_suite.tasks]
    counted = []
    for task_name, classes in heads:
        model = create_model(backbone, method, classes, pretrained=pretrained, suite=suite, task=task_name,
                             backbone_kwargs=bkw, device=None if pretrained else "meta", **parse_sets(sets))
        counted.append((task_name, classes, model, count_params(model).to_dict()))
    if len(counted) == 1:
        _print_params(method, backbone, bkw, *counted[0], as_json=as_json,
                      classes_from="" if num_classes is not None or task is not None or the_suite is not None
                      else "the default of --num-classes")
    else:
        _print_suite_params(method, backbone, bkw, the_suite.name, counted, as_json)
    model = counted[0][2]
    if model.method.needs_calibration and not as_json:
        click.echo(f"  note: {method} chooses what trains from gradients on the task's training data (its calibration "
                   "step); these are the counts before calibration. See README, Methods.")


_PARAM_LABELS = {
    "trainable": "trainable (incl. head)",
    "head": "head",
    "trainable_without_head": "trainable without head",
    "extra_after_merge": "extra at inference after merge",
    "backbone": "backbone (without head)",
    "total": "total (unmerged)",
    "trainable_bytes": "bytes of trainable state",
}


def _print_params(method: str, backbone: str, bkw: dict[str, Any], task: str | None, classes: int, model: Any,
                  counts: dict[str, int], *, as_json: bool, classes_from: str) -> None:
    if as_json:
        click.echo(json.dumps({"method": method, "arch": backbone, "backbone_kwargs": bkw, "num_classes": classes,
                               "hparams": model.method.config, **counts}))
        return
    where = f"{classes} classes" + (f": {classes_from}" if classes_from else f" of task {task}" if task else "")
    click.echo(f"{method} on {backbone} ({where}), {model.method!r}")
    for key, label in _PARAM_LABELS.items():
        value = counts[key]
        extra = f"  ({value / 1e6:.4f} M)" if key != "trainable_bytes" else ""
        click.echo(f"  {label:<32} {value:>12,}{extra}")


def _print_suite_params(method: str, backbone: str, bkw: dict[str, Any], suite: str,
                        counted: list[tuple[str | None, int, Any, dict[str, int]]], as_json: bool) -> None:
    """Counts for every task of a suite: the head (and any per-task preset) differs between tasks."""
    mean = sum(c["trainable"] for *_x, c in counted) / len(counted)
    if as_json:
        click.echo(json.dumps({"method": method, "arch": backbone, "backbone_kwargs": bkw, "suite": suite,
                               "tasks": [{"task": t, "num_classes": k, "hparams": m.method.config, **c}
                                         for t, k, m, c in counted],
                               "mean_trainable_over_tasks": mean}))
        return
    reprs = {repr(m.method) for _t, _k, m, _c in counted}
    shown = next(iter(reprs)) if len(reprs) == 1 else "hyperparameters per task below"
    click.echo(f"{method} on {backbone}, suite {suite}: each task's own head ({len(counted)} tasks), {shown}")
    click.echo(f"  {'task':<24} {'classes':>7} {'trainable (incl. head)':>23} {'head':>9} {'w/o head':>10} "
               f"{'extra after merge':>18}")
    for t, k, m, c in counted:
        click.echo(f"  {str(t):<24} {k:>7} {c['trainable']:>23,} {c['head']:>9,} {c['trainable_without_head']:>10,} "
                   f"{c['extra_after_merge']:>18,}" + (f"  {m.method!r}" if len(reprs) > 1 else ""))
    backbone_params = counted[0][3]["backbone"]
    click.echo(f"  mean over the {len(counted)} tasks: trainable (incl. head) {mean:,.0f} ({mean / 1e6:.4f} M), "
               "what `petlbench report` shows as Params (M)")
    click.echo(f"  {_PARAM_LABELS['backbone']:<32} {backbone_params:>12,}  ({backbone_params / 1e6:.4f} M)")


def _seeds(text: str) -> list[int]:
    from petlbench.sweep import check_seeds

    shown = text if len(text) <= 60 else text[:60] + "..."
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:  # also an integer longer than Python converts (4300 digits)
        raise PetlbenchError(f"--seeds {shown!r} must be comma-separated integers. Fix: e.g. --seeds 0,1,2") from None
    if not seeds:
        raise PetlbenchError("--seeds is empty. Fix: e.g. --seeds 0,1,2")
    check_seeds(seeds)
    return list(dict.fromkeys(seeds))


def _pack(text: str) -> int:
    """``--pack R``: a whole number of runs per packed step, at least 1."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise PetlbenchError(f"--pack {text!r} is not a number of runs of at least 1. Fix: --pack 1 (one run at a "
                             "time) or e.g. --pack 3 to train three seeds of each task together.")
    return value


def _saved_estimates(path: str) -> list[dict[str, Any]]:
    """The estimates of a ``--sweep-estimate --out`` JSON file, or one line saying what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PetlbenchError(f"--remodel {path}: cannot read a saved estimate ({exc}). Fix: give the .json "
                             "that `petlbench bench --sweep-estimate --out` wrote.") from None
    data = data if isinstance(data, list) else [data]
    if not data or not all(isinstance(d, dict) and {"method", "measured", "counted", "train_steps"} <= d.keys()
                           for d in data):
        raise PetlbenchError(f"--remodel {path}: not a saved sweep estimate. Fix: give the .json that "
                             "`petlbench bench --sweep-estimate --out` wrote.")
    return data


@main.command("run")
@click.option("--suite", "-s", required=True, help="Suite name (vtab, fgvc, demo, or your own YAML suite).")
@click.option("--method", "-m", "methods", required=True, help="Method(s), comma-separated: arc,repadapter.")
@click.option("--task", "-t", "tasks", multiple=True,
              help="Task(s), comma-separated or repeated: cifar,dtd (aliases accepted). Default: all.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--backbone", "-b", default=None, help="timm architecture [default: vit_base_patch16_224; demo: micro-ViT].")
@click.option("--backbone-arg", "backbone_args", multiple=True, metavar="KEY=VALUE",
              help="timm.create_model argument, e.g. img_size=32 (values parsed as YAML; repeatable); checked "
                   "against the suite's input size before anything runs.")
@click.option("--pretrained", default=None,
              help="Weights file or cached timm tag; 'none' = random init on any suite "
                   "[default: vit_base_patch16_224.orig_in21k; demo: the pretrained micro-ViT].")
@click.option("--data-root", default=None, help="Folder holding the suite's task folders (not needed for demo).")
@click.option("--output", "-o", default="results", show_default=True, help="Where run records are written.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a training setting or method hyperparameter (repeatable).")
@click.option("--config", "config_file", default=None, help="YAML file of settings (and `methods:` overrides).")
@click.option("--protocol", default=None,
              help="Harmonised (one recipe for all methods): vtab1k | tune | fgvc | legacy-best-test [default: by "
                   "suite]. Paper (each method's official recipe, docs/recipes.md): paper | paper-best-test.")
@click.option("--launcher", type=click.Choice(["inline", "local", "slurm"]), default="inline", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="local: parallel runs (default: GPUs).")
@click.option("--device", default="auto", show_default=True,
              help="auto | cpu | cuda | cuda:N (local launcher: cuda uses every visible GPU, cuda:N only that one).")
@click.option("--slurm-partition", default=None)
@click.option("--slurm-time", "slurm_time_min", type=click.IntRange(min=1), default=240, show_default=True,
              help="Minutes per run.")
@click.option("--slurm-account", default=None)
@click.option("--slurm-qos", default=None)
@click.option("--slurm-gpus-per-task", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--slurm-array-parallelism", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--pack", "pack_text", default="1", show_default=True, metavar="R",
              help="Train up to R runs that share a frozen backbone (same task, method and settings; seeds "
                   "differ) in one packed step; one record per run as always. Runs that cannot pack run alone.")
@click.option("--pack-tune", is_flag=True, help="protocol tune: train the lr x wd grid's trials in one packed step.")
@click.option("--force", is_flag=True, help="Redo runs that already have a finished record.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (for logs).")
@click.option("--dry-run", is_flag=True,
              help="Validate and list the runs (with resolved hyperparameters and presets) without executing them.")
def run_cmd(suite: str, methods: str, tasks: tuple[str, ...], seeds: str, backbone: str | None,
            backbone_args: tuple[str, ...], pretrained: str | None, data_root: str | None, output: str, sets: tuple[str, ...],
            config_file: str | None, protocol: str | None, launcher: str, workers: int | None, device: str,
            slurm_partition: str | None, slurm_time_min: int, slurm_account: str | None, slurm_qos: str | None,
            slurm_gpus_per_task: int, slurm_array_parallelism: int, pack_text: str, pack_tune: bool, force: bool,
            quiet: bool, dry_run: bool) -> None:
    """Run METHOD(s) on SUITE: one record per (task, method, configuration, seed) under --output.

    Re-running the same command skips finished runs and runs only what is missing.
    """
    import time

    from petlbench import sweep
    from petlbench.launch import LaunchOptions, validate_options, worker_device

    started = time.perf_counter()
    pack = _pack(pack_text)
    options = LaunchOptions(
        workers=workers, device=device, slurm_partition=slurm_partition, slurm_time_min=slurm_time_min,
        slurm_account=slurm_account, slurm_qos=slurm_qos, slurm_gpus_per_task=slurm_gpus_per_task,
        slurm_array_parallelism=slurm_array_parallelism, slurm_folder=str(Path(output) / ".slurm"),
        pack=pack, pack_tune=pack_tune,
    )
    validate_options(options)  # --device gpu is one line before data or weights (and in --dry-run too)
    worker_device(launcher, options)
    if not dry_run:  # a results folder that cannot hold records: say so before data, weights or training
        from petlbench.records import check_output

        check_output(output, create=False)  # the launcher checks again, creating the record folders
    plan = sweep.plan(suite, split_list([methods]), split_list(tasks), _seeds(seeds),
                      backbone=backbone, backbone_kwargs=parse_backbone_args(backbone_args), pretrained=pretrained,
                      data_root=data_root, output=output, protocol=protocol, sets=parse_sets(sets),
                      config_file=config_file, log=lambda line: click.echo(line, err=True), dry_run=dry_run)
    todo = sweep.pending(plan, force)
    if not quiet or dry_run:
        n = len(plan.specs)
        click.echo(f"{n} run{'' if n == 1 else 's'} ({n - len(todo)} already done), protocol {plan.protocol}, "
                   f"backbone {plan.backbone}, weights {plan.pretrained or 'random init'}"
                   + (f" (sha256 {plan.weights_sha256[:12]})" if plan.weights_sha256 else ""), err=True)
    for note in sweep.resume_notes(plan, force):
        click.echo(f"note: {note}", err=True)
    if dry_run:
        for note in sweep.recipe_notes(plan, pack):
            click.echo(note)
        for spec in plan.specs:
            click.echo(f"{'done' if spec not in todo else 'todo'}  {spec.label}  {spec.record_path}")
            click.echo(f"      {sweep.describe(plan, spec)}")
        if pack > 1 and todo:
            from petlbench.launch import plan_groups

            groups = plan_groups(todo, pack)
            click.echo(f"packing (--pack {pack}): {len(todo)} run(s) to do in {len(groups)} step group(s)")
            for n, group in enumerate(groups, 1):
                click.echo(f"pack {n}: {' + '.join(todo[i].label for i in group)}"
                           + ("" if len(group) > 1 else "  (alone)"))
        return
    try:
        ran = sweep.execute(plan, todo, launcher, options, quiet=quiet, device=device)
    except KeyboardInterrupt:
        _interrupted(plan, todo, output, started)
    records = sweep.collect(plan.specs)
    if records:
        from petlbench.report import markdown_table

        click.echo(markdown_table(records, suite=plan.suite.name,
                                  on_warning=lambda w: click.echo(f"warning: {w}", err=True)))
    result = sweep.outcome(plan, todo, ran)  # by this sweep's attempts: a failed redo is a failure
    if result.failed_kept_ok:
        click.echo(f"note: {result.failed_kept_ok} run(s) failed in this sweep but had an earlier ok record, which was "
                   "kept: the table shows that earlier result", err=True)
    click.echo(f"{result.line()}; records in {output} ({sweep.elapsed(started)})", err=True)
    if not result.complete:
        sys.exit(1)


def _interrupted(plan: Any, todo: Sequence[Any], output: str, started: float) -> None:
    """Ctrl-C: say which runs of this sweep finished and which did not, then exit 130."""
    from petlbench import sweep
    from petlbench.records import read_record

    finished, missing = [], []
    for spec in todo:
        record = read_record(spec.record_path)
        (finished if record is not None and record.get("status") in ("ok", "failed") else missing).append(
            (spec, record))
    click.echo(f"\ninterrupted after {sweep.elapsed(started)}: of the {len(todo)} run(s) this sweep had to make, "
               f"{len(finished)} finished and {len(missing)} did not.", err=True)
    for spec, record in finished:
        click.echo(f"  finished  {spec.label}  {record.get('status')}", err=True)
    shown = missing[:20]
    for spec, _r in shown:
        click.echo(f"  not done  {spec.label}", err=True)
    if len(missing) > len(shown):
        click.echo(f"  ... and {len(missing) - len(shown)} more not done", err=True)
    click.echo(f"Records of the finished runs are in {output}; the same command runs only what is missing.", err=True)
    sys.exit(130)


@main.command("bench")
@click.option("--method", "-m", "methods", required=True, help="Method(s), comma-separated.")
@click.option("--backbone", "-b", default="vit_base_patch16_224", show_default=True)
@click.option("--backbone-arg", "backbone_args", multiple=True, metavar="KEY=VALUE",
              help="timm.create_model argument, e.g. depth=2 (values parsed as YAML).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: cuda if available]")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default=None, help="[default: bf16 on cuda, fp32 on cpu]")
@click.option("--iters", type=click.IntRange(min=1), default=10, show_default=True, help="Interleaved repetitions.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the models (falls back to eager).")
@click.option("--no-peft", is_flag=True, help="Skip the LoRA-vs-peft comparison.")
@click.option("--no-timing", is_flag=True,
              help="Counts, FLOPs and peak memory only (e.g. ViT-B at batch 64 on a CPU, where timing takes hours).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--out", default=None, help="Write <out>.json and <out>.md (e.g. benchmarks/results/h100).")
@click.option("--sweep-estimate", is_flag=True,
              help="Model the whole sweep (--suite, default vtab) of each METHOD on H100/H200 from counted ops and "
                   "costs measured here, with the batch size and epochs of the method's paper recipe (--protocol paper).")
@click.option("--suite", default="vtab", show_default=True, help="Suite of --sweep-estimate.")
@click.option("--remodel", "remodel_from", default=None, metavar="FILE.json",
              help="With --sweep-estimate: model a saved estimate (its --out .json) again under today's model, "
                   "keeping its CPU timings (no ViT-B timing: seconds, not an hour).")
@click.pass_context
def bench_cmd(ctx: click.Context, methods: str, backbone: str, backbone_args: tuple[str, ...], batch_size: int,
              device: str | None, dtype: str | None, iters: int, warmup: int, use_compile: bool, no_peft: bool,
              no_timing: bool, as_json: bool, out: str | None, sweep_estimate: bool, suite: str,
              remodel_from: str | None) -> None:
    """Train-step speed, memory, deployed latency/throughput and FLOPs of METHOD(s) vs the plain backbone."""
    import torch

    from petlbench.bench import BenchConfig, run_bench, to_markdown
    from petlbench.registry import get_method
    from petlbench.sweep import check_backbone

    names = split_list([methods])
    for name in names:
        get_method(name)
    if out:  # before the benchmark (minutes to an hour), not after it
        from petlbench.bench import check_outputs

        check_outputs(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = parse_backbone_args(backbone_args)
    size = kwargs.get("img_size") if isinstance(kwargs.get("img_size"), int) else None
    check_backbone(backbone, kwargs, size)
    if remodel_from and not sweep_estimate:
        raise PetlbenchError("--remodel goes with --sweep-estimate. Fix: add --sweep-estimate.")
    if sweep_estimate:
        from petlbench import estimate

        explicit = ctx.get_parameter_source("batch_size") is not click.core.ParameterSource.DEFAULT
        if remodel_from:
            results = [estimate.remodel(saved, log=lambda line: click.echo(line, err=True))
                       for saved in _saved_estimates(remodel_from)]
        else:
            results = [estimate.estimate(name, backbone, suite, {"batch_size": batch_size} if explicit else None,
                                         kwargs, timing=not no_timing, warmup=warmup, iters=iters,
                                         log=lambda line: click.echo(line, err=True)) for name in names]
        _bench_output(results, "\n\n".join(estimate.to_markdown(r) for r in results), out, as_json)
        return
    cfg = BenchConfig(methods=names, backbone=backbone, backbone_kwargs=kwargs, batch_size=batch_size, device=device,
                      dtype=dtype or ("bf16" if device == "cuda" else "fp32"), iters=iters, warmup=warmup,
                      compile=use_compile, peft=not no_peft, timing=not no_timing)
    result = run_bench(cfg, log=lambda line: click.echo(line, err=True))
    _bench_output(result, to_markdown(result), out, as_json)


def _bench_output(result: Any, markdown: str, out: str | None, as_json: bool) -> None:
    """Print a benchmark result (JSON or Markdown) and, with ``--out``, write both files (each
    atomically; the result is printed first, so a write failure loses nothing)."""
    click.echo(json.dumps(result, indent=2, default=str) if as_json else markdown)
    if out:
        from petlbench.bench import check_outputs
        from petlbench.safeio import atomic_write

        json_path, md_path = check_outputs(out)
        try:
            atomic_write(json_path, json.dumps(result, indent=2, default=str) + "\n")
            atomic_write(md_path, markdown + "\n")
        except OSError as exc:
            raise PetlbenchError(f"cannot write --out {out!r} ({exc.strerror or exc}); the result is printed "
                                 "above.") from None


def _register_subcommands() -> None:
    """Command groups that live with their package (imported cheaply: no torch/pandas at import)."""
    from petlbench.data.cli import data as data_group
    from petlbench.report.cli import report as report_cmd

    main.add_command(data_group)
    main.add_command(report_cmd)


_register_subcommands()


if __name__ == "__main__":  # pragma: no cover
    main()
