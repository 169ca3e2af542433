"""FacT-TT/TK, GLoRA, NOAH and GPS against hand-written transcriptions of their official formulas.

Each reference below restates the official code's arithmetic (reshapes included) directly on the
method's tensors, independently of the method's own implementation; outputs are compared on a
tiny random ViT in eval mode with all method tensors randomised.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import petlbench
from petlbench import PetlbenchError
from petlbench.backbone import remove_petl_hooks
from tests.conftest import BACKBONES

SITES = ("qkv", "proj", "fc1", "fc2")


def build(method: str, family: str = "vit", randomise: bool = True, **hp) -> petlbench.PETLModel:
    arch, kwargs = BACKBONES[family]
    model = petlbench.create_model(arch, method, 5, backbone_kwargs=kwargs, **hp)
    with torch.no_grad():
        for p in model.petl.parameters() if randomise else ():
            p.add_(torch.randn_like(p) * 0.1)
        for _, bias in model.backbone.modules_with_bias():
            bias.add_(torch.randn_like(bias) * 0.1)
    return model.eval()


def capture(model: petlbench.PETLModel, images: torch.Tensor) -> dict[tuple[int, str], tuple]:
    """(block, site) -> (input, output) of every adapted linear, the output after the method's branch."""
    seen, handles = {}, []
    for blk in model.backbone.blocks:
        for site in SITES:
            def hook(mod, args, out, key=(blk.index, site)):
                seen[key] = (args[0].detach(), out.detach().clone())
            handles.append(getattr(blk, site).register_forward_hook(hook))
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return seen


# ------------------------------------------------------------------------------------ FacT
def fact_tt_reference(fact, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
    """fact_tt.py: q = FacTv(q_FacTs(FacTu(x))) ...; fc1/fc2 through the (B, N, 4, .) reshapes."""
    u, v, s, r = fact.u, fact.v, fact.scale, fact.rank
    c = v.shape[0]
    B, N, _ = x.shape
    if site == "qkv":
        return torch.cat([(x @ u.t()) @ fact.attn[layer, j].t() @ v.t() for j in range(3)], dim=2) * s
    if site == "proj":
        return (x @ u.t()) @ fact.attn[layer, 3].t() @ v.t() * s
    if site == "fc1":
        h = ((x @ u.t()) @ fact.mlp_in[layer].t()).reshape(B, N, 4, r)
        return (h @ v.t()).reshape(B, N, 4 * c) * s
    h = (x.reshape(B, N, 4, c) @ u.t()).reshape(B, N, 4 * r)
    return (h @ fact.mlp_out[layer].t()) @ v.t() * s


def fact_tk_reference(fact, layer: int, site: str, x: torch.Tensor) -> torch.Tensor:
    """fact_tk.py: FacTc = FacTc @ FacTp[:, idx:idx+4|8], attention idx 12l, MLP idx 12l+4."""
    u, v, s, r = fact.u, fact.v, fact.scale, fact.rank
    c = v.shape[0]
    B, N, _ = x.shape
    z = x @ u.t() if site != "fc2" else None
    if site in ("qkv", "proj"):
        cores = fact.core @ fact.factor[:, 12 * layer:12 * layer + 4]
        if site == "qkv":
            return torch.cat([z @ cores[:, :, j] @ v.t() for j in range(3)], dim=2) * s
        return z @ cores[:, :, 3] @ v.t() * s
    cores = fact.core @ fact.factor[:, 12 * layer + 4:12 * layer + 12]
    fc1_c, fc2_c = cores[:, :, :4].reshape(r, 4 * r), cores[:, :, 4:].reshape(r, 4 * r)
    if site == "fc1":
        return ((z @ fc1_c).reshape(B, N, 4, r) @ v.t()).reshape(B, N, 4 * c) * s
    h = (x.reshape(B, N, 4, c) @ u.t()).reshape(B, N, 4 * r)
    return (h @ fc2_c.t()) @ v.t() * s


@pytest.mark.parametrize("method,reference", [("fact_tt", fact_tt_reference), ("fact_tk", fact_tk_reference)])
def test_fact_matches_the_official_formula(method: str, reference, images: torch.Tensor) -> None:
    model = build(method, rank=4, scale=3.0)
    fact = model.petl["fact"]
    seen = capture(model, images)
    assert len(seen) == 4 * len(model.backbone.blocks)
    with torch.no_grad():
        for (layer, site), (x, y) in seen.items():
            lin = getattr(model.backbone.blocks[layer], site)
            expected = F.linear(x, lin.weight, lin.bias) + reference(fact, layer, site, x)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_fact_starts_as_the_pretrained_model(images: torch.Tensor) -> None:
    arch, kwargs = BACKBONES["vit"]
    model = petlbench.create_model(arch, "fact_tk", 5, backbone_kwargs=kwargs).eval()
    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))  # V is zero


