"""The backbone interface over every family: roles found by what they compute, ``describe()``,
plan-time refusals, and weights in each release's own key layout.

Every model here has its LayerNorm affines, biases, LayerScale gammas, tokens and position
embeddings perturbed away from timm's init values (ones, zeros, 0.1), which would otherwise make
a misplaced role (norm2 taken for norm1, a LayerScale skipped) compute the same numbers.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import petlbench
from petlbench import PetlbenchError
from petlbench.backbone import FAMILIES, TOKEN_FAMILIES, Backbone
from petlbench.cli import main
from petlbench.weights import save_backbone
from tests.conftest import BACKBONES, TINY_CONVNEXT, TINY_DEIT_DISTILLED, TINY_EVA, TINY_SWIN, TINY_VIT

_SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
#: One tiny model per family and per ViT variant the interface must tell apart.
MODELS = {
    "vit": TINY_VIT,
    "clip_prenorm": ("vit_base_patch16_clip_224", _SMALL),  # pre_norm=True: a LayerNorm before block 0
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", _SMALL),  # 4 registers, LayerScale, no_embed_class
    "siglip_map": ("vit_base_patch16_siglip_224", _SMALL),  # no class token, attention-pool (MAP) head
    "mae_gap": ("vit_base_patch16_224", {**_SMALL, "global_pool": "avg", "fc_norm": True, "qkv_bias": False}),
    "deit_distilled": TINY_DEIT_DISTILLED,
    "eva": TINY_EVA,  # EVA-02 B/L layout: split q/k/v, SwiGLU with its norm
    "eva_fused": ("eva02_tiny_patch14_224", {**_SMALL, "ref_feat_shape": (4, 4), "head_init_scale": 1.0}),  # Ti/S
    "swin": TINY_SWIN,
    "convnext": TINY_CONVNEXT,
    "deit3": ("deit3_small_patch16_224", {**_SMALL, "init_values": 0.1}),  # LayerScale, no_embed_class
}


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every LayerNorm affine, bias, LayerScale gamma, token and position embedding off its init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if (leaf in ("weight", "bias") and p.ndim == 1) or leaf in ("gamma", "gamma_1", "gamma_2", "q_bias", "v_bias") \
                or "token" in leaf or leaf == "pos_embed" or leaf.endswith("_bias"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def tiny(name: str, num_classes: int = 5) -> torch.nn.Module:
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    return perturb(timm.create_model(arch, num_classes=num_classes, **kwargs)).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Tape:
    """Inputs and outputs of modules during one forward (forward hooks, removed afterwards)."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls = dict.fromkeys(modules, 0)
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key: str):
        def hook(module, args, output):
            self.inputs[key], self.outputs[key] = args[0], output
            self.calls[key] += 1
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ------------------------------------------------------------------------------------ block roles
@pytest.mark.parametrize("name", list(MODELS))
def test_block_roles_are_where_they_compute(name: str) -> None:
    """Each block's output is rebuilt from its roles alone: norm1 feeds attn, norm2 feeds the MLP,
    LayerScale scales each branch, and the linears named qkv/proj/fc1/fc2 really run."""
    model = tiny(name)
    bb = Backbone(model, MODELS[name][0])
    x = images()
    for blk in bb.blocks:
        present = {r: getattr(blk, r) for r in ("qkv", "q", "k", "v", "proj", "fc1", "fc2") if blk.has(r)}
        sites = {"block": blk.block, "mlp": blk.mlp, "norm2": blk.norm2, **present}
        if blk.has("attn"):
            sites.update(attn=blk.attn, norm1=blk.norm1)
        tape = Tape(**sites)
        with torch.no_grad():
            model(x)
        tape.close()
        assert all(n == 1 for n in tape.calls.values()), tape.calls  # every named linear ran, once
        x_in, out = tape.inputs["block"], tape.outputs["block"]
        mlp_out, ls_mlp = tape.outputs["mlp"], blk.ls_mlp if blk.ls_mlp is not None else 1.0
        with torch.no_grad():
            if bb.family == "convnext":
                mixed = blk.block.conv_dw(x_in).permute(0, 2, 3, 1)
                torch.testing.assert_close(tape.inputs["mlp"], blk.norm2(mixed))
                expected = x_in + (ls_mlp * mlp_out).permute(0, 3, 1, 2)
            else:
                ls_attn = blk.ls_attn if blk.ls_attn is not None else 1.0
                if bb.family == "swin":  # attention runs on shifted windows: rebuild around the MLP only
                    mlp_out = mlp_out.reshape(out.shape)  # Swin's MLP runs on (B, H*W, C)
                    h = out - ls_mlp * mlp_out
                else:
                    torch.testing.assert_close(tape.inputs["attn"], blk.norm1(x_in))
                    h = x_in + ls_attn * tape.outputs["attn"]
                torch.testing.assert_close(tape.inputs["mlp"], blk.norm2(h).reshape(tape.inputs["mlp"].shape))
                expected = h + ls_mlp * mlp_out
                torch.testing.assert_close(tape.outputs["proj"], tape.outputs["attn"])
            torch.testing.assert_close(out, expected)
            if blk.has("fc2"):
                torch.testing.assert_close(tape.outputs["fc2"].reshape(mlp_out.shape), mlp_out)


