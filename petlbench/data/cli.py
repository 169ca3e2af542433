"""The ``petlbench data`` command group: ``check``, ``suites`` and ``demo``.

Registered under the main CLI as ``petlbench data ...``; it also works on its own
(``python -m petlbench.data.cli``). User mistakes print one line and exit 2; a data check
that finds errors prints one ``path:line: cause. Fix: ...`` line per problem and exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from petlbench.errors import PetlbenchError

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn a PetlbenchError into its one-line message and exit code instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PetlbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            raise SystemExit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


_suite_path = click.option(
    "--suite-path", "suite_dirs", multiple=True, type=click.Path(path_type=Path),
    help="Extra folder (or YAML file) with suite definitions; repeatable. Also read from $PETLBENCH_SUITE_PATH.",
)


@click.group("data")
def data() -> None:
    """Check data folders against a suite, list suites, build the offline demo."""


@data.command("check")
@click.option("--suite", "-s", "suite_name", required=True, help="Suite name or alias (vtab, fgvc, demo, ...) or a YAML file.")
@click.option(
    "--data-root", "-d", type=click.Path(path_type=Path), default=None,
    help="Folder holding the task folders. Optional for the demo suite (built on first use).",
)
@click.option("--task", "-t", "tasks", multiple=True, help="Task name or alias; repeatable. Default: all tasks.")
@click.option("--split", "splits", multiple=True, help="Split to check; repeatable. Default: all splits.")
@click.option("--no-decode", is_flag=True, help="Only check that images exist (skip decoding and fingerprints).")
@click.option("--fingerprints", is_flag=True, help="Print each split's data fingerprint.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON here.")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Threads for reading images.")
@_suite_path
@_user_errors
def check(
    suite_name: str, data_root: Path | None, tasks: tuple[str, ...], splits: tuple[str, ...], no_decode: bool,
    fingerprints: bool, json_path: Path | None, workers: int | None, suite_dirs: tuple[Path, ...],
) -> None:
    """Verify layout, split sizes, labels and every image of a suite's tasks."""
    from petlbench.data.check import check_suite
    from petlbench.data.roots import resolve_data_root
    from petlbench.data.suites import get_suite

    suite = get_suite(suite_name, suite_dirs)
    root = data_root if data_root is not None else resolve_data_root(suite, None)
    report = check_suite(suite, root, tasks or None, splits=splits or None, decode=not no_decode, workers=workers)
    click.echo(f"suite {suite.name} ({suite.title}) at {root}")
    click.echo(report.format_table())
    if fingerprints:
        for task, fps in report.fingerprints().items():
            for split, fp in fps.items():
                click.echo(f"fingerprint {suite.name}/{task}/{split} {fp}")
    for problem in report.problems:
        click.echo(problem.format(), err=True)
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    n_err, n_warn = len(report.errors), len(report.warnings)
    click.echo(f"{n_err} error{'s' if n_err != 1 else ''}, {n_warn} warning{'s' if n_warn != 1 else ''}", err=bool(n_err))
    if n_err:
        raise SystemExit(1)


@data.command("suites")
@click.argument("name", required=False)
@_suite_path
@_user_errors
def suites(name: str | None, suite_dirs: tuple[Path, ...]) -> None:
    """List suites, or the tasks (classes, aliases, split sizes) of one suite."""
    from petlbench.data.suites import broken_plugins, get_suite, load_suites

    if name is None:
        for s in load_suites(suite_dirs).values():
            click.echo(f"{s.name:<10} {len(s.tasks):>3} tasks  {s.layout:<9}  {s.image_size}px  {s.title}  ({s.path})")
        for line in broken_plugins():
            click.echo(f"warning: {line}", err=True)
        return
    s = get_suite(name, suite_dirs)
    click.echo(f"{s.name}: {s.title}; layout {s.layout}, {s.image_size}px, transform {s.transform}; roles {dict(s.roles)}")
    for group, names in s.groups.items():
        click.echo(f"{group}:")
        for tname in names:
            t = s.resolve_task(tname)
            sizes = " ".join(f"{k}={v}" for k, v in t.sizes.items())
            aliases = f" aliases: {', '.join(t.aliases)}" if t.aliases else ""
            click.echo(f"  {t.name:<22} {t.classes:>4} classes  {sizes}{aliases}")


@data.command("demo")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Where to build it (default <cache>/demo).")
@click.option("--weights", is_flag=True, help="Also print the demo micro-ViT's weights file (shipped in the package).")
@_user_errors
def demo(cache_dir: Path | None, weights: bool) -> None:
    """Build the offline demo suite; print its data root (and the path of its backbone's weights)."""
    from petlbench.data.demo import demo_weights, materialize_demo

    click.echo(f"data root: {materialize_demo(cache_dir)}")
    if weights:
        click.echo(f"weights: {demo_weights()}")


if __name__ == "__main__":  # pragma: no cover
    data()
