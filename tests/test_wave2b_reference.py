"""Each wave-2b method against an independent, hand-written forward of its official code.

The reference runs on a *plain* timm copy of the backbone (same weights, no hooks) and spells
out the official block forward (AdaptFormer's ``custom_modules.Block``, Adapter+'s
``AdapterBlock.forward_*``, Convpass's ``forward_block`` / ``forward_swin_block``, DTL's
``VisionTransformer.forward``, SCT's ``Block`` with ``sct_attn`` and ``getSalientChannels``),
reading the method's tensors from ``model.petl``. Eval mode, so dropout and drop-path are off.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import petlbench
from petlbench import PetlbenchError
from petlbench.model import calibrate
from tests.conftest import BACKBONES

TOL = dict(rtol=1e-5, atol=1e-5)


def build(method: str, family: str = "vit", **hp) -> petlbench.PETLModel:
    arch, kwargs = BACKBONES[family]
    model = petlbench.create_model(arch, method, 5, backbone_kwargs=kwargs, **hp)
    with torch.no_grad():
        for p in model.petl.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def plain_copy(model: petlbench.PETLModel, family: str = "vit") -> torch.nn.Module:
    arch, kwargs = BACKBONES[family]
    plain = timm.create_model(arch, num_classes=5, **kwargs)
    plain.load_state_dict(model.net.state_dict(), strict=True)
    return plain.eval()


def vit_reference(plain, images: torch.Tensor, block_fn, pool=None) -> torch.Tensor:
    x = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(images))))
    for i, blk in enumerate(plain.blocks):
        x = block_fn(i, blk, x)
    if pool is not None:
        return plain.head(pool(x))
    return plain.head(plain.norm(x)[:, 0])


def attn_res(blk, x):
    return x + blk.attn(blk.norm1(x))


def mlp_branch(blk, x):
    return blk.mlp(blk.norm2(x))


# ----------------------------------------------------------------------------------- AdaptFormer
@pytest.mark.parametrize("layernorm", ["none", "in", "out"])
def test_adaptformer_matches_official_block(layernorm: str, images: torch.Tensor) -> None:
    model = build("adaptformer", layernorm=layernorm)
    ads = model.petl["adapters"]

    def block(i, blk, x):  # custom_modules.Block (ffn_option parallel) with adapter.Adapter's layernorm options
        x = attn_res(blk, x)
        a = ads[i]

        def ln(t):  # adapter_layer_norm_before: nn.LayerNorm(d_model), default eps
            return F.layer_norm(t, (t.shape[-1],), a.norm.weight, a.norm.bias, 1e-5)

        inp = ln(x) if layernorm == "in" else x
        adapt_x = F.linear(torch.relu(F.linear(inp, a.down.weight, a.down.bias)), a.up.weight, a.up.bias) * 0.1
        if layernorm == "out":
            adapt_x = ln(adapt_x)
        return x + mlp_branch(blk, x) + adapt_x

    with torch.no_grad():
        torch.testing.assert_close(model(images), vit_reference(plain_copy(model), images, block), **TOL)


# ------------------------------------------------------------------------------------- Adapter+
def _adapter(mod, x, skip=None):
    if mod.norm is not None:
        x = F.layer_norm(x, mod.norm.normalized_shape, mod.norm.weight, mod.norm.bias, 1e-6)
    y = F.linear(F.gelu(F.linear(x, mod.down.weight, mod.down.bias)), mod.up.weight, mod.up.bias) * mod.scaling
    return y if skip is None else y + skip


def _official_block(config, a_mlp, a_attn):
    def block(i, blk, x):
        ad, aa = a_mlp[i], (a_attn[i] if a_attn is not None else None)
        if config == "post":
            x = attn_res(blk, x)
            x = x + mlp_branch(blk, x)
            return _adapter(ad, x, skip=x)
        if config == "pre":
            x = attn_res(blk, x)
            x = _adapter(ad, x, skip=x)
            return x + mlp_branch(blk, x)
        if config == "pfeiffer":
            y = attn_res(blk, x)
            skip = mlp_branch(blk, y)
            x = _adapter(ad, y + skip, skip=skip)
            return x + y
        if config == "intermediate":
            x = attn_res(blk, x)
            y = mlp_branch(blk, x)
            return x + _adapter(ad, y, skip=y)
        if config == "houlsby":
            y = blk.attn(blk.norm1(x))
            x = x + _adapter(aa, y, skip=y)
            y = mlp_branch(blk, x)
            return x + _adapter(ad, y, skip=y)
        assert config == "parallel"
        y = attn_res(blk, x)
        z = y + mlp_branch(blk, y)
        return _adapter(ad, y, skip=z)

    return block


@pytest.mark.parametrize("variant", ["adapter_plus", "houlsby", "pfeiffer", "adaptformer", "pre", "post",
                                     "intermediate", "parallel"])
def test_adapter_plus_variants_match_official_blocks(variant: str, images: torch.Tensor) -> None:
    model = build("adapter_plus", variant=variant)
    config = model.method.hp.placement
    block = _official_block(config, model.petl["mlp"], model.petl["attn"] if config == "houlsby" else None)
    with torch.no_grad():
        torch.testing.assert_close(model(images), vit_reference(plain_copy(model), images, block), **TOL)


def test_adapter_plus_variant_settings_and_overrides() -> None:
    cls = petlbench.get_method("adapter_plus")
    assert cls.resolve()["placement"] == "post" and cls.resolve()["scaling"] == "channel"
    hou = cls.resolve({"variant": "houlsby"})
    assert (hou["placement"], hou["scaling"], hou["train_layernorm"]) == ("houlsby", "fixed", True)
    pf = cls.resolve({"variant": "pfeiffer"})
    assert (pf["placement"], pf["norm"], pf["init"]) == ("pfeiffer", True, "bert")
    af = cls.resolve({"variant": "adaptformer"})
    assert (af["placement"], af["scale"], af["init"]) == ("parallel", 0.1, "lora")
    assert cls.resolve({"variant": "houlsby", "placement": "pre"})["placement"] == "pre"  # the user wins
    assert cls.resolve(suite="vtab", task="resisc45")["bottleneck"] == 8
    assert cls.resolve({"task_dims": "1-32"}, suite="vtab", task="resisc45")["bottleneck"] == 32
    assert cls.resolve({"task_dims": "1-8"}, suite="vtab", task="cifar")["bottleneck"] == 1
    assert cls.resolve(suite="fgvc", task="StanfordCars")["bottleneck"] == 32
    assert cls.resolve(suite="fgvc", task="OxfordFlowers")["bottleneck"] == 1


def test_adapter_plus_houlsby_trains_layernorms() -> None:
    model = build("adapter_plus", variant="houlsby")
    norms = [p for m in model.net.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
    assert norms and all(p.requires_grad for p in norms)


# ------------------------------------------------------------------------------------- Convpass
def _official_convpass_vit(mod, x, side):
    """JieShibo/PETL-ViT convpass.Convpass.forward (14x14 generalised to side x side)."""
    b, n, _ = x.shape
    d = mod.down.out_features
    x_down = quick_gelu(F.linear(x, mod.down.weight, mod.down.bias))
    x_patch = x_down[:, 1:].reshape(b, side, side, d).permute(0, 3, 1, 2)
    x_patch = F.conv2d(x_patch, mod.conv.weight, mod.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(b, -1, d)
    x_cls = x_down[:, :1].reshape(b, 1, 1, d).permute(0, 3, 1, 2)
    x_cls = F.conv2d(x_cls, mod.conv.weight, mod.conv.bias, padding=1).permute(0, 2, 3, 1).reshape(b, 1, d)
    x_down = quick_gelu(torch.cat([x_cls, x_patch], dim=1))
    return F.linear(x_down, mod.up.weight, mod.up.bias)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("positions", ["attn_mlp", "attn"])
def test_convpass_vit_matches_official_block(positions: str, images: torch.Tensor) -> None:
    model = build("convpass", positions=positions, scale=0.7, xavier_init=True)
    att, mlp = model.petl["attn"], model.petl["mlp"] if positions == "attn_mlp" else None
    s = 0.7

    def block(i, blk, x):
        side = math.isqrt(x.shape[1] - 1)
        n1 = blk.norm1(x)
        x = x + blk.attn(n1) + _official_convpass_vit(att[i], n1, side) * s
        n2 = blk.norm2(x)
        out = x + blk.mlp(n2)
        return out + _official_convpass_vit(mlp[i], n2, side) * s if mlp is not None else out

    with torch.no_grad():
        torch.testing.assert_close(model(images), vit_reference(plain_copy(model), images, block), **TOL)


def test_convpass_identity_init_and_presets() -> None:
    model = petlbench.create_model(*BACKBONES["vit"][:1], "convpass", 5, backbone_kwargs=BACKBONES["vit"][1])
    conv = model.petl["attn"][0].conv.weight
    assert torch.equal(conv[:, :, 1, 1], torch.eye(8)) and conv.abs().sum() == 8
    cls = petlbench.get_method("convpass")
    assert cls.resolve(suite="vtab", task="svhn") | {} == {**cls.resolve(), "scale": 100.0, "xavier_init": True}
    assert cls.resolve(suite="vtab", task="cifar")["scale"] == 0.1
    assert cls.resolve({"positions": "attn"}, suite="vtab", task="caltech101")["scale"] == 100.0


def test_convpass_swin_matches_official_block(images: torch.Tensor) -> None:
    model = build("convpass", "swin", scale=0.5, xavier_init=True)
    plain = plain_copy(model, "swin")
    att, mlp = model.petl["attn"], model.petl["mlp"]

    def swin_bypass(mod, u):  # Convpass_swin.forward on (B, L, C)
        b, n, _ = u.shape
        h = math.isqrt(n)
        d = mod.down.out_features
        z = F.linear(u, mod.down.weight, mod.down.bias).reshape(b, h, h, d).permute(0, 3, 1, 2)
        z = F.conv2d(quick_gelu(z), mod.conv.weight, mod.conv.bias, padding=1)
        z = quick_gelu(z.permute(0, 2, 3, 1).reshape(b, -1, d))
        return F.linear(z, mod.up.weight, mod.up.bias)

    blocks = [blk for stage in plain.layers for blk in stage.blocks]
    calls = {"i": 0}

    def official_block(blk, x):  # forward_swin_block, on timm 1.0's (B, H, W, C) layout
        i = calls["i"]
        calls["i"] += 1
        b, h, w, c = x.shape
        shortcut = x + (swin_bypass(att[i], blk.norm1(x).reshape(b, -1, c)) * 0.5).reshape(b, h, w, c)
        x = shortcut + blk._attn(blk.norm1(x))
        x = x.reshape(b, -1, c)
        x = x + blk.mlp(blk.norm2(x)) + swin_bypass(mlp[i], blk.norm2(x)) * 0.5
        return x.reshape(b, h, w, c)

    for blk in blocks:
        blk.forward = (lambda bb: (lambda x: official_block(bb, x)))(blk)
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), **TOL)


# ------------------------------------------------------------------------------------------ DTL
@pytest.mark.parametrize("add_blocks", ["1", "0-1"])
@pytest.mark.parametrize("method,fusion", [("dtl", 0), ("dtl_plus", 3)])
def test_dtl_matches_official_forward(method: str, fusion: int, add_blocks: str, images: torch.Tensor) -> None:
    model = build(method, lora_blocks="0-1", add_blocks=add_blocks)
    adds = {1} if add_blocks == "1" else {0, 1}
    side = model.petl["side"]
    plain = plain_copy(model)
    assert (len(side.fusion) > 0) == bool(fusion)
    with torch.no_grad():
        x = plain.norm_pre(plain._pos_embed(plain.patch_embed(images)))
        residuals = 0.0
        for bid, blk in enumerate(plain.blocks):
            residuals = residuals + x @ side.lora_a[bid].T @ side.lora_b[bid].T
            x = blk(x)
            if bid in adds:
                act = residuals * torch.sigmoid(residuals * 100.0)
                if fusion:
                    b, n, c = act.shape
                    s = math.isqrt(n - 1)
                    patches = act[:, 1:].reshape(b, s, s, c).permute(0, 3, 1, 2)
                    fused = F.conv2d(patches, side.fusion["0"].weight, padding="same", groups=c)
                    act = torch.cat([act[:, :1], fused.permute(0, 2, 3, 1).reshape(b, -1, c)], dim=1)
                x = x + act
        expected = plain.head(plain.norm(x[:, 1:].mean(dim=1)))
        torch.testing.assert_close(model(images), expected, **TOL)
    assert model.pooling == "mean_patch_tokens_then_norm"
    assert petlbench.create_model(*BACKBONES["vit"][:1], "lora", 5, backbone_kwargs=BACKBONES["vit"][1]).pooling \
        == "cls_token"


def test_dtl_never_reads_a_stale_running_sum(images: torch.Tensor) -> None:
    """An add block before the stage's first lora block adds nothing, even after an interrupted pass."""
    model = build("dtl", lora_blocks="1", add_blocks="0-1")
    with torch.no_grad():
        clean = model(images)
        model.petl["side"].running = {0: torch.full((1, 1, model.backbone.blocks[0].dim), 1e3)}  # broadcasts
        torch.testing.assert_close(model(images), clean, rtol=0, atol=0)