def test_fact_dropout_acts_on_the_rank_activations(images: torch.Tensor) -> None:
    model = build("fact_tt", dropout=0.5).train()
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))


# ----------------------------------------------------------------------------------- GLoRA
def glora_reference(mod, lin, x: torch.Tensor) -> torch.Tensor:
    """layer.py SuperScalableLinear.forward with prepare_path for the module's fixed forms."""
    w, b = lin.weight, lin.bias
    out_f, in_f = w.shape

    def path(key: str, shape: tuple[int, int] | None):
        form = mod.forms[key]
        if form == "lora":
            return getattr(mod, key + "d") @ getattr(mod, key + "u")
        if form == "vector":
            t = getattr(mod, key)
            return t.unsqueeze(1) if shape is not None else t
        if form == "constant":
            return getattr(mod, key)
        return torch.zeros(shape) if shape is not None else torch.zeros(1)

    a, bb, c = path("A", (out_f, in_f)), path("B", (out_f, in_f)), path("C", (in_f, 1))
    d, e = path("D", None), path("E", None)
    weight = w + w * a + bb
    bias = b + b * d + e
    prompt = torch.matmul(w, c if c.dim() == 2 else c.unsqueeze(1)).squeeze()
    return F.linear(x, weight, bias + prompt)


def assert_glora_linears(model: petlbench.PETLModel, images: torch.Tensor, reference) -> None:
    """Every adapted linear's output equals ``reference(module, linear, input)``."""
    modules = iter(model.petl["glora"])
    seen = capture(model, images)
    with torch.no_grad():
        for blk in model.backbone.blocks:
            for site in SITES:
                x, y = seen[(blk.index, site)]
                torch.testing.assert_close(y, reference(next(modules), getattr(blk, site), x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["LLLVV", "VCVCC", "NLNNV", "CNLVN"])
def test_glora_matches_the_official_formula(config: str, images: torch.Tensor) -> None:
    model = build("glora", rank=3, config=config)
    assert_glora_linears(model, images, glora_reference)


def test_glora_per_linear_codes(images: torch.Tensor) -> None:
    codes = ",".join(["LLLVV", "NNNNN", "VVVVV", "CCNCC"] * 2)  # tiny ViT: 2 blocks x 4 linears
    model = build("glora", config=codes)
    assert [m.forms["A"] for m in model.petl["glora"]][:4] == ["lora", "none", "vector", "constant"]
    assert sum(p.numel() for p in model.petl["glora"][1].parameters()) == 0
    with torch.no_grad():
        expected = model(images)
        assert torch.allclose(petlbench.merge(model).eval()(images), expected, atol=1e-5)


# ------------------------------------------------------------------------------------ NOAH
def noah_reference(model: petlbench.PETLModel, images: torch.Tensor) -> torch.Tensor:
    """supernet_vision_transformer_timm.py Block/VisionTransformer forward, written out on a plain copy."""
    net = copy.deepcopy(model.net)
    remove_petl_hooks(net)
    noah = model.petl["noah"]
    sizes = noah.fixed
    x = net.patch_embed(images)
    x = net._pos_embed(x)
    for i, blk in enumerate(net.blocks):
        n = sizes["prompt"][i]
        if n:
            previous = sizes["prompt"][i - 1] if i > 0 else 0  # sample_last_prompt_tuning_dim
            tokens = noah.prompts[str(i)][:n].expand(x.shape[0], -1, -1)
            x = torch.cat((x if previous == 0 else x[:, :-previous], tokens), dim=1)
        h = blk.norm1(x)
        B, N, C = h.shape
        qkv = blk.attn.qkv(h)
        r = sizes["lora"][i]
        if r:
            lora = noah.lora[str(i)]
            qkv = qkv + F.linear(F.linear(h, lora.a[:r]), lora.b[:, :r])
        q, k, v = qkv.reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(dim=-1)
        x = x + blk.attn.proj((att @ v).transpose(1, 2).reshape(B, N, C))
        m = blk.mlp(blk.norm2(x))
        d = sizes["adapter"][i]
        if d:
            ad = noah.adapter[str(i)]
            z = F.linear(m, ad.down.weight[:d], ad.down.bias[:d])
            m = m + F.linear(z * torch.sigmoid(1.702 * z), ad.up.weight[:, :d], ad.up.bias)
        x = x + m
    x = net.norm(x)
    return net.head(x[:, 0])


@pytest.mark.parametrize("sizes", [
    {"lora_dims": "2,3", "adapter_dims": "4,0", "prompt_dims": "3,5"},
    {"lora_dims": "0,1", "adapter_dims": "2,2", "prompt_dims": "4,0"},
    {"lora_dims": "1", "adapter_dims": "1", "prompt_dims": "0,2"},
])
def test_noah_matches_the_official_forward(sizes: dict, images: torch.Tensor) -> None:
    model = build("noah", **sizes)
    with torch.no_grad():
        torch.testing.assert_close(model(images), noah_reference(model, images), rtol=1e-5, atol=1e-5)


def test_noah_vtab_presets_are_the_published_subnets() -> None:
    cls = petlbench.get_method("noah")
    hp = cls.resolve(suite="vtab", task="oxford_iiit_pet")  # NOAH's oxford_pet.yaml
    assert hp["prompt_dims"] == "10,5,5,10,1,10,10,10,10,5,10,10"
    assert hp["lora_dims"] == "10,1,1,10,5,1,1,5,10,10,1,10"
    assert cls.resolve({"lora_dims": "3"}, suite="vtab", task="cifar")["lora_dims"] == "3"


# ------------------------------------------------------------------------------------- GPS
def loader(n_batches: int = 2, classes: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, classes, (4,), generator=g))
            for _ in range(n_batches)]


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_gps_calibration_picks_the_top_k_gradients(family: str) -> None:
    model = build("gps", family, randomise=False, k=3, loss="ce")  # calibration runs right after apply
    data = loader()
    # independent reference: accumulated |grad| of cross-entropy on a plain copy in train mode
    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    plain.train().requires_grad_(True)
    torch.manual_seed(7)  # Swin's default drop-path draws random numbers in train mode
    for batch in data:
        F.cross_entropy(plain(batch[0]), batch[1]).backward()
    bb = petlbench.Backbone(plain)
    targets = [bb.patch_proj] + [getattr(b, s) for b in bb.blocks for s in SITES]
    flags = [p.requires_grad for p in model.parameters()]
    torch.manual_seed(7)
    model.method.calibrate(model.backbone, model.petl, data, "cpu")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for target, delta in zip(targets, model.petl["gps"], strict=True):
        score = target.weight.grad.reshape(target.weight.shape[0], -1).abs()
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter(1, delta.index.long(), True)
        assert chosen.sum(dim=1).eq(3).all()
        kth = score.topk(3, dim=1).values[:, -1:]
        assert (score[chosen].reshape(-1, 3) >= kth).all()
        assert (score[~chosen].reshape(score.shape[0], -1) <= kth).all()


