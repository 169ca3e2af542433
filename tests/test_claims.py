"""Concurrent sweeps on one output folder and unusable --output folders (issue 11).

Two sweeps (separate processes, as two shells or two machines would be) share a folder: each run
is executed once, a failed attempt never replaces an ok record, a dead owner's claim does not
block the run forever. An --output that cannot hold records stops every launcher before
anything runs. The fakes are top-level so spawned processes can import them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from petlbench import claims
from petlbench.errors import PetlbenchError
from petlbench.launch import LaunchOptions, launch
from petlbench.records import base_record, check_output, read_record, write_record
from petlbench.runspec import RunSpec

REPO = Path(__file__).resolve().parents[1]


def make_spec(output: str | Path, seed: int = 0) -> RunSpec:
    return RunSpec(suite="demo", task="digits", method="linear", seed=seed, protocol="vtab1k", backbone="micro",
                   method_hparams={}, train={"epochs": 1}, output=str(output))


def _record(spec: RunSpec, status: str) -> dict[str, Any]:
    record = base_record(spec, status)
    record["provenance"] = {"pid": os.getpid()}
    if status == "ok":  # what `petlbench report` needs of an ok record, or the sweep runs it again
        record["metrics"] = {"top1": 50.0}
        record["params"] = {"trainable": 10}
    else:
        record["error"] = {"type": "RuntimeError", "message": "CUDA out of memory"}
    return record


def fake_slow_ok(spec: RunSpec) -> dict[str, Any]:
    """A run that takes a while; every execution is logged, so a run done twice shows."""
    log = Path(spec.output) / "executions.log"
    with open(log, "a") as fh:
        fh.write(f"{spec.seed} {os.getpid()}\n")
    time.sleep(0.3)
    record = _record(spec, "ok")
    write_record(spec.record_path, record)
    return record


def fake_fails(spec: RunSpec) -> dict[str, Any]:
    record = _record(spec, "failed")
    write_record(spec.record_path, record)
    return record


class Calls:
    def __init__(self) -> None:
        self.executed: list[int] = []

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        self.executed.append(spec.seed)
        return fake_fails(spec)


# ---------------------------------------------------------------------------- records


def test_failed_attempt_never_replaces_an_ok_record(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    write_record(spec.record_path, _record(spec, "ok"))
    write_record(spec.record_path, _record(spec, "failed"))
    assert read_record(spec.record_path)["status"] == "ok"
    write_record(spec.record_path, _record(spec, "ok") | {"metrics": {"top1": 60.0}})  # --force: ok over ok
    assert read_record(spec.record_path)["metrics"]["top1"] == 60.0
    assert not [p for p in spec.record_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_second_sweep_failing_after_the_first_finished_keeps_the_ok_record(tmp_path: Path) -> None:
    """Sweep B planned the run before sweep A finished it, then fails it: A's result stays."""
    spec = make_spec(tmp_path)
    write_record(spec.record_path, _record(spec, "ok"))  # A finished after B's plan
    records = launch([spec], "inline", execute=fake_fails)
    assert records[0]["status"] in ("ok", "failed")
    assert read_record(spec.record_path)["status"] == "ok"