def test_dtl_default_blocks_follow_the_paper_on_vit_b_and_swin_b() -> None:
    model = petlbench.create_model("vit_base_patch16_224", "dtl", 10, device="meta")
    side = model.petl["side"]
    assert side.lora_blocks == list(range(12)) and side.add_blocks == list(range(6, 12))
    assert [tuple(a.shape) for a in side.lora_a] == [(2, 768)] * 12
    swin = petlbench.create_model("swin_base_patch4_window7_224", "dtl", 10, device="meta")
    side = swin.petl["side"]
    assert side.lora_blocks == list(range(4, 24)) and side.add_blocks == list(range(14, 24))
    assert [tuple(a.shape) for a in side.lora_a] == [(4, 512)] * 18 + [(4, 1024)] * 2
    assert swin.pooling == "avg"
    assert petlbench.count_params(swin).trainable_without_head == 2 * 4 * (18 * 512 + 2 * 1024)


@pytest.mark.parametrize("method", ["dtl", "dtl_plus"])
def test_dtl_swin_matches_official_forward(method: str, images: torch.Tensor) -> None:
    """heekhero/DTL models/swin_transformer.py BasicLayer.forward: R restarts at every stage."""
    model = build(method, "swin", lora_blocks="0-1", add_blocks="0-1")
    side = model.petl["side"]
    plain = plain_copy(model, "swin")
    assert side.lora_blocks == [0, 1] and [a.shape[0] for a in side.lora_a] == [4, 4]
    with torch.no_grad():
        x = plain.patch_embed(images)
        bid = 0
        for stage in plain.layers:
            x = stage.downsample(x)
            residual = 0.0
            for blk in stage.blocks:
                residual = residual + x @ side.lora_a[bid].T @ side.lora_b[bid].T
                x = blk(x)
                act = residual * torch.sigmoid(residual * 100.0)
                if method == "dtl_plus":
                    conv = side.fusion[str(bid)]  # the tiny Swin has one block per stage
                    act = F.conv2d(act.permute(0, 3, 1, 2), conv.weight, padding="same",
                                   groups=act.shape[-1]).permute(0, 2, 3, 1)
                x = x + act
                bid += 1
        expected = plain.forward_head(plain.norm(x))
        torch.testing.assert_close(model(images), expected, **TOL)


