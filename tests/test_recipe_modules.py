"""Module-level fidelity and the model-side recipe settings of issue 16.

Each test states the official rule by hand (read from the official code: NOAH's and SPT's
whole-model ``_init_vit_weights``, NOAH's ``x + adapter(drop_path(mlp(norm2(x))))``, SPT's budget
sweep and ``BlockSPTSeq``, AdaptFormer's BatchNorm head, ARC's ``--vit_drop``) and compares
petlbench's model with it. Tiny backbones, CPU, no wall time.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import petlbench
from petlbench import PetlbenchError
from petlbench.backbone import remove_petl_hooks
from petlbench.config import TRAIN_HPARAMS
from petlbench.model import add_head_norm, calibrate, check_head_norm, init_head
from tests.conftest import BACKBONES, TINY_VIT


def tiny(method: str, family: str = "vit", classes: int = 5, backbone_kwargs: dict | None = None,
         **hp) -> petlbench.PETLModel:
    arch, kwargs = BACKBONES[family]
    return petlbench.create_model(arch, method, classes, backbone_kwargs={**kwargs, **(backbone_kwargs or {})}, **hp)


def defaults() -> dict:
    """Every training setting at its default (what resolve_train starts from)."""
    return {k: h.default for k, h in TRAIN_HPARAMS.items()}


def ks_normal(values: torch.Tensor, std: float) -> float:
    """Kolmogorov-Smirnov distance between ``values`` and N(0, std^2) (the +-2 truncation of timm's
    trunc_normal_ is 100 standard deviations away at std 0.02: no effect)."""
    x = values.detach().double().flatten().sort().values
    n = x.numel()
    cdf = 0.5 * (1.0 + torch.erf(x / (std * math.sqrt(2.0))))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def assert_trunc_normal_002(tensors: list[torch.Tensor]) -> None:
    """Every entry an independent N(0, 0.02^2) draw: KS test at the 0.1 % level (critical 1.95/sqrt(n))."""
    values = torch.cat([t.detach().flatten() for t in tensors])
    assert ks_normal(values, 0.02) < 1.95 / math.sqrt(values.numel()), "not trunc-normal(0.02)"
    assert float(values.abs().max()) < 2.0


def randomise(model: petlbench.PETLModel) -> None:
    with torch.no_grad():
        for p in model.petl.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for _, bias in model.backbone.modules_with_bias():
            bias.add_(torch.randn_like(bias) * 0.1)


# ------------------------------------------------------------------------------ initialisation
def test_noah_redraws_every_linear_trunc_normal_and_keeps_xavier_prompts() -> None:
    """NOAH's VisionTransformer.__init__ ends with self.apply(_init_vit_weights): every nn.Linear --
    LoRA_a, LoRA_b, the adapter's ln1/ln2 -- trunc-normal std 0.02 with zero bias; prompts (Parameters)
    keep xavier-uniform over the (1, init_width, dim) supernet tensor."""
    model = tiny("noah", lora_dims="10", adapter_dims="10", prompt_dims="6")
    net = model.petl["noah"]
    linears = [t for lora in net.lora.values() for t in (lora.a, lora.b)]
    linears += [layer.weight for ad in net.adapter.values() for layer in (ad.down, ad.up)]
    assert_trunc_normal_002(linears)
    assert all(not ad.down.bias.any() and not ad.up.bias.any() for ad in net.adapter.values())
    assert all(lora.b.any() for lora in net.lora.values())  # B is not zero: the model moves at step 0
    bound = math.sqrt(6.0 / ((100 + 1) * 32))
    prompts = torch.cat([p.detach().flatten() for p in net.prompts.values()])
    assert float(prompts.abs().max()) <= bound and float(prompts.abs().max()) > 0.9 * bound  # uniform, not normal


def test_lora_init_choice_and_vtab_preset_reproduce_noahs_baseline() -> None:
    cls = petlbench.get_method("lora")
    assert cls.resolve(suite="vtab")["init"] == "noah" and cls.resolve()["init"] == "lora"
    noah = tiny("lora", **cls.resolve(suite="vtab"))
    assert_trunc_normal_002([t for pair in noah.petl["lora"] for t in (pair.lora_a, pair.lora_b)])
    for targets in ("qv", "qkv"):
        default = tiny("lora", targets=targets)
        for pair in default.petl["lora"]:  # loralib: A kaiming-uniform(a=sqrt 5) = U(+-1/sqrt(dim)), B zero
            assert not pair.lora_b.any()
            a = pair.lora_a.detach()
            assert float(a.abs().max()) <= 1 / math.sqrt(32) and float(a.std()) > 0.08


def test_adapter_noah_variant_initialises_as_noahs_model() -> None:
    model = tiny("adapter", variant="noah")
    assert_trunc_normal_002([layer.weight for ad in model.petl["adapters"] for layer in (ad.down, ad.up)])
    assert all(not layer.bias.any() for ad in model.petl["adapters"] for layer in (ad.down, ad.up))


# ---------------------------------------------------------------------- placement vs drop path
def _drop_all_of_last_block(model: petlbench.PETLModel) -> None:
    """Block 1 of the tiny ViT built with drop_path_rate > 0 has DropPath modules; with drop_prob 1
    they zero every sample's branch (deterministically: bernoulli(0))."""
    blk = model.backbone.blocks[-1].block
    for module in (blk.drop_path1, blk.drop_path2):
        module.drop_prob = 1.0


