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


@main.group("list")
def list_group() -> None:
    """List registered methods or supported backbones."""


@list_group.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_methods_cmd(as_json: bool) -> None:
    """Registered methods (built-in and plugins), with hyperparameters."""
    from petlbench.registry import get_method, list_methods

    rows = []
    for name in list_methods():
        cls = get_method(name)
        rows.append({
            "name": name,
            "mergeable": cls.mergeable,
            "families": sorted(cls.families),
            "summary": cls.summary,
            "hparams": {k: h.default for k, h in cls.hparams.items()},
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        merge = "merges" if r["mergeable"] else "no merge"
        hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items())
        click.echo(f"{r['name']:<{width}}  [{merge}; {'/'.join(r['families'])}]  {r['summary']}")
        if hp:
            click.echo(f"{'':<{width}}    {hp}")


@list_group.command("backbones")
@click.option("--filter", "pattern", default="", help="Wildcard filter, e.g. 'vit_base*'.")
def list_backbones_cmd(pattern: str) -> None:
    """timm architectures the backbone interface supports (ViT, DeiT, Swin)."""
    import fnmatch

    from petlbench.model import supported_backbones

    for name in supported_backbones():
        if not pattern or fnmatch.fnmatch(name, pattern):
            click.echo(name)


@main.command("params")
@click.option("--method", "-m", required=True, help="Registered method name (see `petlbench list methods`).")
@click.option("--backbone", "-b", default="vit_base_patch16_224", show_default=True, help="timm architecture.")
@click.option("--num-classes", "-c", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Method hyperparameter override.")
@click.option("--suite", default=None, help="Apply the method's presets for this suite (e.g. vtab).")
@click.option("--task", default=None, help="Apply the method's presets for this task (e.g. cifar).")
@click.option("--pretrained", default=None, help="Weights file (count only; loading verifies it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def params_cmd(method: str, backbone: str, num_classes: int, sets: tuple[str, ...], suite: str | None,
               task: str | None, pretrained: str | None, as_json: bool) -> None:
    """Parameter accounting of METHOD on BACKBONE (random init, offline; nothing is downloaded)."""
    from petlbench.accounting import count_params
    from petlbench.model import create_model

    model = create_model(backbone, method, num_classes, pretrained=pretrained, suite=suite, task=task,
                         device=None if pretrained else "meta", **parse_sets(sets))
    counts = count_params(model).to_dict()
    if as_json:
        click.echo(json.dumps({"method": method, "arch": backbone, "num_classes": num_classes,
                               "hparams": model.method.config, **counts}))
        return
    click.echo(f"{method} on {backbone} ({num_classes} classes), {model.method!r}")
    labels = {
        "trainable": "trainable (incl. head)",
        "head": "head",
        "trainable_without_head": "trainable without head",
        "extra_after_merge": "extra at inference after merge",
        "backbone": "backbone (without head)",
        "total": "total (unmerged)",
        "trainable_bytes": "bytes of trainable state",
    }
    for key, label in labels.items():
        value = counts[key]
        extra = f"  ({value / 1e6:.4f} M)" if key != "trainable_bytes" else ""
        click.echo(f"  {label:<32} {value:>12,}{extra}")
    if model.method.needs_calibration:
        click.echo(f"  note: {method} chooses what trains from gradients on the task's training data (its calibration "
                   "step); these are the counts before calibration. See README, Methods.")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PetlbenchError(f"--seeds {text!r} must be comma-separated integers. Fix: e.g. --seeds 0,1,2") from None
    if not seeds:
        raise PetlbenchError("--seeds is empty. Fix: e.g. --seeds 0,1,2")
    return list(dict.fromkeys(seeds))


@main.command("run")
@click.option("--suite", "-s", required=True, help="Suite name (vtab, fgvc, demo, or your own YAML suite).")
@click.option("--method", "-m", "methods", required=True, help="Method(s), comma-separated: arc,repadapter.")
@click.option("--task", "-t", "tasks", multiple=True, help="Task (repeatable; aliases accepted). Default: all.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--backbone", "-b", default=None, help="timm architecture [default: vit_base_patch16_224; demo: micro-ViT].")
@click.option("--pretrained", default=None,
              help="Weights file or cached timm tag ('none' = random init) [default: vit_base_patch16_224.orig_in21k].")
@click.option("--data-root", default=None, help="Folder holding the suite's task folders (not needed for demo).")
@click.option("--output", "-o", default="results", show_default=True, help="Where run records are written.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a training setting or method hyperparameter (repeatable).")
@click.option("--config", "config_file", default=None, help="YAML file of settings (and `methods:` overrides).")
@click.option("--protocol", default=None, help="vtab1k | tune | fgvc | legacy-best-test [default: by suite].")
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
@click.option("--force", is_flag=True, help="Redo runs that already have a finished record.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (for logs).")
@click.option("--dry-run", is_flag=True, help="Validate and list the runs without executing them.")
def run_cmd(suite: str, methods: str, tasks: tuple[str, ...], seeds: str, backbone: str | None,
            pretrained: str | None, data_root: str | None, output: str, sets: tuple[str, ...],
            config_file: str | None, protocol: str | None, launcher: str, workers: int | None, device: str,
            slurm_partition: str | None, slurm_time_min: int, slurm_account: str | None, slurm_qos: str | None,
            slurm_gpus_per_task: int, slurm_array_parallelism: int, force: bool, quiet: bool,
            dry_run: bool) -> None:
    """Run METHOD(s) on SUITE: one record per (task, method, configuration, seed) under --output.

    Re-running the same command skips finished runs and runs only what is missing.
    """
    import time

    from petlbench import launchers, sweep

    started = time.perf_counter()
    plan = sweep.plan(suite, [m.strip() for m in methods.split(",") if m.strip()], tasks, _seeds(seeds),
                      backbone=backbone, pretrained=pretrained, data_root=data_root, output=output,
                      protocol=protocol, sets=parse_sets(sets), config_file=config_file)
    todo = sweep.pending(plan, force)
    if not quiet or dry_run:
        click.echo(f"{len(plan.specs)} runs ({len(plan.specs) - len(todo)} already done), protocol {plan.protocol}, "
                   f"backbone {plan.backbone}, weights {plan.pretrained or 'random init'}"
                   + (f" (sha256 {plan.weights_sha256[:12]})" if plan.weights_sha256 else ""), err=True)
    if dry_run:
        for spec in plan.specs:
            click.echo(f"{'done' if spec not in todo else 'todo'}  {spec.label}  {spec.record_path}")
        return
    options = launchers.LaunchOptions(
        workers=workers, device=device, slurm_partition=slurm_partition, slurm_time_min=slurm_time_min,
        slurm_account=slurm_account, slurm_qos=slurm_qos, slurm_gpus_per_task=slurm_gpus_per_task,
        slurm_array_parallelism=slurm_array_parallelism, slurm_folder=str(Path(output) / ".slurm"),
    )
    sweep.execute(plan, todo, launcher, options, quiet=quiet, device=device)
    records = sweep.collect(plan.specs)
    failed = [r for r in records if r.get("status") != "ok"]
    if records:
        from petlbench.report import markdown_table

        click.echo(markdown_table(records, suite=plan.suite.name,
                                  on_warning=lambda w: click.echo(f"warning: {w}", err=True)))
    click.echo(f"{len(records) - len(failed)} ok, {len(failed)} failed, {len(plan.specs) - len(records)} missing; "
               f"records in {output} ({sweep.elapsed(started)})", err=True)
    if failed or len(records) < len(plan.specs):
        sys.exit(1)


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
def bench_cmd(methods: str, backbone: str, backbone_args: tuple[str, ...], batch_size: int, device: str | None,
              dtype: str | None, iters: int, warmup: int, use_compile: bool, no_peft: bool, no_timing: bool,
              as_json: bool, out: str | None) -> None:
    """Train-step speed, memory, deployed latency/throughput and FLOPs of METHOD(s) vs the plain backbone."""
    import torch
    import yaml

    from petlbench.bench import BenchConfig, run_bench, to_markdown
    from petlbench.registry import get_method

    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        get_method(name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kwargs = {k: yaml.safe_load(v) for k, v in parse_sets(backbone_args, "--backbone-arg").items()}
    except yaml.YAMLError as exc:
        raise PetlbenchError(f"--backbone-arg: a value is not valid YAML ({str(exc).splitlines()[0]}). "
                             "Fix: e.g. --backbone-arg depth=2") from None
    cfg = BenchConfig(methods=names, backbone=backbone, backbone_kwargs=kwargs, batch_size=batch_size, device=device,
                      dtype=dtype or ("bf16" if device == "cuda" else "fp32"), iters=iters, warmup=warmup,
                      compile=use_compile, peft=not no_peft, timing=not no_timing)
    result = run_bench(cfg, log=lambda line: click.echo(line, err=True))
    markdown = to_markdown(result)
    if out:
        target = Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        target.with_suffix(".md").write_text(markdown + "\n")
    click.echo(json.dumps(result, indent=2, default=str) if as_json else markdown)


def _register_subcommands() -> None:
    """Command groups that live with their package (imported cheaply: no torch/pandas at import)."""
    from petlbench.data.cli import data as data_group
    from petlbench.report.cli import report as report_cmd

    main.add_command(data_group)
    main.add_command(report_cmd)


_register_subcommands()


if __name__ == "__main__":  # pragma: no cover
    main()