def test_gps_trains_exactly_the_selected_weights(images: torch.Tensor) -> None:
    model = build("gps", k=2)
    model.method.calibrate(model.backbone, model.petl, loader(), "cpu")
    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    bb = petlbench.Backbone(plain)
    targets = [bb.patch_proj] + [getattr(b, s) for b in bb.blocks for s in SITES]
    with torch.no_grad():
        for target, delta in zip(targets, model.petl["gps"], strict=True):
            w = target.weight.reshape(target.weight.shape[0], -1)
            for row in range(w.shape[0]):
                for j, col in enumerate(delta.index[row].tolist()):
                    w[row, col] += delta.values[row, j]
            target.bias += delta.bias
        torch.testing.assert_close(model(images), plain.eval()(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(petlbench.merge(model).eval()(images), plain(images), rtol=1e-5, atol=1e-5)


def test_gps_supcon_calibration_runs_and_changes_the_selection() -> None:
    model = build("gps", k=1)
    before = [d.index.clone() for d in model.petl["gps"]]
    model.method.calibrate(model.backbone, model.petl, loader(), "cpu")
    assert any(not torch.equal(a, d.index) for a, d in zip(before, model.petl["gps"], strict=True))


def test_supcon_loss_matches_the_definition() -> None:
    from petlbench_methods.gps import supcon_loss

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(6, 8, generator=g), torch.tensor([0, 1, 0])
    f = F.normalize(feats, dim=1)
    lab = labels.repeat(2)
    total = 0.0
    for i in range(6):
        denom = sum(torch.exp(f[i] @ f[a] / 0.07) for a in range(6) if a != i)
        pos = [p for p in range(6) if p != i and lab[p] == lab[i]]
        total += -sum(torch.log(torch.exp(f[i] @ f[p] / 0.07) / denom) for p in pos) / len(pos)
    torch.testing.assert_close(supcon_loss(feats, labels), total / 6)


def test_gps_needs_training_data() -> None:
    model = build("gps")
    assert petlbench.get_method("gps").needs_calibration
    with pytest.raises(PetlbenchError, match="training loader yielded no batch"):
        model.method.calibrate(model.backbone, model.petl, [], "cpu")


def test_gps_presets() -> None:
    cls = petlbench.get_method("gps")
    assert cls.resolve(suite="fgvc", task="StanfordCars")["k"] == 15
    assert cls.recipes["vtab"]["cifar"]["lr"] == 1e-2


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method,hp,match", [
    ("fact_tt", {"rank": 33}, "'rank'=33 is larger than the width"),
    ("fact_tk", {"rank": 40}, "larger than the width"),
    ("glora", {"config": "LLLVX"}, "is not five letters"),
    ("glora", {"config": "LLCVV"}, "is not five letters"),  # C cannot be a constant
    ("glora", {"config": "LLLVV,LLLVV"}, "has 2 codes but this backbone has 8"),
    ("glora", {"rank": 40}, "'rank'=40 is larger than the width"),
    ("noah", {"lora_dims": "1,2,3"}, "one per block"),
    ("noah", {"adapter_dims": "x"}, "adapter_dims"),
    ("noah", {"lora_dims": "64"}, "larger than the width 32"),
    ("noah", {"supernet": True, "lora_dims": "20"}, "must be <= the largest search_dims"),
    ("noah", {"supernet": True, "search_depths": "3"}, "beyond the 2 blocks"),
    ("noah", {"supernet": True, "search_dims": "0,x"}, "search_dims"),
    ("gps", {"k": 200}, "k=200 is larger"),
])
def test_bad_input_is_one_clear_line(method: str, hp: dict, match: str) -> None:
    arch, kwargs = BACKBONES["vit"]
    with pytest.raises(PetlbenchError, match=match) as info:
        petlbench.create_model(arch, method, 5, backbone_kwargs=kwargs, **hp)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("method", ["fact_tt", "fact_tk", "noah"])