def _reference_with_last_block_dropped(model: petlbench.PETLModel, images: torch.Tensor, mlp_update) -> torch.Tensor:
    """Block 0 runs whole; block 1's attention and MLP branches are dropped by drop path.
    ``mlp_update(i, h, b)`` is the official rule for what the MLP sub-layer adds, ``h`` the stream,
    ``b`` the MLP output after drop path."""
    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    plain.eval()
    x = plain.norm_pre(plain._pos_embed(plain.patch_embed(images)))
    last = len(plain.blocks) - 1
    for i, blk in enumerate(plain.blocks):
        if i < last:
            x = x + blk.attn(blk.norm1(x))
            x = x + mlp_update(i, x, blk.mlp(blk.norm2(x)))
        else:
            x = x + mlp_update(i, x, torch.zeros_like(x))
    return plain.head(plain.norm(x)[:, 0])


def _noah_adapter(ad, y: torch.Tensor) -> torch.Tensor:
    z = F.linear(y, ad.down.weight, ad.down.bias)
    return y + F.linear(z * torch.sigmoid(1.702 * z), ad.up.weight, ad.up.bias)


@pytest.mark.parametrize("method,hp", [
    ("noah", {"lora_dims": "0", "prompt_dims": "0", "adapter_dims": "3", "adapter_dropout": 0.0}),
    ("adapter", {"variant": "noah", "dropout": 0.0}),
    ("adapter", {"variant": "vpt", "dropout": 0.0}),
    ("adaptformer", {"dropout": 0.0}),
])
def test_adapters_sit_where_the_official_block_puts_them_relative_to_drop_path(method: str, hp: dict,
                                                                              images: torch.Tensor) -> None:
    """NOAH (and its Adapter baseline): x + adapter(drop_path(mlp(norm2(x)))): a dropped sample still
    gets adapter(0). AdaptFormer: x + drop_path(mlp(norm2(x))) + s * adapter(x). VPT's Pfeiffer adapter
    (its ViT has no drop path) stays inside the sub-layer, so a dropped branch adds nothing."""
    model = tiny(method, backbone_kwargs={"drop_path_rate": 0.5}, **hp)
    randomise(model)
    _drop_all_of_last_block(model)
    model.train()

    def update(i: int, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if method == "noah":
            return _noah_adapter(model.petl["noah"].adapter[str(i)], b)
        ad = model.petl["adapters"][i]
        if method == "adaptformer":
            return b + ad.scale * ad.up(F.relu(ad.down(h)))
        if hp["variant"] == "noah":
            return _noah_adapter(ad, b)
        dropped = i == len(model.backbone.blocks) - 1
        return b if dropped else b + ad.up(F.gelu(ad.down(b)))

    with torch.no_grad():
        torch.testing.assert_close(model(images), _reference_with_last_block_dropped(model, images, update),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ SPT
def official_sweep(units, scores: torch.Tensor, kind: str, rank: int, budget: float, step: float,
                   alpha: float = 10.0, beta: float = 5.0):
    """ziplab/SPT engine.get_sensitivity's selection, written out: for param_num = k * step (k = 1..79),
    the top ceil(param_num * 1e6) entries are sensitive; vector keys (norms, biases) are tuned whole
    with >= size/beta of them (counting size), matrices get a structured module with >= cost/alpha
    (counting cost), anything else counts its sensitive entries; total = (that + 768) / 1e6 in float32;
    a step replaces the saved one when abs(total - budget) <= abs(saved - budget), saved starting at 0."""
    order = torch.argsort(scores, descending=True, stable=True)
    saved_total, saved = torch.tensor(0.0), None
    k32 = torch.tensor(budget, dtype=torch.float32)
    for k in range(1, 80):
        param_num = k * step
        tau = math.ceil(param_num * 1e6)
        if tau > scores.numel():
            break
        mask = torch.zeros_like(scores)
        mask[order[:tau]] = 1.0
        start, structured, unstructured = 0, 0.0, torch.tensor(0.0)
        whole, sparse = [], []
        for u in units:
            piece = mask[start:start + u.size]
            start += u.size
            grad_sum = piece.sum()
            if not u.matrix:
                tuned = bool(grad_sum >= u.size / beta)
                structured += u.size if tuned else 0
            else:
                out_dim, in_dim = u.stop - u.start, u.layer.weight.shape[1]
                cost = in_dim * rank + rank * out_dim if kind == "lora" else 2 * out_dim * rank + rank + out_dim
                tuned = bool(grad_sum >= cost / alpha)
                structured += cost if tuned else 0
            if not tuned:
                unstructured = unstructured + grad_sum
            whole.append(tuned)
            sparse.append(torch.nonzero(piece).flatten() if (not tuned and u.linear) else torch.zeros(0, dtype=torch.long))
        total = (unstructured + structured + 768) / 1e6
        if (total - k32).abs() <= (saved_total - k32).abs():
            saved_total, saved = total, (whole, sparse)
    return saved


@pytest.mark.parametrize("method", ["spt_lora", "spt_adapter"])
@pytest.mark.parametrize("budget,step", [(0.003, 0.003 / 40), (0.002, 0.0001), (0.006, 0.0002), (0.004, 0.0005)])
def test_spt_selection_is_the_official_sweep(method: str, budget: float, step: float) -> None:
    from petlbench_methods.spt import _units

    model = tiny(method, budget=budget, sweep_step=step)
    units = _units(model.backbone)
    gen = torch.Generator().manual_seed(int(budget * 1e6) + int(step * 1e7))
    scores = torch.rand(sum(u.size for u in units), generator=gen) ** 4  # a few large, many small, like grad^2
    whole, sparse = model.method._choose(units, scores)
    expected = official_sweep(units, scores, model.method.structured_type, 8, budget, step)
    assert expected is not None
    assert whole == expected[0]
    assert all(torch.equal(a, b) for a, b in zip(sparse, expected[1], strict=True))


def test_spt_sweep_without_a_fitting_step_is_one_line() -> None:
    model = tiny("spt_lora", budget=0.003)  # the official 0.02 M step: more than the tiny model's entries
    from petlbench_methods.spt import _units

    units = _units(model.backbone)
    with pytest.raises(PetlbenchError, match="sweep_step") as err:
        model.method._choose(units, torch.rand(sum(u.size for u in units)))
    assert "\n" not in str(err.value)


def calib_batches(n: int = 2, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 5, (size,), generator=gen))
            for _ in range(n)]