def test_layer_scale_roles_are_the_gammas() -> None:
    for name, expected in (("dinov2_reg", True), ("eva", True), ("convnext", True), ("vit", False), ("swin", False)):
        bb = Backbone(tiny(name))
        gammas = [g for b in bb.blocks for g in (b.ls_attn, b.ls_mlp) if g is not None]
        assert bool(gammas) == expected, name
        assert all(isinstance(g, torch.nn.Parameter) and g.shape == (b.dim,) for b in bb.blocks
                   for g in (b.ls_attn, b.ls_mlp) if g is not None)


def test_eva_fused_qkv_with_separate_biases_is_refused_because_its_module_never_runs() -> None:
    """EVA-02 Ti/S: timm applies qkv.weight with F.linear beside q_bias/v_bias; a hook on the qkv
    module would be silently skipped, so the role is refused rather than handed out."""
    model = tiny("eva_fused")
    blk = Backbone(model, "eva02_tiny_patch14_224").blocks[0]
    module = blk.block.attn.qkv
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(images())
    handle.remove()
    assert calls == []  # the claim behind the refusal
    assert blk.qkv_fused is True and not blk.has("qkv")
    with pytest.raises(PetlbenchError, match="has no 'qkv': its q/k/v biases live outside") as err:
        _ = blk.qkv
    assert "Fix:" in _one_line(err.value)


@pytest.mark.parametrize("name,role,why", [
    ("eva", "qkv", "separate linears"), ("eva", "fc1", "gated \\(SwiGLU\\)"), ("vit", "q", "one fused linear"),
    ("convnext", "attn", "no attention"), ("convnext", "num_heads", "no attention"),
])
def test_a_block_role_a_family_lacks_is_one_line(name: str, role: str, why: str) -> None:
    blk = Backbone(tiny(name)).blocks[0]
    assert not blk.has(role)
    with pytest.raises(PetlbenchError, match=why) as err:
        getattr(blk, role)
    assert "Fix:" in _one_line(err.value)


@pytest.mark.parametrize("role", ["token_site", "num_prefix_tokens", "prefix_tokens", "patch_embed"])
def test_a_backbone_role_convnext_lacks_is_one_line(role: str) -> None:
    bb = Backbone(tiny("convnext"), "convnext_atto")
    assert not bb.has(role)
    with pytest.raises(PetlbenchError, match="convnext") as err:
        getattr(bb, role)
    assert "Fix:" in _one_line(err.value)


def test_rmsnorm_backbone_refuses_layernorms_instead_of_skipping_its_norms() -> None:
    model = timm.create_model("vit_base_patch16_xp_224", **_SMALL)  # RmsNorm + parallel blocks
    bb = Backbone(model, "vit_base_patch16_xp_224")
    with pytest.raises(PetlbenchError, match="normalises with RmsNorm"):
        _ = bb.layernorms
    assert not bb.blocks[0].has("qkv")  # a parallel block: no pre-norm roles are handed out