def test_dtl_presets() -> None:
    assert petlbench.get_method("dtl_plus").resolve(suite="vtab", task="clevr_count")["fusion_size"] == 5
    assert petlbench.get_method("dtl").resolve(suite="vtab", task="clevr_count")["fusion_size"] == 0
    assert petlbench.get_method("dtl").recipes["vtab"]["cifar"] == {"lr": 3e-4, "drop_path_rate": 0.1}


# ------------------------------------------------------------------------------------------ SCT
def _official_saliency(plain, batches, k: int) -> torch.Tensor:
    """showlab/SCT getSalientChannels, mode sct_attn."""
    feats = {i: [] for i in range(len(plain.blocks))}
    handles = [blk.norm2.register_forward_hook(lambda m, a, o, i=i: feats[i].append(a[0][:, 1:, :]))
               for i, blk in enumerate(plain.blocks)]
    labels = []
    with torch.no_grad():
        for x, y in batches:
            labels.append(y)
            plain(x)
    for h in handles:
        h.remove()
    labels_ = torch.cat(labels)
    out = []
    for i in feats:
        f = torch.cat(feats[i])
        per_class = torch.stack([torch.norm(f[labels_ == c], 2, dim=(0, 1)) for c in labels_.unique()])
        fea = per_class.mean(0)
        thr = fea.sort().values[f.shape[-1] - 1 - k]
        out.append(torch.nonzero(fea > thr).squeeze(1))
    return torch.stack(out)


