"""One generic suite over every registered method (the peft TEST_CASES pattern).

For each method and each backbone family it supports: the trainable set, a train step that
changes only trainable parameters, exact merging into a plain timm model, save/load of the
trainable state, independence of copies, and that timm's fused attention is still used.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import petlbench
from petlbench import NotMergeableError, PetlbenchError
from tests.conftest import BACKBONES

ALL = [(m, fam) for m in petlbench.list_methods() for fam in BACKBONES]
CASES = [(m, fam) for m, fam in ALL if fam in petlbench.get_method(m).families]
UNSUPPORTED = [(m, fam) for m, fam in ALL if (m, fam) not in CASES]
BUILTIN = {"linear", "full", "bitfit", "vpt_shallow", "vpt_deep", "adapter", "lora", "ssf", "repadapter", "arc",
           "arc_att", "spt_lora", "spt_adapter"}


#: Hyperparameters that make a method meaningful on the tiny test backbones (a budget in millions
#: of parameters far above a tiny model's size would tune everything whole, and SPT's official
#: 0.02 M sweep step is larger than the whole tiny model; drop-path on a batch of 3 drops a whole
#: branch for every image often enough to leave it without a gradient).
TINY_HP: dict[str, dict] = {"spt_lora": {"budget": 0.003, "sweep_step": 0.003 / 40, "drop_path": 0.0},
                            "spt_adapter": {"budget": 0.003, "sweep_step": 0.003 / 40, "drop_path": 0.0}}


def calibration_batches(num_classes: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic training batches for methods with a calibration step."""
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, num_classes, (4,), generator=gen))
            for _ in range(2)]


def build(method: str, family: str, num_classes: int = 5, calibrated: bool = True, **hp) -> petlbench.PETLModel:
    """A tiny model; a calibration-based method is calibrated (unless ``calibrated=False``)."""
    arch, kwargs = BACKBONES[family]
    model = petlbench.create_model(arch, method, num_classes, backbone_kwargs=kwargs,
                                   **{**TINY_HP.get(method, {}), **hp})
    # A pre-trained backbone has non-zero biases; timm's random init zeroes them, which would hide every
    # bias-dependent term of a method (GLoRA's b * D). Same values on every build (own generator).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, bias in model.backbone.modules_with_bias():
            bias.add_(torch.randn(bias.shape, generator=gen).to(bias.device) * 0.02)
    if calibrated and model.method.needs_calibration:
        petlbench.calibrate(model, calibration_batches(num_classes))
    return model


def randomise_method_params(model: petlbench.PETLModel) -> None:
    """Non-zero values everywhere, so zero-initialised branches are really exercised."""
    with torch.no_grad():
        for p in model.petl.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_every_builtin_is_registered() -> None:
    assert BUILTIN <= set(petlbench.list_methods())


def test_vpt_is_the_only_family_restricted_builtin() -> None:
    """Among the original families; the others' refusals are declared and tested in test_backbones."""
    assert [c for c in UNSUPPORTED if c[0] in BUILTIN and c[1] in ("vit", "swin")] == [("vpt_deep", "swin"),
                                                                                       ("vpt_shallow", "swin")]


@pytest.mark.parametrize("method,family", UNSUPPORTED)
def test_unsupported_family_is_a_clear_error(method: str, family: str) -> None:
    with pytest.raises(PetlbenchError, match=f"not defined on {family}"):
        build(method, family)


@pytest.mark.parametrize("method,family", CASES)
def test_trainable_set(method: str, family: str) -> None:
    model = build(method, family)
    bb = model.backbone
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in bb.head_parameters()}
    petl = {id(p) for p in model.petl.parameters()}
    body = {id(p) for p in bb.body_parameters()}
    assert head <= trainable, "the classifier head always trains"
    assert petl <= trainable, "the method's own parameters train"
    frozen_body_trains = trainable & body
    if method == "full":
        assert frozen_body_trains == body
    elif method == "bitfit":
        assert frozen_body_trains == {id(b) for _, b in bb.modules_with_bias()}
        assert all(name.endswith("bias") for name, p in model.net.named_parameters()
                   if id(p) in frozen_body_trains)
    elif method == "ln_tune":
        norms = {id(q) for m in bb.model.modules() if isinstance(m, torch.nn.LayerNorm) for q in m.parameters()}
        assert norms and frozen_body_trains == norms
    else:
        assert not frozen_body_trains, "PETL methods keep the backbone frozen"
    counts = petlbench.count_params(model)
    honest = model.method.trainable_count(bb, model.petl)
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if honest is None:
        assert counts.trainable == dense
    else:  # a gradient mask: never more than the tensors that train
        assert counts.trainable_without_head == honest and counts.trainable <= dense
    assert counts.trainable == counts.head + counts.trainable_without_head


