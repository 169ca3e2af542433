"""``petlbench run --pack R``: every launcher runs packs of runs that share a frozen backbone, with
the records of the same runs one by one, and every member of a pack claimed before it trains."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from petlbench.claims import Busy, acquire
from petlbench.cli import main
from petlbench.errors import PetlbenchError
from petlbench.launch import LaunchOptions, launch, plan_groups
from petlbench.records import write_record
from petlbench.runspec import RunSpec
from tests.shared_cache import demo_cache_env

FAST = ["--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "limit_train=64", "--set", "limit_eval=64",
        "--set", "batch_size=32"]


@pytest.fixture(scope="module", autouse=True)
def demo_cache():
    with demo_cache_env() as cache:
        yield cache


def make_spec(output: str | Path, seed: int = 0, task: str = "digits", method: str = "lora") -> RunSpec:
    return RunSpec(suite="demo", task=task, method=method, seed=seed, protocol="vtab1k", backbone="micro",
                   method_hparams={}, train={"epochs": 1}, output=str(output))


def fake_pack(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """Stands in for the packed engine: one ok record per member, saying how large its pack was."""
    out = []
    for spec in specs:
        record = {"run_id": spec.run_id, "seed": spec.seed, "task": spec.task, "status": "ok", "error": None,
                  "pack": [s.seed for s in specs], "pid": os.getpid()}
        write_record(spec.record_path, record)
        out.append(record)
    return out


def fake_pack_dies(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """The pack holding seed 1 kills its process (segfault, OOM killer); the others succeed."""
    if any(s.seed == 1 for s in specs):
        os._exit(3)
    return fake_pack(specs)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def records(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))]
    return {(r["method"], r["seed"]): r for r in found}


@pytest.mark.parametrize("launcher", ["inline", "local"])
def test_launchers_run_packs_and_return_records_in_spec_order(tmp_path: Path, launcher: str) -> None:
    specs = [make_spec(tmp_path, seed) for seed in (0, 1, 2)] + [make_spec(tmp_path, 0, task="faces")]
    specs.insert(1, make_spec(tmp_path, 0, method="bitfit"))
    started, done = [], []
    recs = launch(specs, launcher, LaunchOptions(pack=2, device="cpu", workers=2), execute_group=fake_pack,
                  on_start=lambda s: started.append(s.run_id), on_done=lambda s, r: done.append(s.run_id))
    assert [r["run_id"] for r in recs] == [s.run_id for s in specs]
    packs = {(s.task, s.method, s.seed): tuple(r["pack"]) for s, r in zip(specs, recs, strict=True)}
    assert packs == {("digits", "lora", 0): (0, 1), ("digits", "lora", 1): (0, 1), ("digits", "lora", 2): (2,),
                     ("digits", "bitfit", 0): (0,), ("faces", "lora", 0): (0,)}
    assert sorted(started) == sorted(done) == sorted(s.run_id for s in specs)
    one_process = {r["pid"] for s, r in zip(specs, recs, strict=True) if s.task == "digits" and s.method == "lora"
                   and s.seed < 2}
    assert len(one_process) == 1  # a pack is one unit of work: one worker ran both members


def test_a_dead_worker_fails_only_its_pack(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed) for seed in (0, 1, 2, 3)]
    recs = launch(specs, "local", LaunchOptions(pack=2, device="cpu", workers=1), execute_group=fake_pack_dies)
    assert [r["status"] for r in recs] == ["failed", "failed", "ok", "ok"]
    assert all(r["error"]["type"] == "WorkerDied" for r in recs[:2])
    on_disk = [json.loads(s.record_path.read_text())["status"] for s in specs]
    assert on_disk == ["failed", "failed", "ok", "ok"]


def test_every_member_is_claimed_and_a_held_one_is_skipped(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, seed) for seed in (0, 1, 2)]
    other = acquire(specs[1].record_path)  # another sweep (a live process: this one) runs seed 1
    assert not isinstance(other, Busy)
    seen: list[list[int]] = []

    def check(group: list[RunSpec]) -> list[dict[str, Any]]:
        for spec in group:  # held while the pack trains
            assert isinstance(acquire(spec.record_path), Busy)
        seen.append([s.seed for s in group])
        return fake_pack(group)

    try:
        recs = launch(specs, "inline", LaunchOptions(pack=3), execute_group=check)
    finally:
        other.release()
    assert seen == [[0, 2]]  # the pack trains without the member another sweep holds
    assert [r["status"] for r in recs] == ["ok", "claimed", "ok"]
    assert not specs[1].record_path.exists()
    assert not any(p.name.endswith(".claim") for p in tmp_path.rglob(".*"))  # all released


def test_plan_groups_keeps_packs_to_one_backbone_and_size(tmp_path: Path) -> None:
    specs = [make_spec(tmp_path, s) for s in range(5)] + [make_spec(tmp_path, 0, method="bitfit")]
    assert plan_groups(specs, 1) == [[i] for i in range(6)]
    assert plan_groups(specs, 3) == [[0, 1, 2], [3, 4], [5]]
    tune = [RunSpec(**{**make_spec(tmp_path, s).to_dict(), "protocol": "tune"}) for s in range(2)]
    assert plan_groups(tune, 2) == [[0], [1]]  # a tune run packs its grid (--pack-tune), not its seeds


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_pack_option_is_an_error_before_anything_runs(tmp_path: Path, value: Any) -> None:
    with pytest.raises(PetlbenchError, match="--pack"):
        launch([make_spec(tmp_path)], "inline", LaunchOptions(pack=value), execute_group=fake_pack)
    assert not list(tmp_path.rglob("*.json"))


@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5", ""])
def test_bad_pack_value_is_one_line(tmp_path: Path, value: str) -> None:
    result = run("run", "--suite", "demo", "--method", "lora", "--pack", value, "--output", str(tmp_path / "res"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --pack") and "Fix:" in lines[0], result.output
    assert not (tmp_path / "res").exists()


def test_dry_run_shows_the_packs(tmp_path: Path) -> None:
    result = run("run", "--suite", "demo", "--method", "lora", "--task", "digits", "--seeds", "0,1,2", "--pack", "2",
                 "--dry-run", "--output", str(tmp_path / "res"))
    assert result.exit_code == 0, result.output
    assert "packing (--pack 2): 3 run(s) to do in 2 step group(s)" in result.output
    assert "pack 1: demo/digits/lora/seed0 + demo/digits/lora/seed1" in result.output
    assert "pack 2: demo/digits/lora/seed2  (alone)" in result.output


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory) -> dict[tuple[str, int], dict[str, Any]]:
    out = tmp_path_factory.mktemp("pack1") / "res"
    result = run("run", "--suite", "demo", "--method", "lora", "--task", "digits", "--seeds", "0,1", "--pack", "1",
                 "--output", str(out), "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    return records(out)


@pytest.mark.parametrize("launcher", ["inline", "local"])
def test_packed_sweep_gives_the_records_of_one_by_one(tmp_path: Path, one_by_one, launcher: str) -> None:
    out = tmp_path / "res"
    extra = ["--workers", "1", "--device", "cpu"] if launcher == "local" else []
    result = run("run", "--suite", "demo", "--method", "lora", "--task", "digits", "--seeds", "0,1", "--pack", "2",
                 "--launcher", launcher, *extra, "--output", str(out), "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    packed = records(out)
    assert packed.keys() == one_by_one.keys() == {("lora", 0), ("lora", 1)}
    for key, alone in one_by_one.items():
        got = packed[key]
        assert got["status"] == alone["status"] == "ok"
        assert got["run_id"] == alone["run_id"]
        assert got["efficiency"]["packed_runs"] == 2 and "pack_fallback" not in got["efficiency"]
        assert "packed_runs" not in alone["efficiency"]
        assert got["metrics"]["top1"] == alone["metrics"]["top1"]
        assert got["metrics"]["curve"] == alone["metrics"]["curve"]
        assert got["metrics"]["train_loss"] == pytest.approx(alone["metrics"]["train_loss"], rel=1e-5, abs=1e-6)
    assert packed[("lora", 0)]["metrics"]["curve"] != packed[("lora", 1)]["metrics"]["curve"] or \
        packed[("lora", 0)]["metrics"]["train_loss"] != packed[("lora", 1)]["metrics"]["train_loss"]  # seeds differ


def test_pack_tune_reaches_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "res"
    result = run("run", "--suite", "demo", "--method", "lora", "--task", "digits", "--protocol", "tune", "--pack-tune",
                 "--pack", "2", "--output", str(out), "--quiet", "--set", "epochs=1", "--set", "warmup_epochs=0",
                 "--set", "limit_train=32", "--set", "limit_eval=32", "--set", "batch_size=16",
                 "--set", "tune_lr=1e-3,1e-2", "--set", "tune_weight_decay=0")
    assert result.exit_code == 0, result.output
    (record,) = records(out).values()
    assert record["metrics"]["tuning"]["packed"] is True
    assert "packed_runs" not in record["efficiency"]  # a tune run is never packed with other runs


@pytest.mark.parametrize("pack", [1, 2])
def test_sweep_runs_on_the_options_device_packed_or_not(tmp_path: Path, monkeypatch, pack: int) -> None:
    """sweep.execute inline: --pack 1 (the per-run engine with an epoch bar) and --pack 2 (the packed
    engine) both run on ``options.device``; a ``device`` argument replaces it for both."""
    from petlbench import runner, sweep

    seen: list[str] = []

    def engine(spec: RunSpec, quiet: bool = True, device: str = "auto", **_kw: Any) -> dict[str, Any]:
        seen.append(device)
        return fake_pack([spec])[0]

    def packed(specs: list[RunSpec], quiet: bool = True, device: str = "auto", **_kw: Any) -> list[dict[str, Any]]:
        seen.extend(device for _ in specs)
        return fake_pack(specs)

    monkeypatch.setattr(runner, "execute_spec", engine)
    monkeypatch.setattr(runner, "execute_packed", packed)
    specs = [make_spec(tmp_path / "a", seed=s) for s in (0, 1)]
    plan = sweep.Plan(specs, None, tmp_path, "vtab1k", "micro", None, None)
    sweep.execute(plan, specs, "inline", LaunchOptions(device="cpu", pack=pack), quiet=True)
    assert seen == ["cpu", "cpu"]
    seen.clear()
    specs = [make_spec(tmp_path / "b", seed=s) for s in (0, 1)]
    sweep.execute(plan, specs, "inline", LaunchOptions(device="auto", pack=pack), quiet=True, device="cpu")
    assert seen == ["cpu", "cpu"]