def test_sct_default_width_is_one_eighth() -> None:
    assert build("sct").petl["sct"].index.shape == (2, 32 // 8)


def test_sct_calibration_and_forward_match_official(images: torch.Tensor) -> None:
    model = build("sct", channels=16)  # half the channels: criteria that differ pick different sets
    tuner = model.petl["sct"]
    k = tuner.index.shape[1]
    assert k == 16 and not bool(tuner.calibrated)
    gen = torch.Generator().manual_seed(3)
    # Classes of very different energy, so a per-class L2 norm, its mean and a pooled norm rank channels differently.
    batches = []
    for j in range(4):
        labels = torch.tensor([j % 3, (j + 1) % 3, 2])
        gain = torch.tensor([1.0, 6.0, 0.2])[labels].view(-1, 1, 1, 1)
        batches.append((gain * (images + torch.randn(images.shape, generator=gen)), labels))
    plain = plain_copy(model)
    expected_index = _official_saliency(plain, batches, k)
    model.train()
    model.method.calibrate(model.backbone, model.petl, batches, torch.device("cpu"))
    assert model.training, "calibration restores the training mode"
    assert torch.equal(tuner.index, expected_index) and bool(tuner.calibrated)
    model.eval()

    def block(i, blk, x):
        x = attn_res(blk, x)
        idx = tuner.index[i]
        x = x.clone()
        x[..., idx] += F.linear(x[..., idx], tuner.weight[i], tuner.bias[i])
        return x + mlp_branch(blk, x)

    with torch.no_grad():
        torch.testing.assert_close(model(images), vit_reference(plain, images, block), **TOL)


def test_sct_calibration_without_images_is_a_clear_error() -> None:
    model = build("sct")
    with pytest.raises(PetlbenchError, match="no training images"):
        model.method.calibrate(model.backbone, model.petl, [], torch.device("cpu"))


def test_sct_vtab_preset_is_the_papers_top96() -> None:
    assert petlbench.get_method("sct").resolve(suite="vtab", task="dtd")["channels"] == 96


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method,hp,match", [
    ("adapter_plus", {"placement": "sideways"}, "placement.*must be one of"),
    ("adapter_plus", {"variant": "nope"}, "variant.*must be one of"),
    ("adapter_plus", {"bottleneck": 33}, "'bottleneck'=33 is larger than the width"),
    ("adaptformer", {"bottleneck": 64}, "'bottleneck'=64 is larger than the width"),
    ("convpass", {"dim": 40}, "'dim'=40 is larger than the width"),
    ("sct", {"channels": 33}, "'channels'=33 is larger than the width"),
    ("dtl", {"rank": 33}, "'rank'=33 is larger than the width"),
    ("dtl", {"add_blocks": "5-9"}, "outside 0-1"),
    ("dtl", {"lora_blocks": "a-b"}, "is not a block list"),
    ("convpass", {"positions": "everywhere"}, "positions.*must be one of"),
])
def test_bad_input_is_one_clear_line(method: str, hp: dict, match: str) -> None:
    with pytest.raises(PetlbenchError, match=match) as info:
        build(method, **hp)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["sct"])