@pytest.mark.parametrize("method,family", CASES)
def test_train_step_changes_only_trainable(method: str, family: str, images: torch.Tensor) -> None:
    model = build(method, family)
    randomise_method_params(model)
    model.train()
    buffers = {k: v.clone() for k, v in model.calibration_buffers().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(images), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, f"{name}: changed={changed}, trainable={p.requires_grad}"
    assert all(torch.equal(v, model.calibration_buffers()[k]) for k, v in buffers.items()), "training moved a mask"


@pytest.mark.parametrize("method,family", CASES)
def test_merge(method: str, family: str, images: torch.Tensor) -> None:
    model = build(method, family)
    randomise_method_params(model)
    if method in ("bitfit", "full", "ln_tune"):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    if not model.method.mergeable:
        with pytest.raises(NotMergeableError, match=method):
            petlbench.merge(model)
        assert petlbench.count_params(model).extra_after_merge > 0
        return
    with torch.no_grad():
        expected = model(images)
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        merged = petlbench.merge(model).eval()
        got = merged(images)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # the input model is untouched by merging
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    # a plain timm model: strict load, same classes, same parameter count, no hooks left
    arch, kwargs = BACKBONES[family]
    plain = timm.create_model(arch, num_classes=5, **kwargs)
    plain.load_state_dict(merged.state_dict(), strict=True)
    assert [type(m) for m in merged.modules()] == [type(m) for m in plain.modules()]
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(plain.eval()(images), got, rtol=0, atol=1e-6)
    assert petlbench.count_params(model).extra_after_merge == 0


@pytest.mark.parametrize("method,family", CASES)
def test_save_and_load_trainable_state(method: str, family: str, images: torch.Tensor, tmp_path) -> None:
    torch.manual_seed(1)
    source = build(method, family)
    randomise_method_params(source)
    path = petlbench.save_trainable(source, tmp_path / "task.safetensors")
    torch.manual_seed(1)  # same backbone init, as with shared pretrained weights
    target = build(method, family, calibrated=False)  # calibration results come from the file, not from data
    meta = petlbench.load_trainable(target, path)
    assert meta["method"] == method
    assert petlbench.count_params(target) == petlbench.count_params(source)
    assert sorted(target.calibration_buffers()) == sorted(source.calibration_buffers())
    assert all(torch.equal(a, target.calibration_buffers()[k]) for k, a in source.calibration_buffers().items())
    if source.method.needs_calibration:
        assert meta["calibration"]["batches"] == 2 and target.calibration is not None
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(images), target(images))
    other = "lora" if method != "lora" else "ssf"
    with pytest.raises(PetlbenchError):
        petlbench.load_trainable(build(other, family), path)


@pytest.mark.parametrize("method,family", CASES)
def test_copies_are_independent(method: str, family: str, images: torch.Tensor) -> None:
    model = build(method, family).eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        before = model(images)
        for p in clone.parameters():
            if p.requires_grad:
                p.add_(1.0)
        assert torch.equal(model(images), before)
        assert not torch.equal(clone(images), before)


@pytest.mark.parametrize("method", petlbench.list_methods())
def test_fused_attention_is_kept(method: str, images: torch.Tensor, monkeypatch) -> None:
    model = build(method, "vit").eval()
    assert all(b.attn.fused_attn for b in model.backbone.blocks)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(images)
    assert len(calls) == len(model.backbone.blocks)


VARIANTS = [("lora", {"targets": "qkv"}), ("repadapter", {"variant": "repattn"}), ("arc", {"mlp_scale_init": "zeros"}),
            ("repadapter", {"groups": 4, "hidden_dim": 8})]


@pytest.mark.parametrize("method,hp,family", [(m, hp, fam) for m, hp in VARIANTS for fam in BACKBONES
                                              if fam in petlbench.get_method(m).families])
def test_variants_merge_exactly(method: str, hp: dict, family: str, images: torch.Tensor) -> None:
    model = build(method, family, **hp)
    randomise_method_params(model)
    model.eval()
    with torch.no_grad():
        expected = model(images)
        got = petlbench.merge(model).eval()(images)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_trainable_state_files_are_byte_stable(tmp_path) -> None:
    """The same state always gives the same bytes, so its SHA-256 can identify it."""
    model = build("repadapter", "vit")
    a = petlbench.save_trainable(model, tmp_path / "a.safetensors").read_bytes()
    for _ in range(3):
        assert petlbench.save_trainable(model, tmp_path / "b.safetensors").read_bytes() == a


# ------------------------------------------------------------------ declarations and bad input
def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_presets_name_real_tasks() -> None:
    """A preset keyed by a task its suite does not define would silently never apply."""
    from petlbench.data import get_suite

    for name in petlbench.list_methods():
        cls = petlbench.get_method(name)
        for table in (cls.presets, cls.recipes, cls.train_presets):
            for suite, per_task in table.items():
                tasks = set(get_suite(suite).task_names) | {"*"}
                assert set(per_task) <= tasks, f"{name}: {sorted(set(per_task) - tasks)} are not {suite} tasks"