def test_vit_only_methods_refuse_swin(method: str) -> None:
    arch, kwargs = BACKBONES["swin"]
    with pytest.raises(PetlbenchError, match="not defined on swin"):
        petlbench.create_model(arch, method, 5, backbone_kwargs=kwargs)


@pytest.mark.parametrize("method,display,vtab,fgvc", [
    ("fact_tt", "FacT-TT", None, None), ("fact_tk", "FacT-TK", "FacT (TK)", None),  # no FacT (TT) rows shipped yet
    ("glora", "GLoRA", None, None), ("noah", "NOAH", "NOAH", None), ("gps", "GPS", "GPS", "GPS"),
])
def test_shared_names(method: str, display: str, vtab: str | None, fgvc: str | None) -> None:
    cls = petlbench.get_method(method)
    assert cls.display_name == display
    assert cls.published_as("vtab", cls.resolve(suite="vtab")) == vtab
    assert cls.published_as("fgvc", cls.resolve(suite="fgvc")) == fgvc


def test_gps_selection_is_saved_and_restored_without_data(images: torch.Tensor, tmp_path) -> None:
    from petlbench.model import calibrate

    torch.manual_seed(5)
    model = build("gps", randomise=False, k=2)
    done = calibrate(model, loader(), "cpu")
    assert done["batches"] == 2 and done["images"] == 8
    with torch.no_grad():
        for p in model.petl.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = petlbench.save_trainable(model, tmp_path / "gps.safetensors")
    torch.manual_seed(5)
    fresh = build("gps", randomise=False, k=2)  # never calibrated; same backbone
    assert any(not torch.equal(a.index, b.index) for a, b in zip(model.petl["gps"], fresh.petl["gps"], strict=True))
    meta = petlbench.load_trainable(fresh, path)
    assert meta["calibration"] == {"images": 8, "batches": 2}
    assert all(torch.equal(a.index, b.index) for a, b in zip(model.petl["gps"], fresh.petl["gps"], strict=True))
    assert petlbench.count_params(fresh).trainable_without_head == petlbench.count_params(model).trainable_without_head
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(images), fresh(images))


