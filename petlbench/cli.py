"""The ``petlbench`` command line.

User mistakes end in one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
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


def _register_optional_groups() -> None:
    try:
        from petlbench.data.cli import data as data_group
    except ImportError:
        return
    main.add_command(data_group)


_register_optional_groups()


if __name__ == "__main__":  # pragma: no cover
    main()
