"""Per-run fixed costs paid once per process: the backbone is built, loaded and hashed once, every
model gets its own copy with a fresh head; a mergeable method is evaluated merged, with the same
numbers as unmerged."""

from __future__ import annotations

import pytest
import torch

from petlbench import engine, weights
from petlbench.model import BACKBONES, create_model
from petlbench.runner import execute_spec
from petlbench.sweep import plan
from tests.conftest import TINY_VIT
from tests.test_compile_once import ImageLoader, _cfg

FAST_SETS = {"epochs": 2, "warmup_epochs": 1, "limit_train": 64, "limit_eval": 64, "batch_size": 32}


pytestmark = pytest.mark.usefixtures("demo_cache")  # tests/conftest.py: one demo cache per process


def test_backbone_built_and_hashed_once_per_process(tmp_path, monkeypatch) -> None:
    hashed = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    BACKBONES.clear()
    builds = BACKBONES.builds
    specs = plan("demo", ["bitfit", "lora"], ["digits", "faces"], [0], output=str(tmp_path), sets=FAST_SETS).specs
    hashed.clear()  # planning hashes the file once for the sweep; the runs must not hash it again per run
    recs = [execute_spec(s) for s in specs]
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    assert BACKBONES.builds - builds == 1 and len(hashed) == 1  # 4 runs, 2 class counts, 1 build + 1 hash
    assert len({r["provenance"]["weights_sha256"] for r in recs}) == 1
    # bitfit trained the backbone's biases of its copy; the cached backbone is untouched, and a run
    # from the cache gives the numbers of a run that built it
    again = execute_spec(specs[0])
    BACKBONES.clear()
    fresh = execute_spec(specs[0])
    for rec in (again, fresh):
        assert rec["metrics"]["curve"] == recs[0]["metrics"]["curve"]
        assert rec["metrics"]["train_loss"] == recs[0]["metrics"]["train_loss"]


def test_cached_copies_are_independent_and_get_a_new_head() -> None:
    arch, kw = TINY_VIT
    BACKBONES.clear()
    a = create_model(arch, "bitfit", 3, backbone_kwargs=kw, reuse_backbone=True)
    b = create_model(arch, "bitfit", 7, backbone_kwargs=kw, reuse_backbone=True)
    assert (a.num_classes, b.num_classes) == (3, 7) and BACKBONES.builds >= 1
    with torch.no_grad():
        a.net.blocks[0].attn.qkv.bias.add_(1.0)
    assert not torch.equal(a.net.blocks[0].attn.qkv.bias, b.net.blocks[0].attn.qkv.bias)
    torch.testing.assert_close(a.net.patch_embed.proj.weight, b.net.patch_embed.proj.weight)  # same weights
    assert a.net.patch_embed.proj.weight.data_ptr() != b.net.patch_embed.proj.weight.data_ptr()  # own copies
    head = b.backbone.head
    assert float(head.bias.detach().abs().sum()) == 0.0 and float(head.weight.detach().std()) < 0.05
    plain = create_model(arch, "bitfit", 7, backbone_kwargs=kw)  # the same model, built without the cache
    assert b.trainable_names() == plain.trainable_names()
    assert [n for n, _ in b.named_parameters()] == [n for n, _ in plain.named_parameters()]


@pytest.mark.parametrize("method", ["lora", "repadapter", "ssf"])
def test_merged_evaluation_gives_the_same_records(method) -> None:
    arch, kw = TINY_VIT
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 4, (24,))
    out = {}
    for merged in (False, True):
        torch.manual_seed(0)
        model = create_model(arch, method, 4, backbone_kwargs=kw)
        res = engine.train(model, ImageLoader(x, y, 8, True, 0, False), {"test": ImageLoader(x, y, 8, False, 0, False)},
                           _cfg(epochs=2, compile=False), torch.device("cpu"), eval_every=1, merge_for_eval=merged)
        out[merged] = res
    assert out[True].evaluated_merged and not out[False].evaluated_merged
    assert out[True].curve == out[False].curve and out[True].train_loss == out[False].train_loss


def test_backbone_cache_never_shares_across_configurations(tmp_path) -> None:
    """Build arguments (drop_path_rate included) and the weights file's identity are in the key:
    a different configuration, or a file rewritten in place, is built and loaded again."""
    import os

    from safetensors.torch import save_file

    arch, kw = TINY_VIT
    BACKBONES.clear()
    builds = BACKBONES.builds
    plain = create_model(arch, "lora", 3, backbone_kwargs=kw, reuse_backbone=True)
    dropped = create_model(arch, "lora", 3, backbone_kwargs={**kw, "drop_path_rate": 0.1}, reuse_backbone=True)
    assert BACKBONES.builds - builds == 2
    assert dropped.net.blocks[1].drop_path1.drop_prob > 0 and not hasattr(plain.net.blocks[1].drop_path1, "drop_prob")
    state = {k: v.clone() for k, v in plain.net.state_dict().items() if not k.startswith("head.")}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    first = create_model(arch, "lora", 3, pretrained=str(path), backbone_kwargs=kw, reuse_backbone=True)
    create_model(arch, "lora", 3, pretrained=str(path), backbone_kwargs=kw, reuse_backbone=True)
    assert BACKBONES.builds - builds == 3  # same file: a hit
    state["pos_embed"] += 1.0
    save_file(state, str(path))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later write, whatever the clock
    second = create_model(arch, "lora", 3, pretrained=str(path), backbone_kwargs=kw, reuse_backbone=True)
    assert BACKBONES.builds - builds == 4 and first.weights.sha256 != second.weights.sha256
    torch.testing.assert_close(second.net.pos_embed, first.net.pos_embed + 1.0)
    BACKBONES.clear()
