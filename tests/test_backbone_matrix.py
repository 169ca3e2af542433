"""Every registered method on every backbone variant (tests/backbone_matrix.py): no cell may give
a number from a model other than the one trained.

Per cell, on a tiny model with perturbed LayerNorm affines, biases, LayerScale and tokens:
either the method is refused when the model is built (as planning does, one line), or

- one train step moves exactly the tensors that train, and every one of them gets a gradient;
- the trainable count is explained: it equals the scalars that receive gradients and, for every
  method whose count has a closed form, that form (written here from the method's definition);
- merging gives a plain timm model (strict load into the architecture, with any bias argument
  the merge recorded) equal to the trained model in fp32 eval mode (relative 1e-5), or the
  method is not mergeable (here) and merge refuses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import petlbench
from petlbench import Backbone, NotMergeableError, PetlbenchError
from petlbench.engine import deployable
from petlbench.model import merge_error, merged_backbone_kwargs
from tests import backbone_matrix as M

CELLS = [(v.name, m) for v in M.VARIANTS for m in petlbench.list_methods()]  # variant-major: backbone cache hits


# ------------------------------------------------------------------ the counts, from each method's definition
def _blocks(bb: Backbone):
    """(width, MLP hidden width or None when the MLP has no single fc1: EVA-02's SwiGLU)."""
    return [(b.dim, b.fc1.out_features if b.has("fc1") else None) for b in bb.blocks]


def _stages(bb: Backbone) -> list[list]:
    out: dict[int, list] = {}
    for b in bb.blocks:
        out.setdefault(b.stage, []).append(b)
    return list(out.values())


def _ssf(bb: Backbone, hp) -> int:
    """After every operation: the patch embedding (Swin: its conv and its norm), every LayerNorm
    of the network except the attention-pool head's, and every block linear; scale + shift each."""
    pool = {id(m) for m in bb.attn_pool.modules()} if bb.attn_pool is not None else set()
    norms = sum(m.normalized_shape[0] for m in bb.model.modules() if isinstance(m, nn.LayerNorm) and id(m) not in pool)
    linears = sum(getattr(b, r).out_features for b in bb.blocks for r in ("qkv", "proj", "fc1", "fc2"))
    return 2 * (bb.patch_proj.out_channels + norms + linears)


def _glora(bb: Backbone, hp) -> int:
    """Default LLLVV, rank 4: A, B low-rank (out + in) r each, C low-rank (in + 1) r, D one per
    output (only where a bias exists to scale), E one per output."""
    r, total = hp["rank"], 0
    for b in bb.blocks:
        for lin in (b.qkv, b.proj, b.fc1, b.fc2):
            o, i = lin.out_features, lin.in_features
            total += 2 * (o + i) * r + (i + 1) * r + o + (o if lin.bias is not None else 0)
    return total


def _fact(bb: Backbone, hp, tk: bool) -> int:
    d, hidden = _blocks(bb)[0]
    r, ratio, layers = hp["rank"], hidden // d, len(bb.blocks)
    per_layer = 4 + 2 * ratio
    return 2 * d * r + (r ** 3 + r * per_layer * layers if tk else layers * per_layer * r * r)


def _body(bb: Backbone) -> list[tuple[str, nn.Parameter]]:
    """Every backbone parameter but the classifier heads' (ConvNeXt's head.norm is pretrained body)."""
    heads = {id(p) for p in bb.head_parameters()}
    return [(n, p) for n, p in bb.model.named_parameters() if id(p) not in heads]


#: method -> (backbone, resolved hyperparameters) -> trainable scalars without the head.
EXPECTED: dict[str, Callable[[Backbone, dict], int]] = {
    "linear": lambda bb, hp: 0,
    "full": lambda bb, hp: sum(p.numel() for _, p in _body(bb)),
    # every bias of the pretrained network (SigLIP: the attention-pool head's too), the head's aside
    "bitfit": lambda bb, hp: sum(p.numel() for n, p in _body(bb) if n.endswith(".bias")),
    # every LayerNorm (pre-norm, fc_norm and SigLIP's attention-pool norm included)
    "ln_tune": lambda bb, hp: sum(p.numel() for m in bb.model.modules() if isinstance(m, nn.LayerNorm)
                                  for p in m.parameters()),
    "ssf": _ssf,
    "lora": lambda bb, hp: sum(2 * hp["rank"] * 2 * d for d, _ in _blocks(bb)),  # q and v pairs
    "arc": lambda bb, hp: 2 * sum(st[0].dim * hp["rank"] + len(st) * (hp["rank"] + st[0].dim) for st in _stages(bb)),
    "arc_att": lambda bb, hp: sum(st[0].dim * hp["rank"] + len(st) * (hp["rank"] + st[0].dim) for st in _stages(bb)),
    "repadapter": lambda bb, hp: 2 * sum(d * 8 + 8 + d * 8 // 2 + d for d, _ in _blocks(bb)),
    "vpt_shallow": lambda bb, hp: hp["num_tokens"] * _blocks(bb)[0][0],
    "vpt_deep": lambda bb, hp: len(bb.blocks) * hp["num_tokens"] * _blocks(bb)[0][0],
    "adapter": lambda bb, hp: sum(2 * d * 8 + 8 + d for d, _ in _blocks(bb)),
    "adaptformer": lambda bb, hp: sum(2 * d * 8 + 8 + d for d, _ in _blocks(bb)),
    "adapter_plus": lambda bb, hp: sum(2 * d * 8 + 8 + d + d for d, _ in _blocks(bb)),  # + channel scaling
    "convpass": lambda bb, hp: 2 * sum(d * 8 + 8 + 9 * 64 + 8 + 8 * d + d for d, _ in _blocks(bb)),
    "fact_tt": lambda bb, hp: _fact(bb, hp, tk=False),
    "fact_tk": lambda bb, hp: _fact(bb, hp, tk=True),
    "glora": _glora,
    "sct": lambda bb, hp: len(bb.blocks) * ((bb.blocks[0].dim // 8) ** 2 + bb.blocks[0].dim // 8),
}
# Not in EXPECTED (their counts come from data or from a block rule): dtl, dtl_plus, gps, noah,
# spt_lora, spt_adapter; for them the count is checked against the scalars that receive gradients.


# ------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("variant,method", CELLS)
def test_cell(variant: str, method: str) -> None:
    v = M.variant(variant)
    status, reason = M.outcome(method, v)
    if status == M.STATUS_REFUSED:
        assert reason and "\n" not in reason and "Traceback" not in reason, reason
        with pytest.raises(PetlbenchError):  # building for real refuses too
            M.build(method, v)
        return
    model = M.build(method, v)
    assert model.method.mergeable == (status == M.STATUS_MERGE)
    bb = model.backbone

    # one train step: every trainable tensor gets a gradient; only trainable tensors move
    (x, y), = M.batches(v, n=1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    F.cross_entropy(model(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"counted as trainable but never get a gradient: {dead[:4]}"
    opt.step()
    moved = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(before[n], p)]
    assert not moved, f"frozen tensors changed: {moved[:4]}"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    # counts explained
    counts = petlbench.count_params(model)
    head = {id(p) for p in bb.head_parameters()}
    receiving = sum(p.numel() for p in trainable if id(p) not in head)
    assert counts.trainable_without_head == receiving
    if method in EXPECTED:
        assert counts.trainable_without_head == EXPECTED[method](bb, model.method.config), method

    # merge equals the trained model, into a plain timm model; or refuses
    with torch.no_grad():
        for p in trainable:  # trained-looking values everywhere (zero-initialised branches hide misplaced folds)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p) * 0.1)
    model.eval()
    if not model.method.mergeable:
        with pytest.raises(NotMergeableError):
            petlbench.merge(model)
        assert counts.extra_after_merge > 0
        return
    with torch.no_grad():
        expected = model(x)
        merged = petlbench.merge(model).eval()
        got = merged(x)
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error <= 1e-5, f"merged model differs from the trained one by {error:.3g}"
    extra = merged_backbone_kwargs(merged)
    plain = timm.create_model(v.arch, num_classes=v.num_classes, **{**v.kwargs, **extra}).eval()
    plain.load_state_dict(merged.state_dict(), strict=True)
    assert [type(m) for m in plain.modules()] == [type(m) for m in merged.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(plain(x), got, rtol=0, atol=1e-6 * float(got.abs().max()))
    assert merge_error(model, merged) <= 1e-5  # what evaluation checks before using it


def test_the_docs_table_is_generated_from_the_matrix() -> None:
    assert M.current_table() == M.render(), "docs/backbone-methods.md is stale: python -m tests.backbone_matrix --write"


# ------------------------------------------------------------------ the failures issue 17 found, one by one
def test_spt_lora_tunes_the_class_token_before_a_pre_norm() -> None:
    """CLIP's norm_pre sits between cls_token and block 0: the delta must be added before it, where
    merging it into cls_token is the same function (it was added after it: 0.59 relative off)."""
    model = M.build("spt_lora", M.variant("clip"))
    with torch.no_grad():
        model.petl["cls"].delta.normal_(0, 1.0)
    model.eval()
    merged = petlbench.merge(model)
    assert merge_error(model, merged) <= 1e-5


@pytest.mark.parametrize("method,added", [("ssf", {"qkv_bias": True, "proj_bias": True}), ("arc", {"qkv_bias": True,
                         "proj_bias": True}), ("arc_att", {"qkv_bias": True}), ("repadapter", {"qkv_bias": True,
                         "proj_bias": True}), ("glora", {"qkv_bias": True, "proj_bias": True}), ("lora", {})])
def test_a_shift_into_a_bias_less_linear_merges_into_the_timm_model_with_that_bias(method: str, added: dict) -> None:
    """The merged model is the plain timm model built with qkv_bias/proj_bias=True, and says so."""
    v = M.variant("no_bias")
    model = M.build(method, v).eval()
    merged = petlbench.merge(model)
    assert merged_backbone_kwargs(merged) == added
    assert model.backbone.blocks[0].qkv.bias is None, "merging must not change the trained model"
    plain = timm.create_model(v.arch, num_classes=v.num_classes, **{**v.kwargs, **added})
    plain.load_state_dict(merged.state_dict(), strict=True)
    assert merge_error(model, merged) <= 1e-5


def test_ssf_after_a_bias_less_patch_embedding_shifts_the_position_embedding() -> None:
    """CLIP's patch embedding has no bias: the shift after it goes into pos_embed (patch rows only),
    and the merged model is CLIP's own architecture (no argument changes)."""
    model = M.build("ssf", M.variant("clip")).eval()
    merged = petlbench.merge(model)
    assert merged.patch_embed.proj.bias is None and merged_backbone_kwargs(merged) == {}
    assert torch.equal(merged.pos_embed[:, :1], model.net.pos_embed[:, :1]), "the class token's row is untouched"
    assert merge_error(model, merged) <= 1e-5


def test_ssf_without_any_place_for_the_embedding_shift_runs_unmerged() -> None:
    """No patch-embedding bias and no position embedding: SSF still runs, deployed unmerged, and the
    reason is given (planning does not refuse it, evaluation does not merge it)."""
    v = M.Variant("clip_no_pos", "vit_base_patch16_clip_224", {**M.TINY, "pos_embed": "none"}, "test only")
    assert M.outcome("ssf", v)[0] == M.STATUS_UNMERGED
    model = M.build("ssf", v).eval()
    with pytest.raises(NotMergeableError, match="no position embedding"):
        petlbench.merge(model)
    assert deployable(model) == (model, False)
    assert petlbench.count_params(model).extra_after_merge == petlbench.count_params(model).trainable_without_head


def test_ssf_on_an_average_pooled_vit_adapts_fc_norm() -> None:
    """MAE-style GAP: the final norm is an Identity and fc_norm is the last LayerNorm; SSF's last site
    is there (ViT-B/16, depth 2: 36,864 parameters; without it 35,328)."""
    model = petlbench.create_model("vit_base_patch16_224", "ssf", 10, device="meta",
                                   backbone_kwargs={"depth": 2, "global_pool": "avg"})
    assert petlbench.count_params(model).trainable_without_head == 36_864
    assert model.backbone.last_norm is model.net.fc_norm
    assert model.net.fc_norm._forward_hooks, "the site follows fc_norm"


def test_siglip_attention_pool_head_trains_only_under_rules_that_cover_it() -> None:
    """The MAP head is part of the pretrained backbone: BitFit trains its biases (every bias) and
    LN-tune its LayerNorm (every LayerNorm); every other method leaves it frozen."""
    v = M.variant("siglip")
    for method in petlbench.list_methods():
        if M.outcome(method, v)[0] == M.STATUS_REFUSED:
            continue
        model = M.build(method, v, calibrate=False)
        pool = model.backbone.attn_pool
        trains = {n for n, p in pool.named_parameters() if p.requires_grad}
        if method == "bitfit":
            assert trains == {n for n, _ in pool.named_parameters() if n.endswith("bias")}
        elif method == "ln_tune":
            assert trains == {"norm.weight", "norm.bias"}
        elif method == "full":
            assert trains == {n for n, _ in pool.named_parameters()}
        else:
            assert not trains, f"{method} trains {sorted(trains)} of the attention-pool head"


def _neighbours(h: int, w: int, row: int, col: int, k: int) -> set[int]:
    r = k // 2
    return {i * w + j for i in range(max(0, row - r), min(h, row + r + 1))
            for j in range(max(0, col - r), min(w, col + r + 1))}


def _changed(fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, index: int, skip: int) -> set[int]:
    """Token positions (after ``skip`` prefix tokens) whose output changes when token ``index`` does."""
    moved = tokens.clone()
    moved[:, skip + index] += 1.0
    with torch.no_grad():
        diff = (fn(moved) - fn(tokens)).abs().sum(dim=(0, 2))[skip:]
    return {int(i) for i in torch.nonzero(diff > 1e-6)}


@pytest.mark.parametrize("variant", ["non_square", "dynamic", "swin_non_square"])
def test_convpass_convolves_over_the_real_token_grid(variant: str) -> None:
    """A 3x3 conv must mix a token with its image neighbours: 2x8 (16 tokens), not a 4x4 guess."""
    v = M.variant(variant)
    model = M.build("convpass", v, xavier_init=True).eval()
    (x, _), = M.batches(v, n=1)
    with torch.no_grad():
        model(x)  # the grid of this input size
    swin = model.backbone.family == "swin"
    bypass = model.petl["mlp" if swin else "attn"][0]
    with torch.no_grad():
        bypass.up.weight.normal_()  # zero-initialised: nothing would reach the output
    prefix = 0 if swin else model.backbone.num_prefix_tokens
    h, w = (x.shape[-2] // 4, x.shape[-1] // 4) if swin else (x.shape[-2] // 8, x.shape[-1] // 8)
    assert (h, w) != (int(h * w) ** 0.5,) * 2
    tokens = torch.randn(1, prefix + h * w, model.backbone.blocks[0].dim)
    fn = bypass.on_grid if swin else bypass
    for row, col in [(0, w - 1), (h - 1, 0), (h // 2, w // 2)]:
        assert _changed(fn, tokens, row * w + col, prefix) == _neighbours(h, w, row, col, 3), (row, col)


@pytest.mark.parametrize("variant", ["non_square", "dynamic"])
def test_dtl_plus_fuses_over_the_real_token_grid(variant: str) -> None:
    v = M.variant(variant)
    model = M.build("dtl_plus", v, fusion_size=3).eval()
    (x, _), = M.batches(v, n=1)
    with torch.no_grad():
        model(x)
    side = model.petl["side"]
    conv = next(iter(side.fusion.values()))
    prefix = model.backbone.num_prefix_tokens
    h, w = x.shape[-2] // 8, x.shape[-1] // 8
    tokens = torch.randn(1, prefix + h * w, model.backbone.blocks[0].dim)
    for row, col in [(0, w - 1), (h - 1, 0)]:
        assert _changed(functools.partial(side._fuse, conv), tokens, row * w + col, prefix) == \
            _neighbours(h, w, row, col, 3)


def test_dtl_keeps_an_average_pooled_vits_own_pooling() -> None:
    """MAE-style GAP already pools as DTL does (mean of the patch tokens, then the last norm)."""
    model = M.build("dtl", M.variant("mae_gap"))
    assert model.pooling == "avg" and not model.net.norm._forward_pre_hooks


# ------------------------------------------------------------------ refusals before training, never after
def test_planning_refuses_a_method_the_backbone_cannot_take(tmp_path) -> None:
    """DTL cannot replace SigLIP's attention-pool head: refused while planning (--dry-run), in one
    line naming the method, before any data is read or weights are loaded."""
    from petlbench.sweep import plan

    v = M.variant("siglip")
    with pytest.raises(PetlbenchError, match="'dtl'") as err:
        plan("demo", ["linear", "dtl"], ["digits"], backbone=v.arch, backbone_kwargs=v.kwargs, pretrained="none",
             output=str(tmp_path / "out"), data_root=str(tmp_path / "no_data_here"))
    assert "\n" not in str(err.value) and "attention-pool" in str(err.value)


def test_planning_checks_every_method_on_the_backbone() -> None:
    from petlbench.sweep import check_methods

    v = M.variant("no_bias")
    check_methods(v.arch, v.kwargs, [(petlbench.get_method(m), {}) for m in ("ssf", "glora", "arc")], 2, print)
    with pytest.raises(PetlbenchError, match="vpt_deep.*not defined on swin"):
        check_methods(M.variant("swin").arch, M.variant("swin").kwargs, [(petlbench.get_method("vpt_deep"), {})], 2, print)


def test_evaluation_never_uses_a_merged_model_that_differs(recwarn) -> None:
    """The last line of defence: a merge that is not exact is caught before evaluation, which then
    runs the trained (unmerged) model and records evaluated_merged=False."""
    from petlbench.registry import register_method, unregister_method

    base = petlbench.get_method("ssf")

    class WrongFold(base):  # folds the last site's shift twice
        name = "wrong_fold_test"

        def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
            super().merge(backbone, petl)
            backbone.last_norm.bias.data.add_(petl["ssf"]["final_norm"].shift)

    register_method(WrongFold)
    try:
        model = M.build("wrong_fold_test", M.variant("vit"))
        with torch.no_grad():
            model.petl["ssf"]["final_norm"].shift.add_(1.0)
        model.eval()
        assert merge_error(model, petlbench.merge(model)) > 1e-2
        evaluated, merged = deployable(model)
        assert evaluated is model and merged is False
        assert any("evaluating the unmerged model" in str(w.message) for w in recwarn.list)
        good = M.build("ssf", M.variant("vit")).eval()
        assert deployable(good)[1] is True
    finally:
        unregister_method("wrong_fold_test")


def test_planning_says_which_methods_will_run_unmerged() -> None:
    """A mergeable method that cannot fold into the backbone is not refused, but planning says it
    will be evaluated and deployed unmerged, and why."""
    from petlbench.sweep import check_methods

    heard: list[str] = []
    kwargs = {**M.TINY, "pos_embed": "none"}
    check_methods("vit_base_patch16_clip_224", kwargs, [(petlbench.get_method(m), {}) for m in ("ssf", "lora")], 2,
                  heard.append)
    assert len(heard) == 1 and "'ssf'" in heard[0] and "unmerged" in heard[0] and "position embedding" in heard[0]
