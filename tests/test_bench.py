"""The benchmark must not rot: it runs on CPU at tiny sizes (no timing assertions), and the
deployed model of every mergeable method is structurally the plain backbone."""

from __future__ import annotations

import json

from click.testing import CliRunner

from petlbench.bench import BenchConfig, run_bench, to_markdown
from petlbench.cli import main
from tests.conftest import TINY_VIT


def test_bench_runs_on_cpu_and_reports_every_ratio() -> None:
    arch, kw = TINY_VIT
    result = run_bench(BenchConfig(methods=["lora", "arc", "vpt_deep", "adapter"], backbone=arch, backbone_kwargs=kw,
                                   batch_size=4, iters=2, warmup=1, peft=False))
    rows = {r["method"]: r for r in result["methods"]}
    for name in ("lora", "arc"):
        assert rows[name]["deployed"] == "merged" and rows[name]["extra_after_merge"] == 0
        assert rows[name]["same_structure_as_plain"] is True  # same module classes, same parameter count
        assert rows[name]["flops_deployed"] == result["plain"]["flops"]  # merged = plain: same compute
        assert rows[name]["flops_unmerged"] > rows[name]["flops_deployed"]
    assert rows["vpt_deep"]["deployed"] == "unmerged" and rows["vpt_deep"]["flops_ratio_deployed"] > 1
    for r in rows.values():
        assert r["train_step_s"]["median_s"] > 0 and r["latency_ratio"] > 0 and r["train_step_vs_full"] > 0
        assert r["mfu"] is None  # CPU: no bf16 peak to divide by, and said so
        assert set(r["peak_memory"]) == {"tensors"} and r["memory_vs_full"] > 0  # CPU: live tensor bytes
    text = to_markdown(result)
    assert "not measured here: MFU" in text and "deployed latency / plain" in text
    assert "PASS lora: merged model has the plain backbone's modules and parameter count\n" in text
    assert "peak train memory (live tensors) / full FT" in text and "not measured here: CUDA allocator" in text


def test_bench_no_timing_reports_memory_and_flops_only() -> None:
    arch, kw = TINY_VIT
    result = run_bench(BenchConfig(methods=["arc", "ssf"], backbone=arch, backbone_kwargs=kw, batch_size=2,
                                   timing=False))
    for r in result["methods"]:
        assert r["train_step_s"] is None and r["latency_ratio"] is None and r["train_step_flops"] > 0
        assert r["memory_vs_full"] > 0
    text = to_markdown(result)
    assert "no timing" in text and "not measured here: latency, throughput, MFU and LoRA vs peft" in text
    assert not any("latency" in v["target"] for v in result["verdicts"] if v["ok"] is not None)


def test_bench_cli_json(tmp_path) -> None:
    arch, kw = TINY_VIT
    args = ["bench", "-m", "ssf", "-b", arch, "--batch-size", "2", "--iters", "1", "--warmup", "0", "--no-peft",
            "--json", "--out", str(tmp_path / "r")]
    for k, v in kw.items():
        args += ["--backbone-arg", f"{k}={v}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # progress lines go to stderr
    assert data["methods"][0]["method"] == "ssf" and data["device"].startswith("cpu")
    assert (tmp_path / "r.json").exists() and (tmp_path / "r.md").exists()


def test_bench_calibrates_methods_that_choose_what_trains() -> None:
    """An uncalibrated SPT would train only its class-token delta: the benchmark calibrates it first."""
    arch, kw = TINY_VIT
    result = run_bench(BenchConfig(methods=["spt_lora"], backbone=arch, backbone_kwargs=kw, batch_size=2,
                                   timing=False))
    (row,) = result["methods"]
    assert row["trainable_without_head"] > kw["embed_dim"]