# ------------------------------------------------------------------------ GLoRA supernet + search
def supernet_reference(mod, lin, x: torch.Tensor, forms: dict[str, str]) -> torch.Tensor:
    """SuperScalableLinear.forward with eval_config=forms (prepare_path slices of the supernet tensors)."""
    w, b = lin.weight, lin.bias

    def path(key: str):
        form = forms[key]
        if key in "ABC":
            d, u = getattr(mod, key + "d"), getattr(mod, key + "u")
            if form == "lora":
                return d @ u
            if form == "vector":
                return d[:, 0].unsqueeze(1)
            if form == "constant":
                return d[0, 0]
            return torch.zeros(d.shape[0], u.shape[1])
        t = getattr(mod, key)
        return {"vector": t, "constant": t[0], "none": torch.zeros(1)}[form]

    a, bb, c, d, e = (path(k) for k in "ABCDE")
    return F.linear(x, w + w * a + bb, b + b * d + e + torch.matmul(w, c).squeeze())


@pytest.mark.parametrize("config", ["LLLVV", "VCVCC", "CNNNV"])
def test_glora_supernet_eval_matches_the_official_slices(config: str, images: torch.Tensor) -> None:
    from petlbench_methods.glora import parse_config

    model = build("glora", rank=3, config=config, supernet=True)
    forms = parse_config(config, 1)[0]
    assert_glora_linears(model, images, lambda mod, lin, x: supernet_reference(mod, lin, x, forms))
    with torch.no_grad():
        torch.testing.assert_close(petlbench.merge(model).eval()(images), model(images), rtol=1e-5, atol=1e-5)


def test_glora_supernet_samples_a_sub_network_per_step(images: torch.Tensor) -> None:
    model = build("glora", supernet=True).train()
    arch, kwargs = BACKBONES["vit"]
    full = petlbench.create_model(arch, "glora", 5, backbone_kwargs=kwargs, device="meta", supernet=True)
    fixed = petlbench.create_model(arch, "glora", 5, backbone_kwargs=kwargs, device="meta", config="NNNNN")
    assert petlbench.count_params(full).trainable > petlbench.count_params(fixed).trainable
    torch.manual_seed(0)
    outs = [model(images) for _ in range(3)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[1], outs[2])
    forms = {tuple(m.sampled.values()) for m in model.petl["glora"]}
    assert len(forms) > 1  # linears draw their forms independently