def test_spt_sensitivity_pass_runs_like_the_official_one() -> None:
    """get_sensitivity: model.train() (the run's drop path acts), one loss per batch of 32 (here
    calib_batch=2), grad^2 summed per entry over the first calib_images images."""
    from petlbench_methods.spt import _units

    model = tiny("spt_lora", backbone_kwargs={"drop_path_rate": 0.5}, budget=0.003, sweep_step=0.003 / 40,
                 calib_batch=2, calib_images=6)
    model.eval()
    data = calib_batches()
    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    plain.train().requires_grad_(True)
    units = _units(petlbench.Backbone(plain))
    tensors = {id(getattr(u.layer, u.tensor)): getattr(u.layer, u.tensor) for u in units}
    images = torch.cat([x for x, _ in data])[:6]
    labels = torch.cat([y for _, y in data])[:6]
    torch.manual_seed(5)
    for i in range(0, 6, 2):  # three batches of 2: 6 images, the second loader batch re-cut
        plain.zero_grad()
        F.cross_entropy(plain(images[i:i + 2]), labels[i:i + 2]).backward()
        for t in tensors.values():
            t.sq = (getattr(t, "sq", 0) + t.grad ** 2)
    reference = torch.cat([getattr(u.layer, u.tensor).sq[u.start:u.stop].reshape(-1) for u in units])

    seen, modes = {}, []
    original = model.method._choose

    def spy(units_, scores):
        seen["scores"] = scores.clone()
        return original(units_, scores)

    model.method._choose = spy
    model.backbone.blocks[-1].block.drop_path1.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    torch.manual_seed(5)
    calibrate(model, data)
    assert modes and all(modes), "drop path ran in eval mode during the sensitivity pass"
    assert not model.training, "calibration must leave the model in the mode it found it"
    torch.testing.assert_close(seen["scores"], reference, rtol=1e-5, atol=1e-12)
    assert model.calibration == {"images": 8, "batches": 2, "seconds": model.calibration["seconds"]}


