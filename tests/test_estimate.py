"""The sweep estimate: the workload is the suite's and the method's real one, the counts agree with
torch's FLOP counter, the GPU model orders its modes sensibly, and the CLI prints the breakdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import petlbench
from petlbench import estimate
from petlbench.cli import main
from petlbench.estimate.counting import _step_fn
from petlbench.estimate.gpumodel import _sweep

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 1, "img_size": 32}


def test_workload_uses_the_methods_batch_size_and_every_task() -> None:
    arc = estimate.workload("vtab", "arc")
    assert len(arc) == 19 and {t.batch_size for t in arc} == {32} and {t.epochs for t in arc} == {100}
    assert sum(t.train_steps for t in arc) == 19 * 100 * 32  # 1000 images: 31 full batches and one of 8
    by_name = {t.name: t for t in arc}
    assert by_name["dsprites_loc"].test_images == 73728 and by_name["kitti"].eval_batches == 3
    linear = estimate.workload("vtab", "linear")  # VPT's recipe: batch 128, no drop_last: 8 steps per epoch
    assert {t.batch_size for t in linear} == {128} and sum(t.train_steps for t in linear) == 19 * 100 * 8
    assert {t.batch_size for t in estimate.workload("vtab", "arc", {"batch_size": 100})} == {100}


def test_counts_agree_with_torchs_flop_counter() -> None:
    with torch.device("meta"):
        model = petlbench.create_model("vit_base_patch16_224", "arc", 10, backbone_kwargs=TINY)
    counted = estimate.count(model, 4, 8, 10, 32, grad_clip=1.0)
    step, _ = _step_fn(model, 4, 10, 32, torch.device("meta"), 1.0)
    _, forward = _step_fn(model, 8, 10, 32, torch.device("meta"), 1.0)
    step()
    with FlopCounterMode(display=False) as fc:
        step()
    with FlopCounterMode(display=False) as fc_eval:
        forward()
    assert counted["eval_batch"].flops == fc_eval.get_total_flops() > 0  # attention: same FLOPs fused or not
    # training: the flash backward recomputes the scores (2.5x the forward's attention FLOPs, not 2x)
    assert fc.get_total_flops() < counted["train_step"].flops < 1.05 * fc.get_total_flops()
    names = [o[0] for o in counted["train_step"].ops]
    assert "flash_attention_forward" in names and "flash_attention_backward" in names
    assert "bmm" not in names  # no N x N score matrices are counted
    assert counted["train_step"].n_ops > counted["eval_batch"].n_ops > 0
    assert any(o[3] for o in counted["train_step"].ops)  # the optimiser phase is marked
    views = [o for o in counted["train_step"].ops if o[0].endswith("(no data)")]
    assert views and all(o[2] == 0 for o in views)  # views move no bytes


def test_gpu_model_orders_its_modes() -> None:
    with torch.device("meta"):
        model = petlbench.create_model("vit_base_patch16_224", "arc", 10, backbone_kwargs=TINY)
    counts = estimate.count(model, 32, 64, 10, 32, grad_clip=0.0)["train_step"]
    h100 = estimate.gpu_time(counts, estimate.GPUS["H100"], host_per_op_s=5e-6)
    h200 = estimate.gpu_time(counts, estimate.GPUS["H200"], host_per_op_s=5e-6)
    assert h100["matmul_floor_s"] <= h100["compiled_s"] <= h100["eager_s"]
    assert h200["compiled_s"] <= h100["compiled_s"]  # same peak, more bandwidth
    assert h100["eager_host_s"] == pytest.approx(counts.n_ops * 5e-6)
    slow_host = estimate.gpu_time(counts, estimate.GPUS["H100"], host_per_op_s=1e-3)
    assert slow_host["eager_s"] == slow_host["eager_host_s"] > h100["eager_s"]  # eager is host-bound then


def test_cli_prints_the_modelled_breakdown(tmp_path: Path) -> None:
    args = ["bench", "--sweep-estimate", "-m", "arc", "--no-timing", "--out", str(tmp_path / "est")]
    for key, value in TINY.items():
        args += ["--backbone-arg", f"{key}={value}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "batch 32" in result.output and "60,800 train steps" in result.output
    assert "Counted (exact" in result.output and "Modelled per GPU" in result.output
    assert "| H100 | eager (default) | 1 |" in result.output and "| H200 | compiled / graphed | 3 |" in result.output
    saved = json.loads((tmp_path / "est.json").read_text())
    assert saved[0]["modelled"]["H100"]["eager"]["total_s"] > 0
    assert saved[0]["cache"]["native_bytes"] <= saved[0]["cache"]["at_input_size_bytes"]


def _tiny_estimate() -> dict:
    return estimate.estimate("arc", "vit_base_patch16_224", "vtab", backbone_kwargs=TINY, timing=False)


def test_packs_model_what_packing_shares() -> None:
    with torch.device("meta"):
        model = petlbench.create_model("vit_base_patch16_224", "arc", 10, backbone_kwargs=TINY)
    counts = estimate.count(model, 32, 64, 10, 32, grad_clip=1.0)["train_step"]
    gpu = estimate.GPUS["H100"]
    one = estimate.gpu_time(counts, gpu, 5e-6, 1000, 4)
    three = estimate.gpu_time(counts, gpu, 5e-6, 1000, 4, pack=3, pack_host_ratio=1.5)
    assert three["eager_host_s"] == pytest.approx(1.5 * one["eager_host_s"])  # host work: the measured ratio
    assert three["matmul_floor_s"] == pytest.approx(3 * one["matmul_floor_s"])  # R x the rows
    assert one["compiled_s"] < three["compiled_s"] <= 3 * one["compiled_s"]  # floors and casts paid once
    assert one["compiled_host_s"] > 0
    assert three["compiled_host_s"] == pytest.approx(3 * one["compiled_host_s"])  # one AdamW per run
    loads = estimate.workload("vtab", "arc")
    sweep1 = _sweep(loads, 0.01, 0.02, 4.0, 1.0)
    sweep3 = _sweep(loads, 0.025, 0.02, 4.0, 1.0, pack=3)
    assert sweep1["fixed_s"] == pytest.approx(4.0 + 19 * 1.0)  # build + hash once per process, the rest per run
    assert sweep3["fixed_s"] == pytest.approx(4.0 + 3 * 19 * 1.0)
    assert sweep3["eval_s"] == pytest.approx(3 * sweep1["eval_s"])  # each run evaluates its own model
    assert sweep3["per_run_s"] == pytest.approx(sweep3["total_s"] / 3) and sweep1["per_run_s"] == sweep1["total_s"]


def test_estimate_counts_merged_eval_and_reports_packs() -> None:
    r = _tiny_estimate()
    assert r["counted"]["eval_merged"] is True  # ARC merges: evaluated as the plain backbone
    linear = estimate.estimate("linear", "vit_base_patch16_224", "vtab", backbone_kwargs=TINY, timing=False)
    assert r["counted"]["eval_batch"]["ops"] == linear["counted"]["eval_batch"]["ops"]
    assert r["measured"]["packed_host"]["3"]["ratio"] > 0  # measured (its size is not tested: it is a timing)
    assert linear["measured"]["packed_host"]["3"]["ratio"] is None  # linear probing never packs
    for g in r["modelled"].values():
        assert g["packs"]["3"]["compiled"]["pack"] == 3
    assert not linear["modelled"]["H100"]["packs"]
    text = estimate.to_markdown(r)
    assert "| H100 | compiled / graphed | 3 |" in text and "sweep per seed" in text and "Target (" in text


@pytest.mark.parametrize(("ratio", "pack_wins"), [(1.5, True), (4.0, False)])
def test_packing_gains_in_eager_mode_follow_the_measured_host_ratio(monkeypatch: pytest.MonkeyPatch, ratio: float,
                                                                     pack_wins: bool) -> None:
    """The host-bound eager step of a pack of 3 costs ``ratio`` x one run's host work: per seed, a
    pack wins when the ratio is below 3 and loses above. The host costs are given, not timed, so
    the outcome cannot depend on how busy the machine is."""
    from petlbench.estimate import assemble

    monkeypatch.setattr(assemble, "host_cost_per_op",
                        lambda *a, **k: {"per_op_s": 5e-6, "tiny_step_s": 1e-3, "tiny_step_ops": 200})
    monkeypatch.setattr(assemble, "packed_host_ratio", lambda *a, **k: {"pack": 3, "ratio": ratio})
    r = _tiny_estimate()
    for g in r["modelled"].values():
        one, pack = g["train_step"], g["packs"]["3"]["train_step"]
        assert one["eager_host_s"] > one["eager_gpu_s"]  # the tiny ViT's eager step is host-bound
        assert pack["eager_host_s"] == pytest.approx(ratio * one["eager_host_s"])
        assert (g["packs"]["3"]["eager"]["per_run_s"] < g["eager"]["per_run_s"]) is pack_wins


def test_remodel_from_a_saved_estimate_keeps_what_was_measured(tmp_path: Path) -> None:
    saved = json.loads(json.dumps(_tiny_estimate()))  # as written to disk
    saved["measured"].update(train_step_s=2.0, eval_batch_s=3.0, eval_measured_at_batch=32,
                             fixed={"build_model_s": 5.0, "hash_weights_s": 1.0, "deployed_latency_s": 9.0})
    saved["measured"]["host"]["per_op_s"] = 7e-6
    saved["modelled"] = {"H100": {"stale": True}}  # a table made by an older model
    r = estimate.remodel(saved)
    assert r["measured"]["train_step_s"] == 2.0 and r["measured"]["fixed"]["build_model_s"] == 5.0
    assert r["measured"]["fixed"]["model_from_cache_s"] >= 0  # measured now
    assert r["measured"]["remodelled"]["kept_from_saved"] and "stale" not in r["modelled"]["H100"]
    g = r["modelled"]["H100"]
    assert g["fixed_per_process_s"] == pytest.approx(6.0)  # the saved build + hash
    assert g["train_step"]["eager_host_s"] >= r["counted"]["train_step"]["ops"] * 7e-6  # the saved host cost
    assert r["measured"]["sweep_on_this_cpu"]["train_s"] == pytest.approx(r["train_steps"] * 2.0)
    assert "Re-modelled on" in estimate.to_markdown(r)
    saved["counted"]["train_step"]["ops"] += 1  # made by other code: refuse rather than mix models
    with pytest.raises(petlbench.PetlbenchError, match="counts differ"):
        estimate.remodel(saved)


def test_cli_remodels_a_saved_file_and_rejects_bad_ones(tmp_path: Path) -> None:
    target = tmp_path / "est.json"
    target.write_text(json.dumps([_tiny_estimate()]))
    result = CliRunner().invoke(main, ["bench", "--sweep-estimate", "-m", "arc", "--remodel", str(target), "--out",
                                       str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert "Re-modelled on" in (tmp_path / "again.md").read_text()
    (tmp_path / "bad.json").write_text("{\"not\": \"an estimate\"}")
    for bad in (tmp_path / "bad.json", tmp_path / "missing.json"):
        result = CliRunner().invoke(main, ["bench", "--sweep-estimate", "-m", "arc", "--remodel", str(bad)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "--remodel" in lines[0], result.output