# ------------------------------------------------------------------------------------ token roles
@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("swin", "convnext")])
def test_token_roles(name: str) -> None:
    """token_site's output is block 0's input; prefix_tokens names each leading position by the
    parameter that moves it; final_norm's input is the last block's output."""
    model = tiny(name)
    bb = Backbone(model, MODELS[name][0])
    assert bb.family in TOKEN_FAMILIES
    x = images()
    tape = Tape(site=bb.token_site, first=bb.blocks[0].block, last=bb.blocks[-1].block, final=bb.final_norm)
    with torch.no_grad():
        model(x)
    tape.close()
    torch.testing.assert_close(tape.outputs["site"], tape.inputs["first"])
    torch.testing.assert_close(tape.inputs["final"], tape.outputs["last"])
    grid = model.patch_embed.grid_size
    assert tape.outputs["site"].shape[1] == bb.num_prefix_tokens + grid[0] * grid[1]
    names = bb.prefix_tokens
    assert len(names) == bb.num_prefix_tokens
    for kind, param in (("cls", bb.cls_token), ("dist", bb.dist_token), ("reg", bb.reg_token)):
        if param is None:
            assert kind not in names
            continue
        delta = torch.randn(param.shape, generator=torch.Generator().manual_seed(5))  # not a constant: a
        with torch.no_grad():  # pre-norm LayerNorm would erase a shift of all channels by one value
            param.add_(delta)
            moved = Tape(site=bb.token_site)
            model(x)
            moved.close()
            param.sub_(delta)
        changed = (moved.outputs["site"] - tape.outputs["site"]).abs().amax(dim=(0, 2)) > 1e-6
        assert changed.nonzero().flatten().tolist() == [i for i, n in enumerate(names) if n == kind], kind


@pytest.mark.parametrize("name", list(MODELS))
def test_classifier_of_the_pre_logit_features_is_the_model(name: str) -> None:
    """What the engine's probe and compiled paths compute (classifier(forward_features(x))) is
    the model's own forward; for distilled DeiT both heads on their own tokens, averaged."""
    arch, kwargs = MODELS[name]
    model = petlbench.create_model(arch, "linear", 4, backbone_kwargs=kwargs)
    perturb(model.net)
    with torch.no_grad():
        for head in model.backbone.heads:
            head.weight.normal_()
        model.eval()
        x = images()
        torch.testing.assert_close(model.backbone.classifier(model.forward_features(x)), model(x))
        model.train()  # distilled DeiT trains on the averaged logits too (not distillation training)
        torch.testing.assert_close(model.backbone.classifier(model.forward_features(x)), model(x))


def test_distilled_deit_heads_are_both_trained_and_initialised() -> None:
    arch, kwargs = TINY_DEIT_DISTILLED
    model = petlbench.create_model(arch, "linear", 3, backbone_kwargs=kwargs, reuse_backbone=True)
    bb = model.backbone
    assert [type(h) for h in bb.heads] == [torch.nn.Linear, torch.nn.Linear] and bb.head is model.net.head
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bb.head_parameters()} and len(trainable) == 4
    assert petlbench.count_params(model).head == 2 * (3 * 32 + 3)
    for head in bb.heads:  # the fresh heads of the cached path: trunc-normal std 0.02, zero bias
        assert 0 < float(head.weight.detach().std()) < 0.05 and not head.bias.any()
    from petlbench.model import init_head

    for head in bb.heads:
        init_head(head, "zeros")
    assert not any(p.any() for p in bb.head_parameters())


def test_packed_compiled_step_refuses_two_heads() -> None:
    from petlbench.packing import pack_problem

    arch, kwargs = TINY_DEIT_DISTILLED
    models = [petlbench.create_model(arch, "lora", 3, backbone_kwargs=kwargs) for _ in range(2)]
    cfg = {"compile": True, "precision": "fp32", "epochs": 1, "batch_size": 2}
    assert "two" in pack_problem(models, [cfg, cfg], [[1], [1]], torch.device("cpu"))


# ------------------------------------------------------------------------------------ biases, norms
@pytest.mark.parametrize("name", list(MODELS))
def test_modules_with_bias_are_every_additive_bias_of_the_body(name: str) -> None:
    model = tiny(name)
    bb = Backbone(model)
    heads = {id(p) for p in bb.head_parameters()}
    expected = {id(p) for n, p in model.named_parameters() if n.endswith("bias") and id(p) not in heads}
    assert {id(b) for _, b in bb.modules_with_bias()} == expected
    names = {n for n, p in model.named_parameters() if id(p) in expected}
    if name == "mae_gap":  # qkv_bias=False: no qkv bias to train, the others are
        assert not any("qkv" in n for n in names) and any("proj.bias" in n for n in names)
    if name == "eva_fused":  # EVA keeps q/v biases outside the linear (k has none by design)
        assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= names


