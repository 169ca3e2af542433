"""The runner end to end on the offline demo suite (CPU): records, resume, failures, determinism,
protocols and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import petlbench
from petlbench.cli import main
from petlbench.records import REQUIRED, SCHEMA_VERSION, read_record
from petlbench.runner import execute_spec
from petlbench.sweep import plan

FAST = ["--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "limit_train=64", "--set", "limit_eval=64",
        "--set", "batch_size=32"]
FAST_SETS = {"epochs": 2, "warmup_epochs": 1, "limit_train": 64, "limit_eval": 64, "batch_size": 32}


pytestmark = pytest.mark.usefixtures("demo_cache")  # tests/conftest.py: one demo cache per process


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.rglob("*.json"))]


def test_demo_sweep_end_to_end(tmp_path) -> None:
    out = tmp_path / "res"
    result = run("run", "--suite", "demo", "--method", "linear,arc", "--task", "digits", "--task", "rotation",
                 "--output", str(out), "--quiet", *FAST)
    assert result.exit_code == 0, result.output
    recs = records(out)
    assert len(recs) == 4
    assert {(r["task"], r["method"]) for r in recs} == {(t, m) for t in ("digits", "digits_rotation")
                                                       for m in ("linear", "arc")}
    for r in recs:
        assert set(REQUIRED) <= set(r) and r["schema_version"] == SCHEMA_VERSION
        assert r["status"] == "ok" and r["error"] is None
        assert r["protocol"] == "vtab1k" and r["config"]["splits"]["train"] == "train800val200"
        assert 0.0 <= r["metrics"]["top1"] <= 100.0
        assert r["metrics"]["top1"] == r["metrics"]["curve"][-1]["top1"]  # final epoch, no selection
        assert r["params"]["trainable"] > 0 and r["config"]["train"]["epochs"] == 2
        prov = r["provenance"]
        assert len(prov["weights_sha256"]) == 64 and prov["data_fingerprint"]["test"]
        assert prov["torch"] == torch.__version__ and prov["start_time"] <= prov["end_time"]
        assert r["efficiency"]["train_images_per_s"] > 0
    assert "| ARC |" in result.output and "Digits-Rotation" in result.output


def test_rerun_skips_finished_runs_and_force_redoes(tmp_path) -> None:
    out = tmp_path / "res"
    args = ["run", "--suite", "demo", "--method", "linear", "--task", "faces", "--output", str(out), "--quiet", *FAST]
    assert run(*args).exit_code == 0
    (path,) = list(out.rglob("*.json"))
    stamp = path.stat().st_mtime_ns
    again = run(*args)
    assert again.exit_code == 0 and path.stat().st_mtime_ns == stamp
    assert "1 ok, 0 failed" in again.output
    assert run(*args, "--force").exit_code == 0 and path.stat().st_mtime_ns != stamp


def test_same_seed_same_numbers(tmp_path) -> None:
    spec = plan("demo", ["lora"], ["digits"], [3], output=str(tmp_path), sets=FAST_SETS).specs[0]
    first = execute_spec(spec)
    second = execute_spec(spec)
    assert first["status"] == "ok"
    assert first["metrics"]["curve"] == second["metrics"]["curve"]
    assert first["metrics"]["train_loss"] == second["metrics"]["train_loss"]
    other = plan("demo", ["lora"], ["digits"], [4], output=str(tmp_path), sets=FAST_SETS).specs[0]
    assert other.run_id != spec.run_id
    assert execute_spec(other)["metrics"]["train_loss"] != first["metrics"]["train_loss"]


class NaNGain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain * float("nan")


class Exploding(petlbench.Method):
    """A plugin whose forward produces NaN: the run must be recorded as failed, the sweep go on."""

    name = "exploding"
    summary = "test plugin"

    def apply(self, backbone, petl):
        petl["gain"] = NaNGain()
        backbone.transform_output(backbone.final_norm, petl["gain"])


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path) -> None:
    petlbench.register_method(Exploding)
    try:
        out = tmp_path / "res"
        result = run("run", "--suite", "demo", "--method", "exploding,linear", "--task", "digits", "--output",
                     str(out), "--quiet", *FAST)
        assert result.exit_code == 1
        by_method = {r["method"]: r for r in records(out)}
        assert by_method["linear"]["status"] == "ok"
        failed = by_method["exploding"]
        assert failed["status"] == "failed" and "non-finite training loss" in failed["error"]["message"]
        assert "FAILED demo/digits/exploding" in result.output
    finally:
        petlbench.unregister_method("exploding")


def test_legacy_protocol_is_labelled_and_selects_on_test(tmp_path) -> None:
    spec = plan("demo", ["linear"], ["digits"], [0], output=str(tmp_path), protocol="legacy-best-test",
                sets={**FAST_SETS, "epochs": 3}).specs[0]
    rec = execute_spec(spec)
    tests = [c["top1"] for c in rec["metrics"]["curve"] if c["split"] == "test"]
    assert len(tests) == 3 and rec["metrics"]["top1"] == max(tests)
    assert rec["metrics"]["selected_on"] == "test" and "TEST set" in rec["protocol_description"]


def test_tune_protocol_selects_on_val(tmp_path) -> None:
    spec = plan("demo", ["linear"], ["digits"], [0], output=str(tmp_path), protocol="tune",
                sets={**FAST_SETS, "tune_lr": "1e-4,1e-2", "tune_weight_decay": "0"}).specs[0]
    rec = execute_spec(spec)
    assert rec["status"] == "ok", rec["error"]
    grid = rec["metrics"]["tuning"]["grid"]
    assert [g["lr"] for g in grid] == [1e-4, 1e-2]
    best = max(grid, key=lambda g: g["val_top1"])
    assert rec["config"]["train"]["lr"] == best["lr"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--suite", "vtabb", "--method", "arc"], "Did you mean 'vtab'"),
        (["--suite", "demo", "--method", "arcc"], "Did you mean 'arc'"),
        (["--suite", "demo", "--method", "arc", "--task", "digts"], "Did you mean 'digits'"),
        (["--suite", "demo", "--method", "arc", "--set", "epoch=3"], "Did you mean 'epochs'"),
        (["--suite", "demo", "--method", "arc", "--set", "epochs=0"], "'epochs' must be >= 1"),
        (["--suite", "demo", "--method", "arc", "--protocol", "best"], "unknown protocol"),
        (["--suite", "demo", "--method", "arc", "--seeds", "a"], "--seeds"),
        (["--suite", "vtab", "--method", "arc", "--data-root", "/nonexistent/vtab", "--pretrained", "none"],
         "/nonexistent/vtab"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(tmp_path, args, needle) -> None:
    result = run("run", *args, "--output", str(tmp_path / "res"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert not (tmp_path / "res").exists()


def test_weights_that_do_not_match_the_backbone(tmp_path) -> None:
    import timm

    from petlbench.weights import save_backbone

    wrong = save_backbone(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48,
                                            depth=2, num_heads=3), tmp_path / "wrong.safetensors")
    result = run("run", "--suite", "demo", "--method", "arc", "--pretrained", str(wrong), "--output",
                 str(tmp_path / "res"))
    assert result.exit_code == 2 and "does not match backbone" in result.output


def test_killed_sweep_resumes_without_corrupt_records(tmp_path) -> None:
    """Kill the sweep process mid-run; finished records stay intact and a re-run completes the rest."""
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "petlbench.cli", "run", "--suite", "demo", "--method", "linear,ssf",
           "--task", "digits", "--task", "faces", "--output", str(out), "--quiet",
           "--set", "epochs=4", "--set", "warmup_epochs=1", "--set", "limit_eval=64", "--set", "batch_size=32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.rglob("*.json")):
            time.sleep(0.05)
        assert list(out.rglob("*.json")), "no run finished in time"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {p: p.read_bytes() for p in out.rglob("*.json")}
    assert 1 <= len(before) < 4
    assert all(read_record(p) is not None for p in before), "a finished record is corrupt"
    result = run("run", *cmd[4:])
    assert result.exit_code == 0, result.output
    after = {p: p.read_bytes() for p in out.rglob("*.json")}
    assert len(after) == 4
    assert all(after[p] == data for p, data in before.items()), "finished runs were redone"


def test_config_file_and_local_launcher(tmp_path) -> None:
    """A YAML config (training settings + per-method hyperparameters), run by two worker processes."""
    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: 1\nwarmup_epochs: 0\nlimit_train: 32\nlimit_eval: 32\nbatch_size: 16\n"
                      "methods:\n  lora:\n    rank: 2\n")
    out = tmp_path / "res"
    result = run("run", "--suite", "demo", "--method", "lora,bitfit", "--task", "faces", "--config", str(config),
                 "--set", "lr=0.002", "--launcher", "local", "--workers", "2", "--device", "cpu", "--output", str(out),
                 "--quiet")
    assert result.exit_code == 0, result.output
    by_method = {r["method"]: r for r in records(out)}
    assert by_method["lora"]["config"]["method_hparams"]["rank"] == 2
    assert by_method["lora"]["params"]["trainable_without_head"] == 4 * 2 * 2 * (64 + 64)  # 4 blocks x (q, v) x rank 2
    assert {r["config"]["train"]["lr"] for r in by_method.values()} == {0.002}
    assert len({r["provenance"]["pid"] for r in by_method.values()}) == 2  # one process per run
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods:\n  lora:\n    rnk: 2\n")
    result = run("run", "--suite", "demo", "--method", "lora", "--config", str(bad), "--output", str(out))
    assert result.exit_code == 2 and "Did you mean 'rank'" in result.output


def test_compile_falls_back_to_eager_and_says_so(tmp_path, monkeypatch) -> None:
    from petlbench.engine import FEATURE_COMPILER

    def broken(fn, *args, **kwargs):
        def call(*inputs):
            raise RuntimeError("no compiler on this machine")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    FEATURE_COMPILER.clear()  # graphs compiled earlier in this process would be reused
    spec = plan("demo", ["arc"], ["faces"], [0], output=str(tmp_path), sets={**FAST_SETS, "compile": True}).specs[0]
    try:
        rec = execute_spec(spec)
    finally:
        FEATURE_COMPILER.clear()  # nor may later tests reuse the broken one
    assert rec["status"] == "ok", rec["error"]
    assert rec["efficiency"]["compiled"] is False and "no compiler" in rec["efficiency"]["compile_error"]