def test_spt_structured_modules_start_as_init_weights_leaves_them() -> None:
    model = tiny("spt_lora", budget=0.02, sweep_step=0.0005)
    calibrate(model, calib_batches())
    branches = [b for d in model.petl["linear"].values() for b in d.branches]
    assert len(branches) >= 2
    assert_trunc_normal_002([layer.weight for b in branches for layer in (b.down, b.up)])
    adapter = tiny("spt_adapter", budget=0.02, sweep_step=0.0005)
    calibrate(adapter, calib_batches())
    mods = [b for d in adapter.petl["seq"].values() for b in d.branches]
    mods += [b for d in adapter.petl["linear"].values() for b in d.branches]
    assert mods and all(not layer.bias.any() for b in mods for layer in (b.down, b.up))


def spt_adapter_reference(model: petlbench.PETLModel, images: torch.Tensor) -> torch.Tensor:
    """ziplab/SPT BlockSPTSeq (AttentionSPTSeq + MlpSPTSeq) in eval mode, written out on a plain copy:
    sparse deltas folded into the weights, q/k/v/fc1/fc2 adapters applied to the layer's output
    (y + adapter(y)), proj's adapter in parallel on proj's input, whole-tuned norms and the class token."""
    from petlbench_methods.spt import _units

    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    plain.eval()
    bb = petlbench.Backbone(plain)
    layers = {u.layer_name: u.layer for u in _units(bb)}
    petl = model.petl
    seq, par = {}, {}
    with torch.no_grad():
        for name, delta in petl["linear"].items():
            layer = layers[name]
            if len(delta.w_index):
                layer.weight += delta.weight_delta()
            if len(delta.b_index):
                layer.bias += delta.bias_delta()
            par[name] = list(zip(delta.row_starts, delta.branches, strict=True))
        for name, outs in petl["seq"].items():
            seq[name] = list(zip(outs.row_starts, outs.branches, strict=True))
        for name, nd in petl["norms"].items():
            if nd.dgamma is not None:
                layers[name].weight += nd.dgamma
            if nd.dbeta is not None:
                layers[name].bias += nd.dbeta
        plain.cls_token += petl["cls"].delta

    def adapter(branch, y):
        return branch.up(F.gelu(branch.down(y)))

    def run(name, layer, x):
        y = layer(x)
        for row, branch in par.get(name, []):  # parallel, on the input (proj)
            y = y + F.pad(adapter(branch, x), (row, y.shape[-1] - row - branch.up.out_features))
        parts = [y]
        for row, branch in seq.get(name, []):  # sequential, on the output block
            block = y[..., row:row + branch.up.out_features]
            parts.append(F.pad(adapter(branch, block), (row, y.shape[-1] - row - block.shape[-1])))
        return sum(parts)

    with torch.no_grad():
        x = plain.norm_pre(plain._pos_embed(plain.patch_embed(images)))
        for i, blk in enumerate(plain.blocks):
            h = blk.norm1(x)
            B, N, C = h.shape
            H = blk.attn.num_heads
            q, k, v = run(f"b{i}_qkv", blk.attn.qkv, h).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)
            x = x + run(f"b{i}_proj", blk.attn.proj, (att @ v).transpose(1, 2).reshape(B, N, C))
            m = F.gelu(run(f"b{i}_fc1", blk.mlp.fc1, blk.norm2(x)))
            x = x + run(f"b{i}_fc2", blk.mlp.fc2, m)
        return plain.head(plain.norm(x)[:, 0])