def test_vit_only_methods_refuse_swin(method: str) -> None:
    with pytest.raises(PetlbenchError, match="not defined on swin"):
        build(method, "swin")


def test_dtl_refuses_a_vit_that_normalises_before_it_average_pools() -> None:
    """Norm, then mean (``fc_norm=False``) is not DTL's mean, then norm; an MAE-style average pool with
    fc_norm already is DTL's pooling and is kept (tests/test_backbone_matrix.py)."""
    arch, kwargs = BACKBONES["vit"]
    with pytest.raises(PetlbenchError, match="pools with 'avg'"):
        petlbench.create_model(arch, "dtl", 5, backbone_kwargs={**kwargs, "global_pool": "avg", "fc_norm": False})


def test_sct_calibration_is_saved_and_restored(images: torch.Tensor, tmp_path) -> None:
    torch.manual_seed(1)
    source = build("sct", channels=16)
    calibrate(source, [(images, torch.tensor([0, 1, 2])), (images.flip(-1), torch.tensor([2, 2, 0]))])
    assert source.calibration["images"] == 6
    assert not torch.equal(source.petl["sct"].index[0], torch.arange(16))
    path = petlbench.save_trainable(source, tmp_path / "sct.safetensors")
    torch.manual_seed(1)
    target = build("sct", channels=16)
    petlbench.load_trainable(target, path)
    assert torch.equal(target.petl["sct"].index, source.petl["sct"].index) and bool(target.petl["sct"].calibrated)
    with torch.no_grad():
        assert torch.equal(source.eval()(images), target.eval()(images))