def test_run_finished_by_another_sweep_during_this_one_is_not_repeated(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    since = time.time() - 1.0  # this sweep's launch began a moment before the other sweep's record
    write_record(spec.record_path, _record(spec, "ok"))
    calls = Calls()
    def run(since: float) -> dict:
        return claims.run_group_claimed(lambda specs: [calls(s) for s in specs], [spec], since=since)[0]

    assert run(since)["status"] == "ok" and calls.executed == []
    assert run(time.time() + 60) and calls.executed == [0]  # --force redoes it
    assert read_record(spec.record_path)["status"] == "ok"


# ---------------------------------------------------------------------------- two sweeps


_SWEEP = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from petlbench.launch import launch
    from petlbench.records import is_done
    from tests.test_claims import fake_slow_ok, make_spec
    specs = [make_spec(sys.argv[2], seed=s) for s in range(6)]
    todo = [s for s in specs if not is_done(s.record_path)]  # what `petlbench run` plans
    records = launch(todo, sys.argv[3], execute=fake_slow_ok)
    print(" ".join(r["status"] for r in records))
""")


@pytest.mark.parametrize("launcher", ["inline", "local"])
def test_two_sweeps_on_one_folder_run_each_run_once(tmp_path: Path, launcher: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _SWEEP, str(REPO), str(tmp_path), launcher],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    executions = (tmp_path / "executions.log").read_text().split()
    seeds = sorted(int(s) for s in executions[::2])
    assert seeds == list(range(6)), f"some run was executed twice or never: {seeds}"
    statuses = " ".join(o[0] for o in outs).split()
    assert set(statuses) <= {"ok", "claimed"} and statuses.count("ok") >= 6, statuses
    for s in range(6):
        assert read_record(make_spec(tmp_path, s).record_path)["status"] == "ok"
    assert not list(tmp_path.rglob("*.claim")), "claims must be released"


# ---------------------------------------------------------------------------- claims


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_claim(spec: RunSpec, **owner: Any) -> Path:
    path = claims.claim_path(spec.record_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if owner.get("host") == socket.gethostname():
        owner.setdefault("host_key", claims._host_key())
    path.write_text(json.dumps({"token": "x" * 32, "started": "earlier", **owner}))
    return path


def test_live_claim_skips_the_run_with_a_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = make_spec(tmp_path)
    holder = claims.acquire(spec.record_path)
    assert isinstance(holder, claims.Claim)
    try:
        calls = Calls()
        records = launch([spec], "inline", execute=calls)
        assert calls.executed == [] and records[0]["status"] == claims.CLAIMED
        assert f"pid {os.getpid()} on {socket.gethostname()}" in records[0]["error"]["message"]
        assert not spec.record_path.exists()
        from petlbench.sweep import Progress

        Progress(1, 0, quiet=True).done(spec, records[0])
        assert capsys.readouterr().err.startswith(f"SKIPPED {spec.label}: running in another sweep")
    finally:
        holder.release()
    assert not claims.claim_path(spec.record_path).exists()


def test_claim_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    _write_claim(spec, host=socket.gethostname(), pid=_dead_pid())
    calls = Calls()
    launch([spec], "inline", execute=calls)
    assert calls.executed == [0]
    assert not claims.claim_path(spec.record_path).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to tell a reused pid")
def test_claim_of_a_live_process_with_a_reused_pid_is_taken_over(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    _write_claim(spec, host=socket.gethostname(), pid=os.getppid(), pid_start="1")  # not its real start time
    claim = claims.acquire(spec.record_path)
    assert isinstance(claim, claims.Claim)
    claim.release()


def test_claim_of_another_host_blocks_until_its_heartbeat_is_stale(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(tmp_path)
    path = _write_claim(spec, host="node-that-cannot-be-asked", pid=12345)
    assert isinstance(claims.acquire(spec.record_path), claims.Busy)  # fresh heartbeat: respected
    old = time.time() - claims.DEFAULT_STALE_S - 60
    os.utime(path, (old, old))
    claim = claims.acquire(spec.record_path)  # silent for longer than the timeout: taken over
    assert isinstance(claim, claims.Claim) and claim.info["host"] == socket.gethostname()
    claim.release()
    monkeypatch.setenv(claims.STALE_ENV, "3600")
    path = _write_claim(spec, host="node-that-cannot-be-asked", pid=12345)
    os.utime(path, (old, old))
    assert isinstance(claims.acquire(spec.record_path), claims.Busy)  # the timeout is configurable


def test_a_held_claim_keeps_its_heartbeat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(claims.STALE_ENV, "1")  # heartbeat every 0.2 s
    spec = make_spec(tmp_path)
    claim = claims.acquire(spec.record_path)
    assert isinstance(claim, claims.Claim)
    try:
        os.utime(claim.path, (1000.0, 1000.0))
        deadline = time.monotonic() + 30
        while claim.path.stat().st_mtime == 1000.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert claim.path.stat().st_mtime > 1000.0, "the heartbeat never touched the claim"
    finally:
        claim.release()


def test_dead_pid_of_another_pid_namespace_is_not_judged(tmp_path: Path) -> None:
    """A container with the same hostname cannot see our pids: only the heartbeat decides there."""
    spec = make_spec(tmp_path)
    _write_claim(spec, host=socket.gethostname(), host_key="other-container", pid=_dead_pid())
    assert isinstance(claims.acquire(spec.record_path), claims.Busy)


def test_requeued_slurm_job_takes_its_own_claim_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec(tmp_path)
    _write_claim(spec, host="node7", host_key="node7", pid=4242, slurm_job="9913", slurm_restarts=0)  # preempted
    monkeypatch.setenv("SLURM_JOB_ID", "9914")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert isinstance(claims.acquire(spec.record_path), claims.Busy)  # another array task: respected
    monkeypatch.setenv("SLURM_JOB_ID", "9913")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert isinstance(claims.acquire(spec.record_path), claims.Busy)  # same job, same life: another process
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    claim = claims.acquire(spec.record_path)  # the same job, requeued on another node
    assert isinstance(claim, claims.Claim) and claim.info["slurm_job"] == "9913"
    claim.release()


def test_claim_is_never_seen_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed while claiming must not leave an empty claim that blocks the run."""
    spec = make_spec(tmp_path)
    seen: list[Any] = []
    real_link = os.link

    def link_and_look(src: Any, dst: Any) -> None:
        real_link(src, dst)
        seen.append(json.loads(Path(dst).read_text()))  # the moment the claim exists, it is complete

    monkeypatch.setattr(os, "link", link_and_look)
    claim = claims.acquire(spec.record_path)
    assert isinstance(claim, claims.Claim) and seen and seen[0]["token"] == claim.token
    claim.release()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.claim"))


def test_unreadable_or_leftover_claim_files_do_not_block_forever(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    path = claims.claim_path(spec.record_path)
    path.parent.mkdir(parents=True)
    path.write_text("")  # what a crash mid-write leaves on a disk without hard links
    assert isinstance(claims.acquire(spec.record_path), claims.Busy)  # maybe being written right now
    old = time.time() - 120
    os.utime(path, (old, old))
    leftovers = [path.with_name(f"{path.name}.deadbeef0000.tmp"), path.with_name(f"{path.name}.stale.c0ffee")]
    for leftover in leftovers:
        leftover.write_text("{}")
        os.utime(leftover, (old, old))
    claim = claims.acquire(spec.record_path)
    assert isinstance(claim, claims.Claim)
    claim.release()
    assert not any(p.exists() for p in leftovers)


def test_racing_takeovers_of_one_stale_claim_leave_one_owner(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    _write_claim(spec, host=socket.gethostname(), pid=_dead_pid())
    first = claims.acquire(spec.record_path)
    second = claims.acquire(spec.record_path)
    assert isinstance(first, claims.Claim) and isinstance(second, claims.Busy)
    assert second.owner["token"] == first.token
    first.release()


# ---------------------------------------------------------------------------- --output


def _outputs(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    return {"file": a_file, "below a file": a_file / "sub" / "results"}


@pytest.mark.parametrize("kind", ["file", "below a file"])
@pytest.mark.parametrize("launcher", ["inline", "local"])
def test_unusable_output_stops_every_launcher_before_anything_runs(tmp_path: Path, kind: str, launcher: str) -> None:
    output = _outputs(tmp_path)[kind]
    calls = Calls()
    with pytest.raises(PetlbenchError, match=r"--output .*(is a file|below the file)") as info:
        launch([make_spec(output)], launcher, execute=calls)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)
    assert calls.executed == []


@pytest.mark.parametrize("kind", ["file", "below a file"])
def test_unusable_output_with_slurm_is_one_line_not_a_traceback(tmp_path: Path, kind: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    marker = tmp_path / "sbatch-called"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": f"touch {marker}; exit 1", "squeue": "exit 0", "srun": "exit 0",
                       "sinfo": "printf 'debug*\\n'"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    output = _outputs(tmp_path)[kind]
    options = LaunchOptions(slurm_gpus_per_task=0, slurm_folder=str(output / ".slurm"))
    with pytest.raises(PetlbenchError, match="--output"):
        launch([make_spec(output)], "slurm", options, execute=fake_fails)
    assert not marker.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PetlbenchError, match="cannot (hold records|be created)"):
            check_output(folder, [folder / "demo" / "digits" / "linear"])
    finally:
        folder.chmod(0o755)


def test_output_that_refuses_writes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only mount does, for runs as root (which ignores permission bits)."""
    import tempfile

    def read_only(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    calls = Calls()
    with pytest.raises(PetlbenchError, match=r"cannot hold records \(Read-only file system"):
        launch([make_spec(tmp_path / "out")], "inline", execute=calls)
    assert calls.executed == []
    (tmp_path / "existing").mkdir()
    with pytest.raises(PetlbenchError, match=r"cannot hold records \(Read-only file system"):
        check_output(tmp_path / "existing", create=False)


def test_cli_run_with_output_a_file_is_one_line(tmp_path: Path) -> None:
    from petlbench.cli import main

    outputs = _outputs(tmp_path)
    for output, launcher in [(outputs["file"], "inline"), (outputs["below a file"], "slurm")]:
        result = CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "linear", "--output", str(output),
                                           "--launcher", launcher, "--quiet", "--set", "epochs=1"])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --output") and "file" in lines[0], result.output
    assert not (tmp_path / "fresh").exists()
    result = CliRunner().invoke(main, ["run", "--suite", "demoo", "--method", "linear",
                                       "--output", str(tmp_path / "fresh")])
    assert result.exit_code == 2 and not (tmp_path / "fresh").exists()  # bad input creates nothing
