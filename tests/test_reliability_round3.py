"""Shared results folders, mixed versions, hostile records, clock skew, honest exits (issue 18).

A results folder is shared by people, machines and petlbench versions. Each test here failed on
the code before issue 18: records written 0600 whatever the umask, an unreadable or newer record
overwritten, claims judged by this host's clock, a FIFO hanging the sweep, a failed --force redo
reported as "1 ok", bad seeds and grids accepted until run time, a broken plugin hiding the rest.
Report-side cases (reading hostile records, CSV, atomic --out) are in tests/report/.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from petlbench import claims, registry, sweep
from petlbench.cli import main
from petlbench.records import SCHEMA_VERSION, base_record, read_record, write_record
from petlbench.runspec import RunSpec
from tests.test_claims import Calls, make_spec

pytestmark = pytest.mark.usefixtures("demo_cache")  # tests/conftest.py: one demo cache per process

FAST_SETS = {"epochs": "1", "warmup_epochs": "0", "limit_train": "16", "limit_eval": "16"}
FAST = [arg for key, value in FAST_SETS.items() for arg in ("--set", f"{key}={value}")]
DEMO = ["run", "--suite", "demo", "--method", "linear", "--task", "digits", "--pretrained", "none", *FAST]


def demo_spec(output: Path) -> RunSpec:
    """The one run that ``DEMO --output output`` plans."""
    (spec,) = sweep.plan("demo", ["linear"], ["digits"], [0], pretrained="none", output=str(output),
                         sets=FAST_SETS).specs
    return spec


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("demo:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def ok_record(spec: RunSpec, top1: Any = 50.0) -> dict[str, Any]:
    """An ok record with what `petlbench report` needs of one."""
    record = base_record(spec, "ok")
    record["metrics"] = {"top1": top1}
    record["params"] = {"trainable": 10}
    return record


def failed_record(spec: RunSpec) -> dict[str, Any]:
    record = base_record(spec, "failed")
    record["error"] = {"type": "RuntimeError", "message": "CUDA out of memory"}
    return record


def plan_of(specs: list[RunSpec]) -> sweep.Plan:
    return sweep.Plan(specs, None, Path("."), "vtab1k", "micro", None, None)


def finishes(fn: Callable[[], Any], fifos: list[Path], timeout: float = 120.0) -> Any:
    """``fn()``, failing (not hanging) if it blocks on one of ``fifos``: the guard opens them for
    writing, which lets a blocked reader go, so the test ends either way."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for _ in range(100):
            for fifo in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(0.1)
            if not thread.is_alive():
                break
        pytest.fail(f"blocked reading a FIFO ({', '.join(map(str, fifos))})")
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextlib.contextmanager
def unreadable(monkeypatch: pytest.MonkeyPatch, path: Path) -> Iterator[None]:
    """``path`` as another user's 0600 file looks to us: opening it for reading is refused.

    Real permission bits where they apply; as root (which reads everything) the same refusal is
    simulated where files are opened (``os.open`` and ``io.open``)."""
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    target = os.path.realpath(path)
    real_os_open, real_io_open = os.open, io.open

    def refused(name: Any) -> bool:
        return isinstance(name, (str, os.PathLike)) and os.path.realpath(name) == target

    def os_open(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if refused(name) and flags & os.O_ACCMODE != os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_os_open(name, flags, *args, **kwargs)

    def io_open(name: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if refused(name) and ("r" in mode or "+" in mode):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_io_open(name, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "open", real_os_open)
        monkeypatch.setattr(io, "open", real_io_open)


# ---------------------------------------------------------------------------- shared folders


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_records_and_their_lock_honour_the_umask(tmp_path: Path, umask: int) -> None:
    """A group folder (umask 002) gets group-readable records and a lock the group can take."""
    spec = make_spec(tmp_path)
    old = os.umask(umask)
    try:
        write_record(spec.record_path, ok_record(spec))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(spec.record_path.stat().st_mode) == expected
    assert stat.S_IMODE((spec.record_path.parent / ".records.lock").stat().st_mode) == expected
    assert read_record(spec.record_path)["status"] == "ok"


def test_a_record_that_cannot_be_read_is_never_replaced_nor_rerun(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another member's record we cannot read: our failed (or even ok) attempt must not replace
    it, and the sweep must not run it again, even with --force."""
    spec = make_spec(tmp_path)
    write_record(spec.record_path, ok_record(spec, 77.0))
    original = spec.record_path.read_bytes()
    with unreadable(monkeypatch, spec.record_path):
        write_record(spec.record_path, failed_record(spec))
        write_record(spec.record_path, ok_record(spec, 10.0))
        plan = plan_of([spec])
        assert sweep.pending(plan) == [] and sweep.pending(plan, force=True) == []
        (note,) = sweep.resume_notes(plan)
        assert "1 run(s) are left alone" in note and "cannot be read (Permission denied)" in note
        assert str(spec.record_path) in note and "chmod g+r" in note
        assert sweep.outcome(plan, [], []).kept == 1
    assert spec.record_path.read_bytes() == original


def test_a_record_of_a_newer_schema_is_never_overwritten_nor_rerun(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    newer = {**ok_record(spec), "schema_version": SCHEMA_VERSION + 1, "new_field": [1, 2]}
    spec.record_path.parent.mkdir(parents=True)
    spec.record_path.write_text(json.dumps(newer))
    original = spec.record_path.read_bytes()
    plan = plan_of([spec])
    assert sweep.pending(plan) == [] and sweep.pending(plan, force=True) == []
    notes = sweep.resume_notes(plan, force=True)
    assert len(notes) == 1 and f"is of schema_version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}" in notes[0]
    assert "not run even with --force" in notes[0]
    for record in (failed_record(spec), ok_record(spec)):  # e.g. a sweep planned before the newer one wrote
        write_record(spec.record_path, record)
    assert spec.record_path.read_bytes() == original


def _other_hosts_claim(spec: RunSpec, age_s: float = 0.0) -> Path:
    """A claim of a live process on another host, its heartbeat ``age_s`` seconds old on the disk."""
    path = claims.claim_path(spec.record_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "y" * 32, "host": "node-17", "host_key": "node-17|other", "pid": 4242,
                                "started": "earlier"}))
    if age_s:
        disk = path.stat().st_mtime
        os.utime(path, (disk - age_s, disk - age_s))
    return path


@pytest.mark.parametrize("skew", [+1, -1])
def test_claim_staleness_is_judged_on_the_disks_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      skew: int) -> None:
    """This host's clock 20 minutes ahead must not break a live claim; 20 minutes behind must
    not keep a dead one."""
    monkeypatch.setenv(claims.STALE_ENV, "600")
    spec = make_spec(tmp_path)
    real = time.time
    if skew > 0:
        _other_hosts_claim(spec, age_s=0.0)  # heartbeat just now
    else:
        _other_hosts_claim(spec, age_s=1200.0)  # silent for 20 minutes
    monkeypatch.setattr(time, "time", lambda: real() + skew * 1200.0)
    got = claims.acquire(spec.record_path)
    monkeypatch.setattr(time, "time", real)
    if skew > 0:
        assert isinstance(got, claims.Busy), "a live claim was broken by this host's fast clock"
    else:
        assert isinstance(got, claims.Claim), "a dead claim was kept by this host's slow clock"
        got.release()


def test_a_run_finished_by_another_sweep_is_not_repeated_by_a_host_with_a_fast_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(tmp_path)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 1200.0)
    since = time.time() - 1.0  # this sweep began a moment ago, on this host's clock
    write_record(spec.record_path, ok_record(spec))  # another sweep finishes it (dated by the disk)
    calls = Calls()
    records = claims.run_group_claimed(lambda specs: [calls(s) for s in specs], [spec], since=since)
    monkeypatch.setattr(time, "time", real)
    assert calls.executed == [] and records[0]["status"] == "ok"


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_claim_that_is_a_fifo_or_a_folder_neither_hangs_nor_fails_the_run(tmp_path: Path, kind: str) -> None:
    spec = make_spec(tmp_path)
    path = claims.claim_path(spec.record_path)
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    calls = Calls()
    records = finishes(lambda: claims.run_group_claimed(lambda specs: [calls(s) for s in specs], [spec],
                                                        since=time.time()), [path] if kind == "fifo" else [])
    assert calls.executed == [0] and records[0]["status"] == "failed"  # Calls fails the run it executes
    assert not path.exists(), "the claim must be released"


# ---------------------------------------------------------------------------- hostile records


def _fifo_in_record_folder(tmp_path: Path) -> Path:
    spec = demo_spec(tmp_path)
    spec.record_path.parent.mkdir(parents=True, exist_ok=True)
    fifo = spec.record_path.parent / "hostile.json"
    os.mkfifo(fifo)
    return fifo


def test_a_fifo_among_the_records_does_not_hang_a_dry_run(tmp_path: Path) -> None:
    fifo = _fifo_in_record_folder(tmp_path)
    result = finishes(lambda: run(*DEMO, "--output", str(tmp_path), "--dry-run"), [fifo])
    assert result.exit_code == 0, result.output
    assert "todo  demo/digits/linear/seed0" in result.stdout


@pytest.mark.parametrize("kind", ["dev_zero", "sparse_3gb", "fifo"])
def test_hostile_files_at_a_records_path_are_never_read_whole(tmp_path: Path, kind: str) -> None:
    """At the run's own record path: a symlink to /dev/zero or a FIFO is not data (the run is
    done again and replaces it); a 3 GB file is not read, and not replaced (it is not ours)."""
    spec = make_spec(tmp_path)
    path = spec.record_path
    path.parent.mkdir(parents=True)
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as fh:
            fh.truncate(3 * 10**9)
    plan = plan_of([spec])
    todo = finishes(lambda: sweep.pending(plan), [path] if kind == "fifo" else [])
    notes = finishes(lambda: sweep.resume_notes(plan), [path] if kind == "fifo" else [])
    assert finishes(lambda: sweep.collect([spec]), [path] if kind == "fifo" else []) == []
    if kind == "sparse_3gb":
        assert todo == [] and len(notes) == 1 and "is 3.0 GB, larger than any file petlbench writes" in notes[0]
        write_record(path, failed_record(spec))
        assert path.stat().st_size == 3 * 10**9
    else:
        assert todo == [spec] and notes == []
        write_record(path, ok_record(spec))
        assert read_record(path)["status"] == "ok" and not path.is_symlink()


@pytest.mark.parametrize("damage", ["provenance_string", "no_metrics"])
def test_own_ok_records_the_report_cannot_show_are_run_again(tmp_path: Path, damage: str) -> None:
    spec = demo_spec(tmp_path)
    record = ok_record(spec)
    if damage == "provenance_string":
        record["provenance"] = "copied from a colleague"
    else:
        del record["metrics"]
    write_record(spec.record_path, record)
    result = run(*DEMO, "--output", str(tmp_path), "--dry-run")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "1 run (0 already done)" in result.stderr
    assert f"todo  {spec.label}" in result.stdout
    expected = "'provenance' must be an object" if damage == "provenance_string" else "'metrics' is missing"
    assert "1 ok record(s) cannot be shown by `petlbench report` and are run again" in result.stderr
    assert expected in result.stderr


def _fake_execute(make: Callable[[RunSpec], dict[str, Any]]) -> Callable[..., list[dict[str, Any]]]:
    def execute(plan_: sweep.Plan, todo: list[RunSpec], *_args: Any, **_kwargs: Any) -> list[dict[str, Any]]:
        records = []
        for spec in todo:
            record = make(spec)
            write_record(spec.record_path, record)
            records.append(record)
        return records
    return execute


@pytest.mark.parametrize("field", ["top1", "trainable", "seed"])
def test_400_digit_numbers_do_not_break_the_runs_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         field: str) -> None:
    def damaged(spec: RunSpec) -> dict[str, Any]:
        record = ok_record(spec)
        if field == "top1":
            record["metrics"]["top1"] = 10**400
        elif field == "trainable":
            record["params"]["trainable"] = 10**400
        else:
            record["seed"] = 10**400
        return record

    monkeypatch.setattr(sweep, "execute", _fake_execute(damaged))
    result = run(*DEMO, "--output", str(tmp_path), "--quiet")
    assert "Traceback" not in result.output and not isinstance(result.exception, (OverflowError, ValueError)), \
        result.output
    assert "warning: skipping" in result.stderr and "401 digits" in result.stderr + result.stdout


# ---------------------------------------------------------------------------- honest exits


def test_a_failed_force_redo_counts_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = demo_spec(tmp_path)
    write_record(spec.record_path, ok_record(spec, 61.5))  # the earlier result
    monkeypatch.setattr(sweep, "execute", _fake_execute(failed_record))
    result = run(*DEMO, "--output", str(tmp_path), "--quiet", "--force")
    assert result.exit_code == 1, result.output
    assert "0 ok, 1 failed (1 kept an earlier ok record), 0 missing" in result.stderr
    assert "the table shows that earlier result" in result.stderr
    assert read_record(spec.record_path)["metrics"]["top1"] == 61.5  # kept, as promised
    again = run(*DEMO, "--output", str(tmp_path), "--quiet")  # plain resume: it is done
    assert again.exit_code == 0 and "1 ok, 0 failed, 0 missing" in again.stderr, again.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--seeds", str(10**23)], "--seeds: 100000000000000000000000 is not a seed; seeds are whole numbers from 0"),
        (["--seeds", "0,-1"], "--seeds: -1 is not a seed"),
        (["--protocol", "tune", "--set", "tune_lr=nan"], "'tune_lr' must list finite learning rates > 0, got nan"),
        (["--protocol", "tune", "--set", "tune_weight_decay=1e-4,inf"],
         "'tune_weight_decay' must list finite weight decays >= 0, got inf"),
        (["--method", "lora", "--set", "rank=1000"], "'rank'=1000 is larger than the width"),
        (["--method", "noah", "--set", "prompt_dims=5", "--set", "lora_dims=1000"], "lora_dims has a size 1000 larger"),
    ],
)
def test_bad_values_are_refused_when_the_sweep_is_planned(tmp_path: Path, args: list[str], needle: str) -> None:
    base = list(DEMO)
    if "--method" in args:  # replace the default method
        i = base.index("--method")
        del base[i:i + 2]
    line = one_error_line(run(*base, *args, "--output", str(tmp_path), "--dry-run"))
    assert needle in line, line
    assert not list(tmp_path.rglob("*.json"))


def test_nested_backbone_arg_is_one_line() -> None:
    line = one_error_line(run("params", "-m", "lora", "--backbone-arg", "depth=" + "[" * 5000 + "]" * 5000))
    assert "nested too deeply" in line and len(line) < 300


def test_bench_out_below_a_file_is_refused_before_the_benchmark(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import petlbench.bench as bench

    ran: list[Any] = []

    def fake_bench(cfg: Any, log: Any = None) -> dict[str, Any]:
        ran.append(cfg)
        return {"rows": []}

    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.setattr(bench, "to_markdown", lambda result: "| table |")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    line = one_error_line(run("bench", "-m", "lora", "-b", "vit_tiny_patch16_224", "--backbone-arg", "img_size=32",
                              "--out", str(blocker / "h100")))
    assert "--out" in line and "below the file" in line and str(blocker) in line
    assert ran == [], "the benchmark ran although its output could not be written"
    out = tmp_path / "results" / "cpu"
    done = run("bench", "-m", "lora", "-b", "vit_tiny_patch16_224", "--backbone-arg", "img_size=32", "--out", str(out))
    assert done.exit_code == 0, done.output
    assert json.loads(out.with_suffix(".json").read_text()) == {"rows": []}
    assert out.with_suffix(".md").read_text() == "| table |\n"


# ---------------------------------------------------------------------------- plugins


@pytest.fixture
def broken_method_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An installed distribution whose method plugin raises when imported."""
    (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('needs libfoo.so.3\\nsee its install guide')\n")
    dist = tmp_path / "explodes-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: explodes\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[petlbench.methods]\nexplodes = explodes_on_import:Explodes\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points", None)
    yield "explodes"
    registry._entry_points = None


@pytest.mark.parametrize("as_json", [False, True])
def test_list_methods_names_a_broken_plugin_and_lists_the_rest(broken_method_plugin: str, as_json: bool) -> None:
    result = run("list", "methods", *(["--json"] if as_json else []))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (warning,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert warning.startswith("warning: method 'explodes': could not import plugin 'explodes_on_import:Explodes'")
    assert "RuntimeError: needs libfoo.so.3" in warning
    names = [r["name"] for r in json.loads(result.stdout)] if as_json else result.stdout.split()
    assert {"arc", "lora", "vpt_deep"} <= set(names) and "explodes" not in names

