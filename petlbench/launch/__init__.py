"""Execution backends: run a list of :class:`~petlbench.runspec.RunSpec` inline, on every GPU of
this machine, or as a Slurm job array.

One module per launcher (:mod:`.inline`, :mod:`.local`, :mod:`.slurm`) and the pieces they
share in :mod:`.common`; this module only dispatches. Every launcher has the same contract, so
the sweep logic does not care where runs happen:

- ``execute(spec) -> record`` runs one spec and writes its record (the engine's
  :func:`petlbench.runner.execute_spec` by default). It is passed in so tests can inject fakes,
  and for ``local``/``slurm`` it must be picklable (a top-level function or a ``functools.partial``
  of one), because it runs in another process.
- Packs: with ``options.pack`` = R > 1, runs that share a frozen backbone (same task, method and
  settings; seeds differ) are grouped R at a time (:func:`petlbench.runner.pack_groups`) and each
  group is one unit of work (inline, one local worker's turn, one Slurm array task), trained in
  one packed step by ``execute_group(specs) -> records`` (default
  :func:`petlbench.runner.execute_packed`, which falls back to one by one and records why).
  A per-spec ``execute`` given without ``execute_group`` runs a group's members one by one.
- ``on_start(spec)`` and then ``on_done(spec, record)`` are called exactly once per spec, in the
  calling process, as runs start and finish (progress bars hang off these).
- :func:`launch` returns the records in the order of ``specs``, whatever order they finished in.
- A run whose process dies (segfault, ``os._exit``, OOM killer, Slurm failure) never hangs or
  aborts the sweep: it is reported as a failed record, written to ``spec.record_path`` unless the
  engine managed to write one, and the other runs go on.
- Each run is claimed (:mod:`petlbench.claims`) in the process that runs it, every member of a
  pack before any of them trains: a run another sweep holds comes back as an unwritten record with
  ``status == "claimed"``, and one another sweep finished meanwhile as that sweep's ``ok`` record;
  the rest of the pack trains without them. An output folder that cannot hold records is
  a :class:`PetlbenchError` before anything runs.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from typing import Any

from petlbench.claims import run_group_claimed
from petlbench.errors import PetlbenchError, did_you_mean
from petlbench.launch.common import (
    LAUNCHERS,
    DoneFn,
    ExecuteFn,
    GroupExecuteFn,
    LaunchOptions,
    StartFn,
    each,
    failed_record,
    noop,
    validate_options,
    worker_device,
)
from petlbench.launch.inline import launch_inline
from petlbench.launch.local import DEVICE_ORDER, detect_gpus, launch_local, plan_local_slots, usable_cpus
from petlbench.launch.slurm import SlurmRun, check_slurm, launch_slurm, make_slurm_executor, slurm_parameters
from petlbench.records import check_output
from petlbench.runspec import RunSpec

__all__ = [
    "LAUNCHERS", "LaunchOptions", "SlurmRun", "check_slurm", "default_execute_group",
    "detect_gpus", "failed_record", "launch", "make_slurm_executor", "plan_groups", "plan_local_slots",
    "slurm_parameters", "usable_cpus", "validate_options", "worker_device",
]


def default_execute_group(specs: list[RunSpec], device: str = "auto", pack_tune: bool = False) -> list[dict[str, Any]]:
    """The engine for one pack: packed when it can be, else one by one (each record says why)."""
    from petlbench.runner import execute_packed

    return execute_packed(specs, quiet=True, device=device, pack_tune=pack_tune)


def plan_groups(specs: Sequence[RunSpec], pack: int) -> list[list[int]]:
    """Indices of ``specs`` in the packs the launchers run (each a list of one with ``pack`` 1)."""
    if pack <= 1:
        return [[i] for i in range(len(specs))]
    from petlbench.runner import pack_groups  # the engine's rule of what can share a step

    position = {id(s): i for i, s in enumerate(specs)}
    return [[position[id(s)] for s in group] for group in pack_groups(list(specs), pack)]


def launch(
    specs: Sequence[RunSpec],
    launcher: str = "inline",
    options: LaunchOptions | None = None,
    execute: ExecuteFn | None = None,
    on_start: StartFn | None = None,
    on_done: DoneFn | None = None,
    execute_group: GroupExecuteFn | None = None,
) -> list[dict[str, Any]]:
    """Execute ``specs`` with ``launcher`` (inline | local | slurm); returns records in spec order.

    Raises :class:`PetlbenchError` for unusable options, an output folder that cannot hold records
    or an unreachable Slurm, before anything runs; run failures never raise, they come back as
    records with ``status == "failed"``.
    """
    if launcher not in LAUNCHERS:
        raise PetlbenchError(did_you_mean(launcher, LAUNCHERS, "launcher"))
    options = options or LaunchOptions()
    validate_options(options)
    specs = list(specs)
    device = worker_device(launcher, options)  # checked for every launcher, before anything runs
    # GPU numbers mean nvidia-smi's (PCI bus order) in this process too (inline runs), unless the
    # user chose an order; it only takes effect while CUDA is not initialised yet, which it is not
    # before the first run.
    os.environ.setdefault("CUDA_DEVICE_ORDER", DEVICE_ORDER)
    if execute_group is None:
        execute_group = functools.partial(each, execute) if execute is not None else \
            functools.partial(default_execute_group, device=device, pack_tune=options.pack_tune)
    on_start = on_start or noop
    on_done = on_done or noop
    if not specs:  # nothing to run needs no cluster
        return []
    for output in dict.fromkeys(s.output for s in specs):  # every launcher: before anything trains
        check_output(output, [s.record_path.parent for s in specs if s.output == output])
    if launcher == "slurm":
        if options.slurm_folder:
            check_output(options.slurm_folder)
        check_slurm(options)  # before anything is submitted
    # Each run is claimed in the process that runs it (all of a pack's before it trains), so
    # concurrent sweeps never run it twice.
    run = functools.partial(run_group_claimed, execute_group, since=time.time())
    index_groups = plan_groups(specs, options.pack)
    groups = [[specs[i] for i in g] for g in index_groups]
    if launcher == "inline":
        per_group = launch_inline(groups, run, on_start, on_done)
    elif launcher == "local":
        per_group = launch_local(groups, options, run, on_start, on_done)
    else:
        per_group = launch_slurm(groups, options, run, on_start, on_done)
    records: list[dict[str, Any] | None] = [None] * len(specs)
    for indices, group_records in zip(index_groups, per_group, strict=True):
        for i, record in zip(indices, group_records or [None] * len(indices), strict=True):
            records[i] = record
    return [r for r in records if r is not None]