def test_published_rows_follow_the_published_configuration() -> None:
    def row(method: str, suite: str, task: str, **hp):
        cls = petlbench.get_method(method)
        return cls.published_as(suite, cls.resolve(hp, suite=suite, task=task))

    assert row("adaptformer", "vtab", "cifar") == "AdaptFormer"
    assert row("adaptformer", "vtab", "cifar", bottleneck=64) is None
    assert row("adaptformer", "vtab", "cifar", layernorm="in") is None
    assert row("adapter_plus", "vtab", "cifar") is None  # no per-task rows shipped yet
    assert row("convpass", "vtab", "svhn") == "Convpass"
    assert row("convpass", "vtab", "svhn", positions="attn") is None
    assert row("dtl", "vtab", "dtd") == "DTL" and row("dtl_plus", "vtab", "dtd") is None
    assert row("sct", "vtab", "dtd") == "SCT" and row("sct", "vtab", "dtd", channels=32) is None
    assert row("ln_tune", "vtab", "dtd") is None


def test_adapter_plus_published_as_selects_adapter_plus_itself(monkeypatch) -> None:
    cls = petlbench.get_method("adapter_plus")
    monkeypatch.setattr(cls, "published", {"vtab": "Adapter+", "fgvc": "Adapter+"})

    def row(suite: str, task: str, **hp):
        return cls.published_as(suite, cls.resolve(hp, suite=suite, task=task))

    assert row("vtab", "cifar") == "Adapter+" and row("fgvc", "StanfordCars") == "Adapter+"
    assert row("vtab", "cifar", variant="houlsby") is None
    assert row("vtab", "cifar", task_dims="1-32") is None


def test_transform_branch_refuses_post_norm_blocks() -> None:
    from timm.models.vision_transformer import ResPostBlock

    arch, kwargs = BACKBONES["vit"]
    with pytest.raises(PetlbenchError, match="ResPostBlock, not timm's pre-norm"):
        petlbench.create_model(arch, "adaptformer", 5, backbone_kwargs={**kwargs, "block_fn": ResPostBlock})