def _calibrated_adapter(**hp) -> petlbench.PETLModel:
    model = tiny("spt_adapter", **{"budget": 0.02, "sweep_step": 0.0004, "drop_path": 0.0, **hp})
    calibrate(model, calib_batches())
    randomise(model)
    return model.eval()


def test_spt_adapter_is_sequential_on_layer_outputs(images: torch.Tensor) -> None:
    model = _calibrated_adapter()
    seq = model.petl["seq"]
    assert seq, "this calibration put no adapter on a layer output"
    for name, outs in seq.items():
        assert not name.endswith("_proj")
        for row, branch in zip(outs.row_starts, outs.branches, strict=True):  # width -> r -> width
            assert branch.down.in_features == branch.up.out_features and branch.down.out_features == 8
            if name.endswith("_fc1"):
                assert branch.down.in_features == 128 and row == 0  # fc1's adapter: hidden -> r -> hidden
    with torch.no_grad():
        torch.testing.assert_close(model(images), spt_adapter_reference(model, images), rtol=1e-5, atol=1e-5)


def test_spt_adapter_count_is_the_official_formula() -> None:
    """Structured adapter: out*r + r*out + r + out (get_structured_param_num), now also what trains;
    plus the sparse entries of Linears, the whole vectors and the class token."""
    from petlbench_methods.spt import _units

    model = _calibrated_adapter()
    plan = model.petl["plan"]
    expected = 32  # the class-token delta (dim 32)
    for unit, whole in zip(_units(model.backbone), plan.whole.tolist(), strict=True):
        out = unit.stop - unit.start
        if unit.matrix and whole:
            expected += 2 * out * 8 + 8 + out
        elif whole:
            expected += out
        elif unit.linear:
            expected += getattr(plan.sparse, unit.name).numel()
    assert petlbench.count_params(model).trainable_without_head == expected


# ----------------------------------------------------------------------------------------- heads
def test_head_init_torch_and_adaptformer() -> None:
    torch.manual_seed(3)
    reference = torch.nn.Linear(32, 5)  # PyTorch's default: what Convpass/FacT/RepAdapter train from
    head = torch.nn.Linear(32, 5)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    torch.manual_seed(3)
    init_head(head, "torch")
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    # AdaptFormer: the freshly built head, then trunc_normal_(weight, std=0.01): the bias keeps the default
    big = torch.nn.Linear(256, 64)
    init_head(big, "adaptformer")
    assert ks_normal(big.weight, 0.01) < 1.95 / math.sqrt(big.weight.numel())
    bound = 1 / math.sqrt(256)
    top = float(big.bias.detach().abs().max())
    assert 0.5 * bound < top <= bound
    for scheme in ("torch", "adaptformer"):
        assert TRAIN_HPARAMS["head_init"].coerce("x", "head_init", scheme) == scheme


def _features(model: petlbench.PETLModel, images: torch.Tensor) -> torch.Tensor:
    return model.net.forward_head(model.net.forward_features(images), pre_logits=True)


def test_head_batchnorm_is_maes_and_adaptformers(images: torch.Tensor) -> None:
    """BatchNorm1d(affine=False, eps=1e-6, momentum 0.1) between the pooled features and the head:
    batch statistics in train mode (running ones updated, variance unbiased), running ones in eval."""
    model = tiny("lora")
    before = petlbench.count_params(model)
    add_head_norm(model, "bn")
    after = petlbench.count_params(model)
    assert after.trainable == before.trainable and after.total == before.total  # no parameter
    assert after.trainable_bytes == before.trainable_bytes + 2 * 32 * 4 + 8  # running mean/var + batch counter
    w, b = model.backbone.head.weight, model.backbone.head.bias  # (calling the head would run the norm again)

    def head(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, b)

    with torch.no_grad():
        model.train()
        f = _features(model, images)
        mean, var = f.mean(0), f.var(0, unbiased=False)
        expected = head((f - mean) / torch.sqrt(var + 1e-6))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
        norm = model.head_norm
        torch.testing.assert_close(norm.running_mean, 0.1 * mean)  # one step of momentum 0.1 from 0
        torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * f.var(0, unbiased=True))
        model.eval()
        f = _features(model, images)
        expected = head((f - norm.running_mean) / torch.sqrt(norm.running_var + 1e-6))
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_head_batchnorm_merges_exactly_and_saves_its_statistics(images: torch.Tensor, tmp_path) -> None:
    model = tiny("lora")
    add_head_norm(model, "bn")
    randomise(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(images * torch.rand(()) + torch.rand(()))  # move the running statistics
    model.eval()
    merged = petlbench.merge(model)
    assert isinstance(merged.head, torch.nn.Linear)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(images), model(images), rtol=1e-5, atol=1e-5)
    path = petlbench.save_trainable(model, tmp_path / "task.safetensors")
    fresh = tiny("lora")
    add_head_norm(fresh, "bn")
    petlbench.load_trainable(fresh, path)
    for key, value in model.head_norm.state_dict().items():
        assert torch.equal(fresh.head_norm.state_dict()[key], value), key
    without = tiny("lora")
    with pytest.raises(PetlbenchError, match="head_norm") as err:
        petlbench.load_trainable(without, path)
    assert "\n" not in str(err.value)