@pytest.mark.parametrize("name", list(MODELS))
def test_generic_methods_run_on_every_family(name: str) -> None:
    """Linear probing, full fine-tuning, BitFit and LN-tune need nothing model-specific."""
    arch, kwargs = MODELS[name]
    for method, body in (("linear", set()), ("bitfit", "bias"), ("ln_tune", "norm"), ("full", "all")):
        model = petlbench.create_model(arch, method, 3, backbone_kwargs=kwargs)
        bb = model.backbone
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        heads = {id(p) for p in bb.head_parameters()}
        assert heads <= trainable
        if body == "bias":
            body = {id(b) for _, b in bb.modules_with_bias()}
        elif body == "norm":
            body = {id(p) for m in bb.layernorms for p in m.parameters()}
            assert body, "every family here has LayerNorms"
        elif body == "all":
            body = {id(p) for p in bb.body_parameters()}
        assert trainable - heads == body, (name, method)


# ------------------------------------------------------------------------------------ describe
EXPECTED = {
    "vit": {"token_prefix": ["cls"], "pre_norm": False, "pooling": "cls_token", "heads": 1, "qkv": "fused",
            "qkv_bias": True, "mlp": "plain", "layer_scale": False, "position": "absolute", "grid": [4, 4],
            "final_norm": True, "fc_norm": False, "attn_pool": False, "blocks": 2, "stages": 1, "widths": [32]},
    "clip_prenorm": {"pre_norm": True, "pooling": "cls_token", "final_norm": True},
    "dinov2_reg": {"token_prefix": ["cls", "reg", "reg", "reg", "reg"], "layer_scale": True},
    "siglip_map": {"token_prefix": [], "pooling": "map", "attn_pool": True},
    "mae_gap": {"pooling": "avg", "final_norm": False, "fc_norm": True, "qkv_bias": False},
    "deit_distilled": {"token_prefix": ["cls", "dist"], "heads": 2, "pooling": "cls_and_dist_tokens"},
    "eva": {"qkv": "split q/k/v", "qkv_bias": True, "mlp": "gated, split fc1_g/fc1_x", "position": "absolute + rope",
            "layer_scale": True, "pooling": "avg", "final_norm": False, "fc_norm": True},
    "eva_fused": {"qkv": "fused, biases outside", "mlp": "gated, packed fc1", "layer_scale": False},
    "swin": {"token_prefix": None, "stages": 2, "widths": [16, 32], "position": "relative (windows)", "pooling": "avg",
             "qkv": "fused"},
    "deit3": {"token_prefix": ["cls"], "layer_scale": True, "pooling": "cls_token"},
    "convnext": {"token_prefix": None, "stages": 4, "widths": [8, 16], "qkv": None, "qkv_bias": None, "mlp": "plain",
                 "layer_scale": True, "fc_norm": True, "final_norm": False, "position": "none (convolutional)",
                 "patch_size": 4},
}
FAMILY_OF = {"deit_distilled": "deit_distilled", "eva": "eva", "eva_fused": "eva", "swin": "swin",
             "convnext": "convnext"}


@pytest.mark.parametrize("name", list(MODELS))
def test_describe(name: str) -> None:
    info = Backbone(tiny(name), MODELS[name][0]).describe()
    assert info["family"] == FAMILY_OF.get(name, "vit")
    for key, value in EXPECTED[name].items():
        assert info["roles"][key] == value, (name, key, info["roles"][key])
    json.dumps(info)  # plain data
    if name == "eva":
        assert {"block.qkv", "block.fc1"} <= set(info["absent"])
    if name == "convnext":
        assert {"token_site", "block.attn", "block.qkv"} <= set(info["absent"])