def test_published_declarations_name_shipped_rows() -> None:
    from petlbench.data import get_suite
    from petlbench.data.suites import name_key
    from petlbench.report import load_reference

    df, _ = load_reference("paper")
    for name in petlbench.list_methods():
        cls = petlbench.get_method(name)
        for suite, row in cls.published.items():
            keys = {name_key(n) for n in (suite, *get_suite(suite).aliases)}
            rows = df[df.benchmark.map(name_key).isin(keys) & (df.method == row)]
            assert len(rows), f"{name} declares {row!r} on {suite}, which the shipped reference CSV lacks"
        for suite in ("vtab", "fgvc"):  # the suite presets reproduce the declared row's configuration
            declared = cls.published_as(suite, cls.resolve(suite=suite))
            assert declared == cls.published.get(suite), (name, suite, declared)


@pytest.mark.parametrize("method", [m for m in petlbench.list_methods() if petlbench.get_method(m).bounded_by_width])
def test_rank_larger_than_the_width_is_one_clear_line(method: str) -> None:
    cls = petlbench.get_method(method)
    width = BACKBONES["vit"][1]["embed_dim"]
    for key in cls.bounded_by_width:
        with pytest.raises(PetlbenchError, match=f"'{key}'={width + 1} is larger than the width") as err:
            build(method, "vit", calibrated=False, **{key: width + 1})
        assert "Fix:" in _one_line(err.value)
        build(method, "vit", calibrated=False, **{key: width})  # the width itself is allowed


@pytest.mark.parametrize("method,key", [(m, k) for m in petlbench.list_methods()
                                        for k, h in petlbench.get_method(m).hparams.items() if h.choices])
def test_unknown_choice_is_one_clear_line(method: str, key: str) -> None:
    """Unknown placements, variants, targets ...: the message lists the allowed values."""
    with pytest.raises(PetlbenchError, match="must be one of") as err:
        build(method, "vit", calibrated=False, **{key: "no_such_placement"})
    assert key in _one_line(err.value)


@pytest.mark.parametrize("method", [m for m in petlbench.list_methods() if petlbench.get_method(m).presets
                                    or petlbench.get_method(m).train_presets])
def test_preset_for_a_task_that_does_not_exist_is_one_clear_line(method: str) -> None:
    cls = petlbench.get_method(method)
    suite = next(iter(cls.presets or cls.train_presets))
    with pytest.raises(PetlbenchError, match="unknown task 'no_such_task'") as err:
        cls.resolve(suite=suite, task="no_such_task")
    assert _one_line(err.value).startswith(f"presets for suite {suite!r}")
    arch, kwargs = BACKBONES["vit"]
    with pytest.raises(PetlbenchError, match="unknown task"):
        petlbench.create_model(arch, method, 5, backbone_kwargs=kwargs, suite=suite, task="no_such_task")


@pytest.mark.parametrize("method", [m for m in petlbench.list_methods() if petlbench.get_method(m).needs_calibration])
def test_calibration_without_training_data_is_one_clear_line(method: str) -> None:
    model = build(method, "vit", calibrated=False)
    with pytest.raises(PetlbenchError, match="no training batches") as err:
        petlbench.calibrate(model, [])
    assert method in _one_line(err.value)


# ------------------------------------------------------------------ fidelity details (fidelity.md)
def test_vpt_draws_one_prompt_dropout_mask_per_image() -> None:
    model = build("vpt_shallow", "vit", dropout=0.5).train()
    prompts = model.petl["prompts"]
    tokens = torch.zeros(2, 5, 32)
    out = prompts.insert(tokens)[:, 1:1 + prompts.num_tokens]
    assert not torch.equal(out[0], out[1]), "both images got the same dropout mask"
    assert petlbench.get_method("vpt_shallow")().config["dropout"] == 0.0  # VPT's shallow default


def test_adapter_variants_initialise_as_their_code() -> None:
    from petlbench.layers import QuickGELU

    noah = build("adapter", "vit", variant="noah").petl["adapters"][0]
    assert isinstance(noah.act, QuickGELU) and noah.dropout.p == 0.1
    for layer in (noah.down, noah.up):  # NOAH's _init_vit_weights: trunc-normal 0.02, zero bias (test_recipe_modules)
        assert layer.weight.abs().sum() > 0 and not layer.bias.any()
    x = torch.randn(7)
    assert torch.allclose(noah.act(x), x * torch.sigmoid(1.702 * x))
    vpt = build("adapter", "vit", variant="vpt").petl["adapters"][0]
    assert all(not p.any() for p in vpt.parameters())  # both projections zero: only up.bias can move
    y = torch.randn(2, 3, 32, requires_grad=True)
    vpt(y).sum().backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in vpt.named_parameters()}
    assert grads["up.bias"] > 0 and all(v == 0 for n, v in grads.items() if n != "up.bias")