def test_head_batchnorm_learns_while_probing_cached_features() -> None:
    """Linear probing trains the head on features extracted once; its BatchNorm must still use (and
    learn) batch statistics there, and running ones at evaluation."""
    from petlbench.data import DeviceLoader
    from petlbench.engine import train

    model = tiny("linear")
    add_head_norm(model, "bn")
    gen = torch.Generator().manual_seed(0)
    loader = DeviceLoader(torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8, generator=gen),
                          torch.randint(0, 5, (12,), generator=gen), batch_size=4, normalization="imagenet",
                          shuffle=True)
    cfg = {**defaults(), "epochs": 2, "warmup_epochs": 0, "batch_size": 4, "head_norm": "bn"}
    check_head_norm(cfg, 12)
    res = train(model, loader, {"test": loader}, cfg, torch.device("cpu"))
    assert int(model.head_norm.num_batches_tracked) == 6  # 3 batches x 2 epochs, in train mode
    assert res.curve and not model.training


@pytest.mark.parametrize("sets,images,match", [
    ({"batch_size": 1}, 10, "batch_size >= 2"),
    ({"batch_size": 3}, 10, "last batch of one"),
    ({"batch_size": 4, "compile": True}, 10, "padded"),
])
def test_head_batchnorm_refuses_what_it_cannot_do(sets: dict, images: int, match: str) -> None:
    cfg = {"head_norm": "bn", "drop_last": False, "compile": False, **sets}
    with pytest.raises(PetlbenchError, match=match) as err:
        check_head_norm(cfg, images)
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)
    check_head_norm({**cfg, "drop_last": True, "batch_size": max(2, sets["batch_size"])}, images)  # fine
    check_head_norm({**cfg, "head_norm": "none"}, images)


def test_packing_refuses_head_norm_and_different_backbones() -> None:
    from petlbench.packing import pack_problem

    cfg = defaults()
    loaders = [list(range(3))] * 2
    arch, kwargs = TINY_VIT
    a, b = (petlbench.create_model(arch, "lora", 5, backbone_kwargs=kwargs, reuse_backbone=True) for _ in range(2))
    assert pack_problem([a, b], [cfg, cfg], loaders, torch.device("cpu")) is None  # one shared frozen backbone
    c = petlbench.create_model(arch, "lora", 5, backbone_kwargs={**kwargs, "drop_path_rate": 0.1}, reuse_backbone=True)
    assert "built differently" in pack_problem([a, c], [cfg, cfg], loaders, torch.device("cpu"))
    add_head_norm(b, "bn")
    assert "head_norm" in pack_problem([a, b], [cfg, cfg], loaders, torch.device("cpu"))


# ------------------------------------------------------------------------------------- dropouts
def test_mlp_drop_rate_is_arcs_vit_drop(images: torch.Tensor) -> None:
    """ARC (Model/ARC_ViT.py, --vit_drop = mlp_drop_rate): dropout after GELU and after fc2 of every
    MLP, after the embeddings (pos_drop_rate), none after the attention projection."""
    model = tiny("linear", backbone_kwargs={"mlp_drop_rate": 0.3, "pos_drop_rate": 0.3})  # no hook in the MLP
    net = model.net
    assert net.pos_drop.p == 0.3 and net.head_drop.p == 0.0
    for blk in net.blocks:
        assert blk.mlp.drop1.p == blk.mlp.drop2.p == 0.3 and blk.attn.proj_drop.p == 0.0
    blk = net.blocks[0]
    x = torch.randn(2, 5, 32)
    blk.train()
    torch.manual_seed(1)
    out = blk.mlp(x)
    torch.manual_seed(1)
    expected = F.dropout(blk.mlp.fc2(F.dropout(F.gelu(blk.mlp.fc1(x)), 0.3)), 0.3)
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        assert torch.equal(blk.attn.train()(x), blk.attn.eval()(x))  # no dropout anywhere in attention
    assert TRAIN_HPARAMS["drop_rate"].help.startswith("dropout on the pooled features")