def test_cli_backbone_describe_lists_roles_and_method_verdicts() -> None:
    arch, kwargs = TINY_CONVNEXT
    args = ["backbone", "describe", "--backbone", arch]
    for key, value in kwargs.items():
        args += ["--backbone-arg", f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["family"] == "convnext" and info["roles"]["layer_scale"] is True
    verdicts = info["methods"]
    assert {m for m, v in verdicts.items() if not v.startswith("refused")} == {"linear", "full", "bitfit", "ln_tune"}
    assert "no attention" in verdicts["lora"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0 and "absent roles:" in text.output and "bitfit" in text.output


def test_list_backbones_includes_every_family() -> None:
    result = CliRunner().invoke(main, ["list", "backbones"])
    names = set(result.output.split())
    for arch in ("vit_base_patch16_224", "deit_base_distilled_patch16_224", "eva02_base_patch14_224",
                 "swin_tiny_patch4_window7_224", "convnext_tiny", "vit_base_patch14_reg4_dinov2"):
        assert arch in names


# ------------------------------------------------------------------------------------ declarations
def test_every_method_runs_or_says_why_on_every_family() -> None:
    for name in petlbench.list_methods():
        cls = petlbench.get_method(name)
        assert cls.families <= set(FAMILIES), name
        for family in FAMILIES:
            why = cls.refusal(family)
            assert (why is None) == (family in cls.families)
            if why is not None:
                assert family in cls.family_refusals, f"{name} refuses {family} without its own reason"
                assert "\n" not in why
    for name in ("linear", "full", "bitfit", "ln_tune"):
        assert petlbench.get_method(name).families == frozenset(FAMILIES)


@pytest.mark.parametrize("method,family", [(m, f) for m in petlbench.list_methods() for f in BACKBONES
                                           if f not in petlbench.get_method(m).families])
def test_refused_family_names_the_reason(method: str, family: str) -> None:
    arch, kwargs = BACKBONES[family]
    with pytest.raises(PetlbenchError, match=f"not defined on {family} backbones") as err:
        petlbench.create_model(arch, method, 3, backbone_kwargs=kwargs, device="meta")
    assert petlbench.get_method(method).family_refusals[family] in _one_line(err.value)


def _run_args(arch: str, kwargs: dict, method: str) -> list[str]:
    args = ["run", "--suite", "demo", "--task", "digits_rotation", "--method", method, "--backbone", arch,
            "--pretrained", "none", "--dry-run"]
    for key, value in kwargs.items():
        args += ["--backbone-arg", f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
    return args


@pytest.mark.parametrize("arch,kwargs,method,why", [
    (*TINY_EVA, "lora", "not defined on eva backbones"),
    (*TINY_CONVNEXT, "ssf", "not defined on convnext backbones"),
    # a family the method runs on, but a role its placement needs is missing (post-norm blocks)
    ("vit_base_patch16_rpn_224", _SMALL, "lora", "ResPostBlock, not a pre-norm block"),
])
def test_refusals_are_one_line_at_plan_time_before_any_data(arch, kwargs, method, why, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PETLBENCH_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, _run_args(arch, kwargs, f"linear,{method}") + ["--output", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], result.output
    assert not (tmp_path / "cache" / "demo").exists()  # refused before the demo data was written


# ------------------------------------------------------------------------------------ weights
def _source(name: str) -> torch.nn.Module:
    arch, kwargs = MODELS[name]
    torch.manual_seed(7)
    return perturb(timm.create_model(arch, num_classes=10, **kwargs), seed=3)


def _assert_loaded(model: petlbench.PETLModel, src: torch.nn.Module, rounded: tuple[str, ...] = ()) -> None:
    """Every body tensor of ``src`` (its heads, found by role, excluded) is in the model, exactly
    (``rounded``: up to float rounding, for tensors a converter computes as a sum)."""
    head = tuple(f"{n}." for n, m in src.named_modules() if any(m is h for h in Backbone(src).heads))
    ref = {k: v for k, v in src.state_dict().items() if not k.startswith(head)}
    got = model.net.state_dict()
    assert set(ref) <= set(got)
    for key, value in ref.items():
        if key in rounded:
            torch.testing.assert_close(got[key], value)
        else:
            assert torch.equal(got[key], value), key
    assert model.weights.tensors == len(ref)


@pytest.mark.parametrize("name", ["deit_distilled", "eva", "eva_fused", "convnext", "dinov2_reg", "siglip_map"])
def test_timm_safetensors_round_trip(name: str, tmp_path) -> None:
    """The timm / Hugging Face Hub layout (``model.safetensors``) of every family, heads excluded by role."""
    src = _source(name)
    path = save_backbone(src, tmp_path / "model.safetensors")
    arch, kwargs = MODELS[name]
    model = petlbench.create_model(arch, "linear", 3, pretrained=path, backbone_kwargs=kwargs)
    _assert_loaded(model, src)
    if name == "convnext":  # its final norm lives under head. and is loaded
        assert torch.equal(model.net.head.norm.weight, src.head.norm.weight)


def _dinov2_original(src: torch.nn.Module) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 ``dinov2_vit*14_reg4_pretrain.pth``: registers named ``register_tokens``,
    a ``mask_token``, and a position embedding that still has the class token's row (timm folds
    that row into its class token: timm cls = orig cls + orig pos[:, 0]); no head."""
    state = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("head.")}
    row0 = torch.randn(1, 1, state["cls_token"].shape[-1])
    state["register_tokens"] = state.pop("reg_token")
    state["cls_token"] = state["cls_token"] - row0
    state["pos_embed"] = torch.cat([row0, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def _eva02_original(src: torch.nn.Module) -> dict[str, torch.Tensor]:
    """baaivision/EVA EVA-02 B/L MIM checkpoint: q/v biases as ``q_bias``/``v_bias``, the attention's
    sub-LN ``inner_attn_ln``, SwiGLU as ``w1`` (gate), ``w2`` (value), ``ffn_ln``, ``w3``; the final
    LayerNorm as ``norm`` (timm's fc_norm); ``mask_token``, an ``lm_head`` and RoPE buffers besides."""
    rename = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
              ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
              ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."), ("fc_norm.", "norm."))
    out = {}
    for key, value in src.state_dict().items():
        if key.startswith("head."):
            continue
        for old, new in rename:
            key = key.replace(old, new)
        out[key] = value.clone()
    dim = src.embed_dim
    out.update({"mask_token": torch.zeros(1, 1, dim), "lm_head.weight": torch.randn(7, dim), "lm_head.bias": torch.zeros(7),
                "rope.freqs_cos": torch.randn(16, 16), "blocks.0.attn.rope.freqs_sin": torch.randn(16, 16)})
    return {"module": out}


def _convnext_original(src: torch.nn.Module) -> dict[str, torch.Tensor]:
    """facebookresearch/ConvNeXt ``convnext_*_1k_224.pth``: ``downsample_layers.i`` (0 is the stem),
    ``stages.i.j.{dwconv,norm,pwconv1,pwconv2,gamma}``, the final ``norm`` and a 1000-class ``head``."""
    out = {}
    for key, value in src.state_dict().items():
        key = key.replace("stem.", "downsample_layers.0.")
        for i in range(1, 4):
            key = key.replace(f"stages.{i}.downsample.", f"downsample_layers.{i}.")
        key = key.replace(".blocks.", ".").replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1")
        key = key.replace("mlp.fc2", "pwconv2").replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[key] = value.clone()
    return {"model": out}


def _deit3_original(src: torch.nn.Module) -> dict[str, torch.Tensor]:
    """facebookresearch/deit DeiT-III: LayerScale as ``blocks.i.gamma_1``/``gamma_2`` (timm: ``ls1.gamma``)."""
    out = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v.clone()
           for k, v in src.state_dict().items()}
    return {"model": out}


#: release -> (model, timm-to-release conversion written from the release's code, file suffix).
RELEASES = {
    "dinov2": ("dinov2_reg", _dinov2_original, ".pth"),
    "eva02": ("eva", _eva02_original, ".pt"),
    "convnext": ("convnext", _convnext_original, ".pth"),
    "deit3": ("deit3", _deit3_original, ".pth"),
    # facebookresearch/deit distilled checkpoints: timm's own key names, nested under "model", both heads
    "deit_distilled": ("deit_distilled", lambda src: {"model": dict(src.state_dict())}, ".pth"),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_original_release_layouts_load_exactly(release: str, tmp_path) -> None:
    """Each release's own .pth key layout goes through timm's filter for that architecture's module
    and loads every body tensor exactly; the layout differs from timm's, so this is not a no-op."""
    name, to_original, suffix = RELEASES[release]
    src = _source(name)
    original = to_original(src)
    flat = original.get("model", original.get("module", original))
    assert (set(flat) == set(src.state_dict())) == (release == "deit_distilled"), "a layout of its own"
    path = tmp_path / f"{release}{suffix}"
    torch.save(original, path)
    arch, kwargs = MODELS[name]
    model = petlbench.create_model(arch, "linear", 3, pretrained=path, backbone_kwargs=kwargs)
    _assert_loaded(model, src, rounded=("cls_token",) if release == "dinov2" else ())
    assert len(model.weights.sha256) == 64 and model.weights.format == suffix.lstrip(".")


@pytest.mark.parametrize("release", ["eva02", "convnext", "dinov2"])
def test_partial_release_checkpoint_is_refused(release: str, tmp_path) -> None:
    name, to_original, suffix = RELEASES[release]
    original = to_original(_source(name))
    flat = original.get("model", original.get("module", original))
    victim = sorted(k for k in flat if "blocks.1." in k or "stages.3." in k)[0]
    del flat[victim]
    path = tmp_path / f"partial{suffix}"
    torch.save(original, path)
    arch, kwargs = MODELS[name]
    with pytest.raises(PetlbenchError, match="missing from checkpoint") as err:
        petlbench.create_model(arch, "linear", 3, pretrained=path, backbone_kwargs=kwargs)
    _one_line(err.value)


def test_hugging_face_transformers_layout_is_refused_with_a_hint(tmp_path) -> None:
    state = {f"encoder.layer.{i}.attention.attention.query.weight": torch.zeros(32, 32) for i in range(2)}
    state.update({"embeddings.cls_token": torch.zeros(1, 1, 32), "layernorm.weight": torch.ones(32)})
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    arch, kwargs = TINY_VIT
    with pytest.raises(PetlbenchError, match="Hugging Face transformers checkpoint") as err:
        petlbench.create_model(arch, "linear", 3, pretrained=path, backbone_kwargs=kwargs)
    assert "Fix:" in _one_line(err.value)


def test_a_checkpoint_of_another_family_is_refused(tmp_path) -> None:
    path = save_backbone(_source("vit"), tmp_path / "vit.safetensors")
    arch, kwargs = TINY_EVA
    with pytest.raises(PetlbenchError, match="does not match backbone"):
        petlbench.create_model(arch, "linear", 3, pretrained=path, backbone_kwargs=kwargs)


def test_the_documented_method_table_is_the_declarations() -> None:
    """docs/backbones.md's methods x families table says what the methods declare."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "backbones.md").read_text()
    header = "| method | " + " | ".join(FAMILIES) + " |"
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for method in (m.strip() for m in cells[0].split(",")):
            cls = petlbench.get_method(method)
            seen.add(method)
            for family, cell in zip(FAMILIES, cells[1:], strict=True):
                if family in cls.families:
                    assert cell == ("✔ merge" if cls.mergeable else "✔ unmerged"), (method, family, cell)
                else:
                    assert cell.startswith("refused"), (method, family, cell)
    assert seen == set(petlbench.list_methods())


def test_save_backbone_without_a_classifier(tmp_path) -> None:
    """A feature extractor (num_classes=0, Identity head) has no head to leave out: every tensor is saved."""
    arch, kw = TINY_VIT
    model = timm.create_model(arch, num_classes=0, **kw)
    path = save_backbone(model, tmp_path / "features.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(model.state_dict())


@pytest.mark.parametrize("family", ["eva", "convnext"])
def test_bias_argument_on_blocks_without_some_linears(family: str) -> None:
    """EVA-02 has no qkv module and ConvNeXt no attention: asking which timm argument gives a layer a
    bias answers None for their layers instead of failing on the missing roles."""
    arch, kw = BACKBONES[family]
    bb = Backbone(timm.create_model(arch, num_classes=3, **kw))
    mlp_out = bb.blocks[0].fc2 if bb.blocks[0].has("fc2") else bb.blocks[0].fc1
    assert bb.bias_argument(mlp_out) is None
    assert bb.bias_group("qkv_bias") == [] and bb.bias_group("proj_bias") == []