def test_lora_qkv_with_alpha_rank_is_noahs_unscaled_update(images: torch.Tensor) -> None:
    model = build("lora", "vit", targets="qkv", alpha=8.0, rank=8).eval()
    randomise_method_params(model)
    lora, blk = model.petl["lora"][0], model.backbone.blocks[0]
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        expected = x @ (lora.lora_b @ lora.lora_a).T  # B A x, scale 1, k rows adapted too
        assert torch.allclose(lora(x), expected, atol=1e-6)
        assert expected[..., 32:64].abs().sum() > 0
    assert blk.qkv.out_features == 96


@pytest.mark.parametrize("hp,row", [
    ({"targets": "qkv", "rank": 8, "alpha": 8.0}, True),  # NOAH's baseline: the only match
    ({}, False),  # the LoRA paper's q, v pairs: never NOAH's fused-qkv row
    ({"targets": "qv", "rank": 8, "alpha": 8.0}, False),
    ({"targets": "qkv", "rank": 4, "alpha": 4.0}, False),
    ({"targets": "qkv", "rank": 8, "alpha": 16.0}, False),
])
def test_lora_maps_only_noahs_configuration_to_noahs_row(hp: dict, row: bool) -> None:
    from petlbench_methods.lora import NOAH_ROW

    from petlbench.report.reference import published_name

    expected = NOAH_ROW if row else None
    assert published_name("lora", "vtab", hp) == expected
    assert published_name("lora", "fgvc", hp) is None


def test_lora_qv_matches_loralib_merged_linear() -> None:
    """loralib ``MergedLinear(enable_lora=[True, False, True])``, its forward written out by hand:
    lora_A (2r, d) and lora_B (2d, r) hold [q; v]; grouped conv1d, zero_pad into the q and v rows, then scaling."""
    model = build("lora", "vit", targets="qv", rank=4, alpha=12.0).eval()
    randomise_method_params(model)
    lora, blk = model.petl["lora"][0], model.backbone.blocks[0]
    d, r = blk.dim, 4
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        lora_a = torch.cat([lora.lora_a[0], lora.lora_a[1]])  # (2r, d)
        lora_b = torch.cat([lora.lora_b[0], lora.lora_b[1]])  # (2d, r)
        after_a = F.linear(x, lora_a)
        after_b = F.conv1d(after_a.transpose(-2, -1), lora_b.unsqueeze(-1), groups=2).transpose(-2, -1)
        padded = x.new_zeros(2, 5, 3 * d)
        padded[..., :d], padded[..., 2 * d:] = after_b[..., :d], after_b[..., d:]
        expected = F.linear(x, blk.qkv.weight, blk.qkv.bias) + padded * (12.0 / r)
        torch.testing.assert_close(blk.qkv(x), expected, rtol=1e-5, atol=1e-6)  # the hooked qkv
        assert padded.abs().sum() > 0


def test_ssf_on_vit_matches_the_official_forward(images: torch.Tensor) -> None:
    """dongzelian/SSF ``models/vision_transformer.py`` written out by hand on a plain copy: ``ssf_ada``
    (x * scale + shift) after the patch embedding, norm1, qkv, proj, norm2, fc1, fc2 and the final norm."""
    import copy

    from petlbench.backbone import remove_petl_hooks

    model = build("ssf", "vit").eval()
    randomise_method_params(model)
    ssf = model.petl["ssf"]
    net = copy.deepcopy(model.net)
    remove_petl_hooks(net)

    def ada(x: torch.Tensor, key: str) -> torch.Tensor:
        return x * ssf[key].scale + ssf[key].shift

    with torch.no_grad():
        x = net._pos_embed(ada(net.patch_embed(images), "embed"))
        for i, blk in enumerate(net.blocks):
            h = ada(blk.norm1(x), f"{i}_norm1")
            B, N, C = h.shape
            qkv = ada(blk.attn.qkv(h), f"{i}_qkv").reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            att = ((qkv[0] @ qkv[1].transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
            x = x + ada(blk.attn.proj((att @ qkv[2]).transpose(1, 2).reshape(B, N, C)), f"{i}_proj")
            h = ada(blk.norm2(x), f"{i}_norm2")
            x = x + ada(blk.mlp.fc2(blk.mlp.act(ada(blk.mlp.fc1(h), f"{i}_fc1"))), f"{i}_fc2")
        x = ada(net.norm(x), "final_norm")
        expected = net.head(x[:, 0])
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
