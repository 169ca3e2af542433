"""torch.compile in a sweep: one graph per model structure and process, whatever the number of
classes or the short last batch; the same numbers as eager; and the record tells the truth when
dynamo falls back to eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from petlbench import engine
from petlbench.model import create_model
from tests.conftest import TINY_VIT

VTAB_CLASSES = (100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9)  # the 19 tasks


def _cfg(**over) -> dict:
    cfg = {"precision": "fp32", "epochs": 1, "batch_size": 4, "compile": True, "lr": 1e-2, "weight_decay": 1e-4,
           "warmup_epochs": 0, "warmup_lr": 0.0, "min_lr": 0.0, "label_smoothing": 0.0, "grad_clip": 0.0,
           "drop_last": False, "eval_batch_size": 8}
    return {**cfg, **over}


class ImageLoader(engine.FeatureLoader):
    """Image batches in a fixed order, with the attributes the engine reads from a DeviceLoader."""

    random_crop = flip = True  # not a fixed-feature probe
    output_size = (32, 32)


@pytest.fixture
def fresh_dynamo(monkeypatch):
    monkeypatch.setenv("PETLBENCH_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    engine.FEATURE_COMPILER.clear()
    counters.clear()
    yield
    torch._dynamo.reset()
    engine.FEATURE_COMPILER.clear()


def test_nineteen_tasks_compile_once(fresh_dynamo) -> None:
    arch, kw = TINY_VIT
    x = torch.randn(10, 3, 32, 32)  # 10 images, batch 4: the last batch is short (2)
    infos = []
    for classes in VTAB_CLASSES:
        model = create_model(arch, "lora", classes, backbone_kwargs=kw)
        y = torch.randint(0, classes, (10,))
        res = engine.train(model, ImageLoader(x, y, 4, True, 0, False), {"test": ImageLoader(x, y, 8, False, 0, False)},
                           _cfg(), torch.device("cpu"))
        infos.append(res.compile_info)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all 19 tasks, short batches included
    assert not counters["unimplemented"] and not sum(counters["graph_break"].values())
    assert all(i["compiled"] is True and i["compile_error"] is None for i in infos)
    assert [i["compile_graphs_built"] for i in infos] == [1] + [0] * 18
    assert infos[0]["compile_backend"] == "eager"


@torch._dynamo.config.patch(recompile_limit=1)
def test_a_new_method_gets_its_own_graph_and_cache(fresh_dynamo) -> None:
    """Many structures in one process never share one code object's recompile budget."""
    arch, kw = TINY_VIT
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for method in ("lora", "arc", "adapter", "lora"):
        model = create_model(arch, method, 3, backbone_kwargs=kw)
        res = engine.train(model, ImageLoader(x, y, 4, True, 0, False), {}, _cfg(), torch.device("cpu"))
        assert res.compiled is True, (method, res.compile_info)
    assert counters["stats"]["unique_graphs"] == 3


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_padded_compiled_training_equals_eager(fresh_dynamo, monkeypatch, backend, smoothing) -> None:
    monkeypatch.setenv("PETLBENCH_COMPILE_BACKEND", backend)
    arch, kw = TINY_VIT
    x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 5, (10,))
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model(arch, "lora", 5, backbone_kwargs=kw)
        res = engine.train(model, ImageLoader(x, y, 4, True, 0, False), {"test": ImageLoader(x, y, 8, False, 0, False)},
                           _cfg(epochs=2, compile=compiled, label_smoothing=smoothing, grad_clip=1.0),
                           torch.device("cpu"))
        out[compiled] = res, model.trainable_state_dict()
        assert res.train_images == 20  # padding rows are not counted as trained images
    (eager, s0), (comp, s1) = out[False], out[True]
    assert comp.compiled is True and eager.compiled is False, comp.compile_info
    assert comp.train_loss == pytest.approx(eager.train_loss, rel=1e-5)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6)


def test_pad_batch_masks_the_loss() -> None:
    logits_w = torch.randn(6, 3, requires_grad=True)
    x, y = torch.randn(2, 6), torch.tensor([0, 2])
    xp, yp = engine.pad_batch(x, y, 5)
    assert xp.shape == (5, 6) and yp.tolist() == [0, 2, -100, -100, -100]
    short = torch.nn.functional.cross_entropy(x @ logits_w, y)
    padded = torch.nn.functional.cross_entropy(xp @ logits_w, yp, ignore_index=-100)
    torch.testing.assert_close(padded, short)
    assert engine.pad_batch(x, y, 2)[0] is x


@torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False)
def test_a_silent_fallback_to_eager_is_recorded(fresh_dynamo) -> None:
    """Past the recompile limit dynamo runs the frame eagerly without a word; the wrapper notices."""
    wrapped = engine.MaybeCompiled(lambda t: t * 2 + 1, True, backend="eager")
    wrapped(torch.ones(3))
    assert wrapped.summary()["compiled"] is True
    wrapped(torch.ones(4))  # a new shape: a recompile, over the limit of 1 -> eager
    info = wrapped.summary()
    assert info["compiled"] is False and "fell back to eager in 1 of 2 calls" in info["compile_error"]


def test_a_compiled_sweep_records_the_truth(fresh_dynamo, tmp_path) -> None:
    """Through the runner: two tasks with different class counts, one graph; the records say so."""
    from petlbench.runner import execute_spec
    from petlbench.sweep import plan
    from tests.shared_cache import demo_cache_env

    sets = {"epochs": 1, "warmup_epochs": 0, "limit_train": 40, "limit_eval": 32, "batch_size": 16, "compile": True}
    with demo_cache_env():
        specs = plan("demo", ["lora"], ["digits", "faces"], [0], output=str(tmp_path), sets=sets).specs
        recs = [execute_spec(s) for s in specs]
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    eff = [r["efficiency"] for r in recs]
    assert [e["compiled"] for e in eff] == [True, True] and [e["compile_graphs_built"] for e in eff] == [1, 0]
    assert eff[0]["compile_backend"] == "eager" and eff[0]["precision"]["autocast"] is None
    assert eff[0]["peak_gpu_mem_allocated"] is None and eff[0]["eval_peak_gpu_mem_allocated"] is None
    assert counters["stats"]["unique_graphs"] == 1