def test_dropout_settings_reach_the_backbone_and_its_cache_key() -> None:
    from petlbench.model import BackboneCache
    from petlbench.runner import _build
    from petlbench.runspec import RunSpec

    arch, kwargs = TINY_VIT
    cfg = {**defaults(), "pos_drop_rate": 0.1, "proj_drop_rate": 0.2, "head_init": "torch", "head_norm": "bn"}
    spec = RunSpec(suite="demo", task="x", method="lora", seed=0, protocol="vtab1k", backbone=arch,
                   method_hparams={}, train=cfg, backbone_kwargs=dict(kwargs))
    model = _build(spec, cfg, 5, torch.device("cpu"))
    assert model.net.pos_drop.p == 0.1 and model.net.blocks[1].attn.proj_drop.p == 0.2
    assert model.net.blocks[1].mlp.drop2.p == 0.2 and model.head_norm is not None
    assert model.backbone_kwargs["pos_drop_rate"] == 0.1  # part of the compiled-graph structure key
    cache = BackboneCache()
    nets = [cache.get(arch, arch, 5, None, {**kwargs, "mlp_drop_rate": p})[0] for p in (0.0, 0.4, 0.4)]
    assert cache.builds == 2 and nets[1].blocks[0].mlp.drop1.p == 0.4 and nets[0].blocks[0].mlp.drop1.p == 0.0
    swin, swin_kwargs = BACKBONES["swin"]
    with pytest.raises(PetlbenchError, match="pos_drop_rate") as err:
        petlbench.create_model(swin, "lora", 5, backbone_kwargs={**swin_kwargs, "pos_drop_rate": 0.1})
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("demo_cache")
def test_a_run_with_the_adaptformer_head_records_it(tmp_path) -> None:
    from petlbench.runner import execute_spec
    from petlbench.sweep import plan
    from tests.test_runner import FAST_SETS

    spec = plan("demo", ["lora"], ["digits"], [0], output=str(tmp_path),
                sets={**FAST_SETS, "head_norm": "bn", "head_init": "adaptformer", "drop_last": True,
                      "pos_drop_rate": 0.1, "mlp_drop_rate": 0.1}).specs[0]
    record = execute_spec(spec)
    assert record["status"] == "ok", record["error"]
    assert record["config"]["train"]["head_norm"] == "bn" and record["efficiency"]["evaluated_merged"]
    assert record["params"]["trainable_bytes"] > 4 * record["params"]["trainable"]  # the BN statistics too


@pytest.mark.parametrize("backbone,sets,match", [
    ("swin", {"pos_drop_rate": 0.1}, "training setting 'pos_drop_rate'"),  # Swin's constructor has no such argument
    ("vit", {"head_norm": "bn", "batch_size": 1}, "batch_size >= 2"),
    ("deit_distilled", {"head_norm": "bn"}, "2 \\(distilled DeiT\\)"),
])
def test_settings_that_change_the_build_are_refused_when_planned(demo_cache, tmp_path, backbone: str, sets: dict,
                                                                   match: str) -> None:
    """A drop rate the backbone's constructor does not take, or a head BatchNorm it cannot have, is one
    line when the sweep is planned, before any data is read, not a failed record per run."""
    from petlbench.sweep import plan

    arch, kwargs = BACKBONES[backbone]
    with pytest.raises(PetlbenchError, match=match) as err:
        plan("demo", ["lora"], ["digits"], [0], backbone=arch, backbone_kwargs=kwargs, pretrained="none",
             output=str(tmp_path), sets=sets, dry_run=True)
    assert "\n" not in str(err.value)
    ok = plan("demo", ["lora"], ["digits"], [0], backbone=arch, backbone_kwargs=kwargs, pretrained="none",
              output=str(tmp_path), sets={"drop_path_rate": 0.1}, dry_run=True)
    assert ok.specs[0].train["drop_path_rate"] == 0.1
