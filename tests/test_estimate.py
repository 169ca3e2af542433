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

TINY = {"depth": 1, "embed_dim": 32, "num_heads": 1, "img_size": 32}


def test_workload_uses_the_methods_batch_size_and_every_task() -> None:
    arc = estimate.workload("vtab", "arc")
    assert len(arc) == 19 and {t.batch_size for t in arc} == {32} and {t.epochs for t in arc} == {100}
    assert sum(t.train_steps for t in arc) == 19 * 100 * 32  # 1000 images: 31 full batches and one of 8
    by_name = {t.name: t for t in arc}
    assert by_name["dsprites_loc"].test_images == 73728 and by_name["kitti"].eval_batches == 3
    linear = estimate.workload("vtab", "linear")
    assert {t.batch_size for t in linear} == {64} and sum(t.train_steps for t in linear) == 19 * 100 * 16
    assert {t.batch_size for t in estimate.workload("vtab", "arc", {"batch_size": 100})} == {100}


def test_counts_agree_with_torchs_flop_counter() -> None:
    with torch.device("meta"):
        model = petlbench.create_model("vit_base_patch16_224", "arc", 10, backbone_kwargs=TINY)
    counted = estimate.count(model, 4, 8, 10, 32, grad_clip=1.0)
    step, _ = estimate._step_fn(model, 4, 10, 32, torch.device("meta"), 1.0)
    _, forward = estimate._step_fn(model, 8, 10, 32, torch.device("meta"), 1.0)
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
    assert "| H100 | eager (today) |" in result.output and "| H200 | compiled / graphed |" in result.output
    saved = json.loads((tmp_path / "est.json").read_text())
    assert saved[0]["modelled"]["H100"]["eager"]["total_s"] > 0
    assert saved[0]["cache"]["native_bytes"] <= saved[0]["cache"]["at_input_size_bytes"]