def test_glora_search_finds_a_legal_sub_network() -> None:
    from petlbench_methods.glora import parse_config, search, subnet_params

    model = build("glora", supernet=True)
    data = loader(2)
    lins = model.method._linears(model.backbone)
    limit = 3000
    result = search(model, data, "cpu", param_limit=limit, epochs=3, population=6, select=2, mutation=2,
                    crossover=2, seed=1)
    configs = parse_config(result["config"], len(lins))
    assert result["params"] == sum(subnet_params(f, lin.out_features, lin.in_features, 4)
                                   for f, lin in zip(configs, lins, strict=True)) <= limit
    assert result["evaluated"] >= 6
    assert all(m.forms == parse_config("LLLVV", 1)[0] for m in model.petl["glora"])  # left as it was
    for m, forms in zip(model.petl["glora"], configs, strict=True):
        m.forms = forms
    from petlbench.search import accuracy as _accuracy

    assert _accuracy(model.eval(), data, "cpu") == result["accuracy"]


def test_glora_search_needs_a_supernet() -> None:
    from petlbench_methods.glora import search

    with pytest.raises(PetlbenchError, match="supernet=True"):
        search(build("glora"), loader(1))
    with pytest.raises(PetlbenchError, match="no sub-network within"):
        search(build("glora", supernet=True), loader(1), param_limit=-1, epochs=1, population=2)


# ------------------------------------------------------------------------- NOAH supernet + search
def test_noah_supernet_eval_is_the_sliced_sub_network(images: torch.Tensor) -> None:
    model = build("noah", supernet=True, search_dims="1,3,4", search_depths="1,2",
                  lora_dims="3,1", adapter_dims="0,4", prompt_dims="4,1")
    noah = model.petl["noah"]
    assert all(m.a.shape[0] == 4 for m in noah.lora.values()) and len(noah.prompts) == 2  # largest size, every block
    with torch.no_grad():
        torch.testing.assert_close(model(images), noah_reference(model, images), rtol=1e-5, atol=1e-5)


def test_noah_supernet_draws_a_sub_network_per_forward(images: torch.Tensor) -> None:
    model = build("noah", supernet=True, search_dims="1,2,4", search_depths="1,2", lora_dims="2", adapter_dims="2",
                  prompt_dims="2").train()
    noah = model.petl["noah"]
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        model(images).sum().backward()
        sizes = noah.active
        assert all(v in (0, 1, 2, 4) for k in sizes for v in sizes[k])
        assert all(sizes[k][1] == 0 or sizes[k][0] > 0 for k in sizes)  # leading blocks only
        seen.add(tuple(map(tuple, sizes.values())))
    assert len(seen) > 1
    model.eval()
    with torch.no_grad():
        model(images)
    assert noah.active == noah.fixed


def test_noah_search_returns_a_legal_subnet() -> None:
    from petlbench_methods.noah import noah_count, search

    model = build("noah", supernet=True, search_dims="1,2,4", search_depths="1,2", lora_dims="2", adapter_dims="2",
                  prompt_dims="2")
    limit = 6000  # the dead model-level prompts alone count (1 + 100) * 32
    result = search(model, loader(2), "cpu", param_limit=limit, epochs=3, population=5, select=2, mutation=2,
                    crossover=2, seed=0)
    sizes = {k: [int(v) for v in result[f"{k}_dims"].split(",")] for k in ("prompt", "lora", "adapter")}
    assert result["noah_params"] == noah_count(sizes, 32, 100, dead=True) <= limit
    assert result["params"] == noah_count(sizes, 32, 100)
    for kind in sizes.values():  # a depth of leading blocks
        assert kind[1] == 0 or kind[0] > 0
    arch, kwargs = BACKBONES["vit"]
    retrain = petlbench.create_model(arch, "noah", 5, backbone_kwargs=kwargs, device="meta",
                                     **{k: result[k] for k in ("prompt_dims", "lora_dims", "adapter_dims")})
    assert petlbench.count_params(retrain).trainable_without_head == result["params"]


def test_noah_search_needs_a_supernet() -> None:
    from petlbench_methods.noah import search

    with pytest.raises(PetlbenchError, match="supernet=True"):
        search(build("noah"), loader(1))
