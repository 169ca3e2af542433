"""Packed runs (several runs sharing a frozen backbone in one vmapped step) give the numbers of
the same runs trained one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from petlbench import engine
from petlbench.model import create_model
from petlbench.packing import pack_problem, train_packed
from petlbench.registry import get_method
from petlbench.runner import execute_packed, execute_spec, pack_groups, seed_everything
from petlbench.sweep import plan
from tests.conftest import TINY_VIT
from tests.test_compile_once import ImageLoader, _cfg

FAST_SETS = {"epochs": 2, "warmup_epochs": 1, "limit_train": 64, "limit_eval": 64, "batch_size": 32}
TOL = {"rtol": 1e-5, "atol": 1e-6}  # batched kernels sum in another order; nothing else differs
# AdamW divides by the gradient's running RMS, so an element whose gradient is rounding noise moves
# by up to lr per step either way: parameters are compared with an absolute tolerance of that size.
PARAM_TOL = {"rtol": 1e-3, "atol": 1e-4}


pytestmark = pytest.mark.usefixtures("demo_cache")  # tests/conftest.py: one demo cache per process


def _models(method: str, seeds, classes: int = 4, **hparams):
    arch, kw = TINY_VIT
    out = []
    for seed in seeds:
        seed_everything(seed)
        out.append(create_model(arch, method, classes, backbone_kwargs=kw, reuse_backbone=True, **hparams))
    return out


# Dropout off: with it a packed run draws other (equally valid) masks than the same run alone.
@pytest.mark.parametrize("method, hparams", [("lora", {}), ("adapter", {"dropout": 0.0}), ("ssf", {}), ("bitfit", {}),
                                             ("vpt_shallow", {"dropout": 0.0}), ("arc", {"dropout": 0.0})])
def test_packed_engine_equals_one_by_one(method, hparams) -> None:
    seeds, lrs = (0, 1, 2), (1e-2, 3e-3, 1e-2)  # a tune grid packs too: each run keeps its own AdamW
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 4, (20,))
    cfgs = [_cfg(epochs=2, compile=False, lr=lr, grad_clip=1.0, label_smoothing=0.1) for lr in lrs]
    alone, states = [], []
    for seed, cfg, model in zip(seeds, cfgs, _models(method, seeds, **hparams), strict=True):
        res = engine.train(model, ImageLoader(x, y, 8, True, seed, False), {"test": ImageLoader(x, y, 8, False, 0, False)},
                           cfg, torch.device("cpu"), eval_every=1)
        alone.append(res)
        states.append(model.trainable_state_dict())
    models = _models(method, seeds, **hparams)
    packed = train_packed(models, [ImageLoader(x, y, 8, True, s, False) for s in seeds],
                          [{"test": ImageLoader(x, y, 8, False, 0, False)} for _ in seeds], cfgs, torch.device("cpu"),
                          eval_every=1)
    for a, p, state, model in zip(alone, packed, states, models, strict=True):
        assert p.curve == a.curve
        torch.testing.assert_close(torch.tensor(p.train_loss), torch.tensor(a.train_loss), **TOL)
        for k, v in model.trainable_state_dict().items():
            torch.testing.assert_close(v, state[k], **PARAM_TOL)
        assert p.train_images == a.train_images
    assert models[1].net.blocks[0].attn.qkv.weight.data_ptr() == models[0].net.blocks[0].attn.qkv.weight.data_ptr() \
        or method == "bitfit"  # one frozen backbone in memory for the pack


def test_what_cannot_be_packed_says_why() -> None:
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    loaders = [ImageLoader(x, y, 4, True, s, False) for s in (0, 1)]
    cfgs = [_cfg(compile=False)] * 2
    cpu = torch.device("cpu")
    assert pack_problem(_models("lora", (0, 1)), cfgs, loaders, cpu) is None
    assert "different methods" in pack_problem([*_models("lora", (0,)), *_models("adapter", (1,))], cfgs, loaders, cpu)
    assert "linear probing" in pack_problem(_models("linear", (0, 1)), cfgs, loaders, cpu)
    assert "differ in a setting" in pack_problem(_models("lora", (0, 1)), [cfgs[0], _cfg(epochs=3)], loaders, cpu)
    arch, kw = TINY_VIT
    other = create_model(arch, "lora", 4, backbone_kwargs=kw)  # its own random backbone
    assert "frozen tensor" in pack_problem([*_models("lora", (0,)), other], cfgs, loaders, cpu)
    with pytest.raises(ValueError, match="cannot pack"):
        train_packed(_models("lora", (0,)), loaders[:1], [{}], cfgs[:1], cpu)


def test_packed_sweep_records_equal_one_by_one(tmp_path) -> None:
    specs = plan("demo", ["lora"], ["digits"], [0, 1, 2], output=str(tmp_path / "a"), sets=FAST_SETS).specs
    alone = [execute_spec(s) for s in specs]
    packed_specs = plan("demo", ["lora"], ["digits"], [0, 1, 2], output=str(tmp_path / "b"), sets=FAST_SETS).specs
    groups = pack_groups(packed_specs, 4)
    assert [len(g) for g in groups] == [3]
    packed = execute_packed(groups[0])
    for a, p in zip(alone, packed, strict=True):
        assert p["status"] == "ok", p["error"]
        assert p["efficiency"]["packed_runs"] == 3 and "pack_fallback" not in p["efficiency"]
        assert p["run_id"] == a["run_id"] and p["metrics"]["curve"] == a["metrics"]["curve"]
        assert p["metrics"]["top1"] == a["metrics"]["top1"]
        torch.testing.assert_close(torch.tensor(p["metrics"]["train_loss"]), torch.tensor(a["metrics"]["train_loss"]),
                                   **TOL)
    assert (tmp_path / "b").exists() and len(list((tmp_path / "b").rglob("*.json"))) == 3


def test_groups_and_fallback(tmp_path, monkeypatch) -> None:
    mixed = plan("demo", ["lora", "linear"], ["digits", "faces"], [0, 1], output=str(tmp_path), sets=FAST_SETS).specs
    groups = pack_groups(mixed, 2)
    # LoRA seeds pair up per task; linear probing never packs, so its runs are never grouped
    assert sorted(len(g) for g in groups) == [1, 1, 1, 1, 2, 2]
    assert all(len({(s.task, s.method) for s in g}) == 1 for g in groups)
    assert all(g[0].method == ("lora" if len(g) == 2 else "linear") for g in groups)
    assert [len(g) for g in pack_groups(mixed, 1)] == [1] * 8
    lora = [s for s in mixed if s.method == "lora" and s.task == "digits"]
    assert get_method("spt_lora").needs_calibration and get_method("gps").needs_calibration  # per-run masks
    calibrated = [dataclasses.replace(s, method=m) for s in lora for m in ("spt_lora", "gps")]
    assert [len(g) for g in pack_groups(calibrated, 4)] == [1] * 4
    linear = [s for s in mixed if s.method == "linear" and s.task == "digits"]
    recs = execute_packed(linear)  # handed a pack anyway, each runs alone
    assert all(r["status"] == "ok" and "packed_runs" not in r["efficiency"] for r in recs)
    from petlbench import packing

    monkeypatch.setattr(packing, "pack_problem", lambda *a: "a reason only the packer knows")
    recs = execute_packed(lora)  # refused when training starts: each runs alone, and says why
    assert all(r["status"] == "ok" and "a reason only the packer knows" in r["efficiency"]["pack_fallback"]
               for r in recs)


def test_packed_tune_grid_equals_one_by_one(tmp_path) -> None:
    sets = {**FAST_SETS, "epochs": 1, "warmup_epochs": 0, "limit_train": 32, "tune_lr": "1e-3,1e-2",
            "tune_weight_decay": "0"}
    spec = plan("demo", ["lora"], ["digits"], [0], output=str(tmp_path / "a"), protocol="tune", sets=sets).specs[0]
    alone = execute_spec(spec)
    packed = execute_spec(spec, pack_tune=True)
    assert alone["status"] == packed["status"] == "ok", (alone["error"], packed["error"])
    assert packed["metrics"]["tuning"]["packed"] and not alone["metrics"]["tuning"]["packed"]
    assert packed["metrics"]["tuning"]["grid"] == alone["metrics"]["tuning"]["grid"]
    assert packed["metrics"]["curve"] == alone["metrics"]["curve"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_packs_compile_once_and_equal_eager(monkeypatch, backend) -> None:
    """Packs of three tasks with different class counts and a short last batch: one graph, the
    numbers of the eager pack."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("PETLBENCH_COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    engine.FEATURE_COMPILER.clear()
    counters.clear()
    seeds = (0, 1)
    try:
        for classes in (3, 10, 47):
            x, y = torch.randn(10, 3, 32, 32), torch.randint(0, classes, (10,))
            out = {}
            for compiled in (False, True):
                models = _models("lora", seeds, classes)
                res = train_packed(models, [ImageLoader(x, y, 4, True, s, False) for s in seeds],
                                   [{"test": ImageLoader(x, y, 8, False, 0, False)} for _ in seeds],
                                   [_cfg(epochs=2, compile=compiled)] * 2, torch.device("cpu"))
                out[compiled] = res, [m.trainable_state_dict() for m in models]
            (eager, e_states), (comp, c_states) = out[False], out[True]
            for e, c, es, cs in zip(eager, comp, e_states, c_states, strict=True):
                assert c.compiled is True and e.compiled is False, c.compile_info
                assert c.curve == e.curve and c.train_images == e.train_images == 20
                torch.testing.assert_close(torch.tensor(c.train_loss), torch.tensor(e.train_loss), **TOL)
                for k in es:
                    torch.testing.assert_close(cs[k], es[k], **PARAM_TOL)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["unimplemented"]
    finally:
        torch._dynamo.reset()
        engine.FEATURE_COMPILER.clear()
