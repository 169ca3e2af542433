"""Paper recipes and the engine features they need (issue 16, core part).

Every engine item is compared with an independent, hand-written statement of the official rule
(timm's own ``CosineLRScheduler`` and parameter-group function serve as oracles where they are
our dependency): the learning rate of every iteration, the set of decayed tensors, the SGD
update, the mixed batch and its loss, the EMA. The protocol tests run a small plugin method with
its own recipe on the demo suite: resolution order, ``--dry-run``, records and reports.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from petlbench import HParam, Method, engine, register_method, unregister_method
from petlbench.cli import main
from petlbench.config import resolve_train
from petlbench.errors import PetlbenchError
from petlbench.model import create_model
from petlbench.packing import pack_problem, train_packed
from petlbench.runner import execute_spec, pack_key, seed_everything, selection_mode
from petlbench.sweep import describe, plan, recipe_notes
from tests.conftest import TINY_VIT
from tests.test_compile_once import ImageLoader, _cfg, fresh_dynamo  # noqa: F401 (a fixture)

CPU = torch.device("cpu")
FAST = {"epochs": 2, "warmup_epochs": 1, "limit_train": 32, "limit_eval": 32, "batch_size": 16}


# ------------------------------------------------------------------ schedule
def _vtab_cfg(**over):
    return engine.complete({"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-5, "warmup_epochs": 10, "epochs": 100,
                            "batch_size": 64, **over})


def _timm_oracle(cfg, steps: int, next_epoch: bool) -> list[float]:
    """timm's CosineLRScheduler driven as the official loops drive it: built before training, one
    ``step(ep)`` (RepAdapter/FacT/Convpass/NOAH) or ``step(ep + 1)`` (timm's train.py) after each
    epoch; the optimiser's lr read at every iteration."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=engine.peak_lr(cfg))
    sched = CosineLRScheduler(opt, t_initial=cfg["epochs"], lr_min=cfg["min_lr"], warmup_t=cfg["warmup_epochs"],
                              warmup_lr_init=cfg["warmup_lr"], t_in_epochs=True, cycle_limit=1)
    out = []
    for ep in range(engine.total_epochs(cfg)):
        out += [opt.param_groups[0]["lr"]] * steps
        sched.step(ep + 1 if next_epoch else ep)
    return out


def test_vtab_epoch_has_15_iterations_with_drop_last() -> None:
    x, y = torch.zeros(1000, 1), torch.zeros(1000, dtype=torch.long)
    assert len(engine.FeatureLoader(x, y, 64, True, 0, drop_last=True)) == 15
    assert len(engine.FeatureLoader(x, y, 64, True, 0, drop_last=False)) == 16


@pytest.mark.parametrize("schedule, next_epoch", [("timm_epoch", False), ("timm_train", True)])
def test_timm_epoch_schedule_equals_timm_at_every_iteration(schedule: str, next_epoch: bool) -> None:
    cfg = _vtab_cfg(schedule=schedule)
    ours = engine.lr_schedule(cfg, 15)
    oracle = _timm_oracle(cfg, 15, next_epoch)
    assert len(ours) == len(oracle) == 1500
    for i, (a, b) in enumerate(zip(ours, oracle, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=0), f"iteration {i}"


def test_timm_epoch_schedule_by_hand() -> None:
    """The official RepAdapter/FacT loop: lr = warm-up start for epochs 0 AND 1, linear steps of
    (lr - warmup_lr) / 10 that stop one short of lr, then the cosine of t / 100 from t = 10 on."""
    lrs = engine.lr_schedule(_vtab_cfg(schedule="timm_epoch"), 15)
    at = {e: lrs[15 * e] for e in range(100)}
    assert all(lrs[15 * e + i] == at[e] for e in range(100) for i in range(15))  # constant within an epoch
    assert at[0] == at[1] == 1e-6
    assert at[2] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 10, rel=1e-12)
    assert at[10] == pytest.approx(1e-6 + 9 * (1e-3 - 1e-6) / 10, rel=1e-12)  # the warm-up never reaches 1e-3
    assert at[11] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 10 / 100)), rel=1e-12)
    assert at[11] / 1e-3 == pytest.approx(0.9758, abs=1e-4)  # "the cosine starts at 0.976 x lr"
    assert at[99] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 98 / 100)), rel=1e-12)
    # The finding: our per-iteration schedule (16 iterations, no drop_last) gives +18 % total lr.
    per_iter = sum(engine.lr_schedule(_vtab_cfg(), 16))
    assert per_iter / sum(lrs) == pytest.approx(1.18, abs=0.005)


def test_epoch_schedule_is_the_curve_held_per_epoch() -> None:
    """VPT's WarmupCosineSchedule, a LambdaLR stepped after every epoch: epoch e trains at
    lr * e / W during the warm-up (0 in epoch 0), then lr * (1 + cos(pi (e - W) / (E - W))) / 2."""
    lrs = engine.lr_schedule(_vtab_cfg(schedule="epoch", lr=0.5, warmup_lr=0.0, min_lr=0.0), 4)
    at = {e: lrs[4 * e] for e in range(100)}
    assert all(lrs[4 * e + i] == at[e] for e in range(100) for i in range(4))
    assert at[0] == 0.0 and at[5] == pytest.approx(0.25) and at[10] == pytest.approx(0.5)
    assert at[55] == pytest.approx(0.25)
    assert at[99] == pytest.approx(0.25 * (1 + math.cos(math.pi * 89 / 90)))


def test_cooldown_trains_extra_epochs_at_min_lr() -> None:
    """GPS: 100 epochs of cosine + 10 cooldown epochs = 110 (timm's train.py loop)."""
    cfg = _vtab_cfg(schedule="timm_train", cooldown_epochs=10)
    lrs = engine.lr_schedule(cfg, 3)
    assert len(lrs) == 110 * 3 and engine.total_epochs(cfg) == 110
    assert lrs == pytest.approx(_timm_oracle(cfg, 3, next_epoch=True), rel=1e-12)
    assert set(lrs[100 * 3:]) == {1e-5}
    per_iter = engine.lr_schedule(_vtab_cfg(cooldown_epochs=2), 4)
    assert len(per_iter) == 102 * 4 and set(per_iter[400:]) == {1e-5}
    assert per_iter[:400] == engine.lr_schedule(_vtab_cfg(), 4)  # the cosine itself is unchanged


def test_lr_base_batch_scales_the_peak_lr_only() -> None:
    cfg = _vtab_cfg(lr=0.1, lr_base_batch=256, batch_size=64, warmup_epochs=0)
    assert engine.peak_lr(cfg) == pytest.approx(0.025)
    assert engine.lr_schedule(cfg, 2)[0] == pytest.approx(0.025)
    assert engine.lr_schedule(cfg, 2)[-1] == pytest.approx(1e-5 + 0.5 * (0.025 - 1e-5) * (1 + math.cos(
        math.pi * 199 / 200)))
    assert engine.effective_settings(cfg)["lr"] == pytest.approx(0.025)


# ------------------------------------------------------------------ optimiser and parameter groups
def _full_depth1():
    arch, kw = TINY_VIT
    return create_model(arch, "full", 3, backbone_kwargs={**kw, "depth": 1})


def _exempt(model, rule: str) -> set[str]:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = engine.decay_groups(model, params, {"decay_groups": rule, "weight_decay": 0.1})
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(params)
    return {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}


def test_no_1d_is_timms_rule() -> None:
    """Full fine-tuning of a one-block ViT: every bias, every LayerNorm weight, the class token and
    the position embedding are exempt; the five matrices (patch embedding, qkv, proj, fc1, fc2) and
    the head weight decay."""
    from timm.optim import param_groups_weight_decay

    model = _full_depth1()
    block = "net.blocks.0."
    expected = {"net.cls_token", "net.pos_embed", "net.patch_embed.proj.bias", "net.norm.weight", "net.norm.bias",
                "net.head.bias"} | {block + n for n in ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias",
                                                        "norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias")}
    assert _exempt(model, "no_1d") == expected
    assert _exempt(model, "all") == set()
    timm_groups = param_groups_weight_decay(model.net, 0.1, no_weight_decay_list=model.net.no_weight_decay())
    names = {id(p): "net." + n for n, p in model.net.named_parameters()}
    assert {names[id(p)] for g in timm_groups if g["weight_decay"] == 0.0 for p in g["params"]} == expected


class _ExemptHeadBias(Method):
    """A test method: trains the head and a per-channel scale, exempts the head bias (DTL's rule)."""

    name = "exempt_head_bias"

    def apply(self, backbone, petl):
        petl["scale"] = nn.Linear(1, backbone.blocks[0].dim, bias=False)  # a 2-D tensor, to tell the rules apart

    def no_weight_decay(self, backbone, petl):
        yield backbone.head.bias


@pytest.fixture
def exempt_method():
    register_method(_ExemptHeadBias)
    yield _ExemptHeadBias
    unregister_method(_ExemptHeadBias.name)


def test_method_decay_groups(exempt_method) -> None:
    arch, kw = TINY_VIT
    model = create_model(arch, exempt_method.name, 3, backbone_kwargs=kw)
    assert _exempt(model, "method") == {"net.head.bias"}
    assert _exempt(model, "no_1d") == {"net.head.bias"}  # the head bias is also 1-D; the 2-D scale decays
    assert _exempt(model, "no_1d+method") == {"net.head.bias"}
    assert "petl.scale.weight" not in _exempt(model, "no_1d+method")


def test_adamw_groups_decay_exactly_the_decayed_tensors() -> None:
    """With zero gradients AdamW moves nothing but its decoupled decay: p <- p (1 - lr wd)."""
    model = _full_depth1()
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = engine.build_optimizer(model, params, engine.complete({"lr": 0.1, "weight_decay": 0.5, "batch_size": 8,
                                                                 "decay_groups": "no_1d"}))
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    exempt = _exempt(model, "no_1d")
    for n, p in model.named_parameters():
        factor = 1.0 if n in exempt else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[n] * factor)


def test_sgd_with_momentum_and_l2_by_hand() -> None:
    """torch.optim.SGD as VPT/AdaptFormer use it: buf = g + wd p (first step), then buf = m buf + g + wd p;
    p <- p - lr buf. The lr is the base lr scaled by batch / lr_base_batch."""
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    model = nn.Module()
    model.w = w
    cfg = engine.complete({"optimizer": "sgd", "momentum": 0.9, "lr": 0.4, "lr_base_batch": 256, "batch_size": 64,
                           "weight_decay": 0.01})
    opt = engine.build_optimizer(model, [w], cfg)
    assert isinstance(opt, torch.optim.SGD)
    lr, g = 0.4 * 64 / 256, torch.tensor([0.5, 0.25])
    w.grad = g.clone()
    opt.step()
    buf = g + 0.01 * torch.tensor([1.0, -2.0])
    p1 = torch.tensor([1.0, -2.0]) - lr * buf
    torch.testing.assert_close(w.detach(), p1)
    w.grad = g.clone()
    opt.step()
    buf = 0.9 * buf + g + 0.01 * p1
    torch.testing.assert_close(w.detach(), p1 - lr * buf)


# ------------------------------------------------------------------ mixup / cutmix
def _batch(b=6, h=8, w=8):
    return torch.arange(b * 3 * h * w, dtype=torch.float32).reshape(b, 3, h, w), torch.arange(b) % 4


def test_mixup_is_a_convex_mix_with_the_flipped_batch() -> None:
    x, y = _batch()
    cfg = engine.complete({"mixup": 0.8})
    out, y2, lam = engine.mix_batch(x, y, cfg, seed=3, epoch=1, step=2)
    assert 0.0 < lam < 1.0 and torch.equal(y2, y.flip(0))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    # lambda ~ Beta(0.8, 0.8) drawn from the generator seeded by (seed, epoch, step), nothing else
    rng = np.random.default_rng([3, 1, 2])
    rng.random()  # the mixup_prob draw
    assert lam == rng.beta(0.8, 0.8)


def test_cutmix_pastes_one_box_from_the_flipped_batch() -> None:
    """timm's rand_bbox + lambda correction: a square of side int(S sqrt(1 - lam0)) centred at a
    uniform pixel, clipped at the borders; lam becomes the uncovered fraction of the image."""
    x, y = _batch(h=16, w=16)
    cfg = engine.complete({"cutmix": 1.0})
    for step in range(20):
        out, y2, lam = engine.mix_batch(x, y, cfg, seed=0, epoch=0, step=step)
        rng = np.random.default_rng([0, 0, step])
        rng.random()
        lam0 = rng.beta(1.0, 1.0)
        side = int(16 * math.sqrt(1 - lam0))
        cy, cx = rng.integers(0, 16), rng.integers(0, 16)
        top, bottom = np.clip([cy - side // 2, cy + (side + 1) // 2], 0, 16)
        left, right = np.clip([cx - side // 2, cx + (side + 1) // 2], 0, 16)
        box = torch.zeros(16, 16, dtype=torch.bool)
        box[top:bottom, left:right] = True
        assert torch.equal(out[..., box], x.flip(0)[..., box]) and torch.equal(out[..., ~box], x[..., ~box])
        assert lam == pytest.approx(1 - box.sum().item() / 256) and torch.equal(y2, y.flip(0))


def test_mixing_probabilities_and_determinism() -> None:
    x, y = _batch(b=4, h=16, w=16)
    cfg = engine.complete({"mixup": 0.8, "cutmix": 1.0, "mixup_prob": 0.5, "mixup_switch_prob": 0.25})
    kinds = []
    for step in range(2000):
        out, _y2, lam = engine.mix_batch(x, y, cfg, seed=1, epoch=0, step=step)
        if out is x:  # not mixed (a cutmix box can be empty too, with lam = 1: that batch was drawn)
            kinds.append("none")
            assert lam == 1.0
        elif torch.allclose(out, lam * x + (1 - lam) * x.flip(0)) and not torch.equal(out, x):
            kinds.append("mixup")
        else:
            kinds.append("cutmix")
    mixed = len(kinds) - kinds.count("none")
    assert abs(mixed / len(kinds) - 0.5) < 0.05
    assert abs(kinds.count("cutmix") / mixed - 0.25) < 0.05
    torch.manual_seed(123)  # torch's global generator plays no part: same (seed, epoch, step), same batch
    again = engine.mix_batch(x, y, cfg, seed=1, epoch=0, step=7)
    first = engine.mix_batch(x, y, cfg, seed=1, epoch=0, step=7)
    assert again[2] == first[2] and torch.equal(again[0], first[0])


def test_mixed_loss_is_soft_target_cross_entropy_of_the_smoothed_mix() -> None:
    """Target = lam * smooth(y) + (1 - lam) * smooth(y.flip(0)), smooth(y) = (1 - s) onehot + s / C;
    loss = mean over images of -sum(target * log_softmax(logits))."""
    from timm.data.mixup import mixup_target

    torch.manual_seed(0)
    head = nn.Linear(5, 7)
    x, y = torch.randn(6, 5), torch.randint(0, 7, (6,))
    lam, s = 0.3, 0.1
    y2 = y.flip(0)
    with torch.no_grad():
        logits = head(x)
    target = lam * ((1 - s) * F.one_hot(y, 7) + s / 7) + (1 - lam) * ((1 - s) * F.one_hot(y2, 7) + s / 7)
    torch.testing.assert_close(target.float(), mixup_target(y, 7, lam, s))  # timm's own target
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    opt = torch.optim.SGD(head.parameters(), lr=0.0)
    loss = engine.train_step(head, opt, list(head.parameters()), x, y, CPU, "fp32", label_smoothing=s,
                             mixed=(y2, lam))
    torch.testing.assert_close(loss, expected)
    padded = engine.train_step(head, opt, list(head.parameters()), torch.cat([x, torch.zeros(2, 5)]),
                               engine.pad_labels(y, 8), CPU, "fp32", label_smoothing=s,
                               mixed=(engine.pad_labels(y2, 8), lam))
    torch.testing.assert_close(padded, expected)  # padded rows (compiled step) count for nothing


def _tiny(method="lora", classes=4, seed=0, **hp):
    arch, kw = TINY_VIT
    seed_everything(seed)
    return create_model(arch, method, classes, backbone_kwargs=kw, reuse_backbone=True, **hp)


@pytest.mark.usefixtures("fresh_dynamo")  # tests/test_compile_once.py: eager backend, clean dynamo state
def test_mixup_on_the_compiled_padded_step_equals_eager() -> None:
    x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 4, (10,))  # batch 4: the last batch (2) is padded
    losses = []
    for compile_ in (False, True):
        model = _tiny()
        res = engine.train(model, ImageLoader(x, y, 4, True, 0, False), {}, _cfg(
            compile=compile_, epochs=2, mixup=0.8, cutmix=1.0, label_smoothing=0.1), CPU, seed=5)
        losses.append(res.train_loss)
        assert res.compiled is compile_
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


class _FixedImages(ImageLoader):
    random_crop = flip = False  # what a linear probe may cache features of


def test_linear_probe_with_mixup_trains_on_images() -> None:
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    plain = engine.train(_tiny("linear"), _FixedImages(x, y, 4, True, 0, False), {}, _cfg(compile=False), CPU)
    mixed = engine.train(_tiny("linear"), _FixedImages(x, y, 4, True, 0, False), {}, _cfg(compile=False, mixup=0.8),
                         CPU)
    assert plain.probe_on_features is True and mixed.probe_on_features is False


# ------------------------------------------------------------------ EMA
def test_ema_is_what_is_evaluated_merged_and_kept(monkeypatch) -> None:
    """ema_k = d ema_{k-1} + (1 - d) w_k after every step k (ema_0 = the initial weights); each
    evaluation (merged: LoRA merges) sees the EMA weights; the run ends with them in the model."""
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    model = _tiny(dropout=0.0)
    names = model.trainable_names()
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    per_epoch, evaluated = [], []
    real_step, real_deployable = engine.train_step, engine.deployable

    def step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        for n, p in model.named_parameters():
            if p.requires_grad:
                ema[n] = 0.5 * ema[n] + 0.5 * p.detach()
        return loss

    def deployable(m):
        evaluated.append({n: p.detach().clone() for n, p in m.named_parameters() if n in names})
        per_epoch.append({n: v.clone() for n, v in ema.items()})
        return real_deployable(m)

    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(engine, "deployable", deployable)
    res = engine.train(model, ImageLoader(x, y, 4, True, 0, False), {"test": ImageLoader(x, y, 8, False, 0, False)},
                       _cfg(compile=False, epochs=2, ema_decay=0.5), CPU, eval_every=1, select_on="test")
    assert len(evaluated) == 2 and res.evaluated_merged
    for seen, expected in zip(evaluated, per_epoch, strict=True):
        for n in names:
            torch.testing.assert_close(seen[n], expected[n])
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), ema[n])  # the EMA model is the run's model
    torch.testing.assert_close(res.best_state[names[0]], evaluated[res.best_epoch - 1][names[0]])
    assert engine.effective_settings(_cfg(ema_decay=0.5))["evaluated"] == "ema"


# ------------------------------------------------------------------ packing
def test_packing_honours_optimizer_groups_and_schedule() -> None:
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 4, (12,))
    cfgs = [_cfg(compile=False, epochs=2, optimizer="sgd", lr=lr, lr_base_batch=8, decay_groups="no_1d",
                 schedule="timm_epoch", warmup_epochs=1, warmup_lr=1e-3, weight_decay=0.1) for lr in (0.5, 0.2)]
    alone, states = [], []
    for seed, cfg in zip((0, 1), cfgs, strict=True):
        model = _tiny(seed=seed)
        alone.append(engine.train(model, ImageLoader(x, y, 4, True, seed, False), {}, cfg, CPU))
        states.append(model.trainable_state_dict())
    models = [_tiny(seed=s) for s in (0, 1)]
    packed = train_packed(models, [ImageLoader(x, y, 4, True, s, False) for s in (0, 1)], [{}, {}], cfgs, CPU)
    for a, p, state, model in zip(alone, packed, states, models, strict=True):
        torch.testing.assert_close(torch.tensor(p.train_loss), torch.tensor(a.train_loss), rtol=1e-5, atol=1e-6)
        for k, v in model.trainable_state_dict().items():
            torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5)


def test_mixed_or_averaged_runs_never_pack(tmp_path) -> None:
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    loaders = [ImageLoader(x, y, 4, True, s, False) for s in (0, 1)]
    for key, value in (("mixup", 0.8), ("cutmix", 1.0), ("ema_decay", 0.99)):
        problem = pack_problem([_tiny(), _tiny(seed=1)], [_cfg(compile=False, **{key: value})] * 2, loaders, CPU)
        assert problem and key in problem
        specs = plan("demo", ["lora"], ["digits"], [0, 1], pretrained="none", output=str(tmp_path),
                     sets={**FAST, key: value}).specs
        assert {pack_key(s) for s in specs} == {None}


# ------------------------------------------------------------------ protocols and recipes
class _Recipe(Method):
    """A plugin with its own paper recipe for the demo suite (and none for FGVC)."""

    name = "recipe_probe"
    hparams = {"k": HParam(1, "an unused knob", low=1)}
    recipes = {"demo": {"*": {"optimizer": "sgd", "lr": 0.05, "schedule": "timm_epoch", "decay_groups": "method",
                              "selection": "best-test", "eval_every": 1, "published_runs": 3, "label_smoothing": 0.0},
                        "digits": {"lr": 0.02}}}
    recipe_source = {"demo": "example/recipe-probe: train.py (SGD, timm CosineLRScheduler stepped per epoch)"}
    recipe_differences = {"demo": "none: the demo suite has no official script"}

    def trainable(self, backbone, petl):
        return backbone.head_parameters()

    def no_weight_decay(self, backbone, petl):
        yield backbone.head.bias


@pytest.fixture
def recipe_method(demo_cache):
    register_method(_Recipe)
    yield _Recipe
    unregister_method(_Recipe.name)


def test_resolution_order(recipe_method) -> None:
    suite = {"lr": 0.005, "epochs": 10, "batch_size": 32}
    paper = resolve_train(suite, recipe_method, "demo", "digits", {}, protocol="paper")
    assert paper["optimizer"] == "sgd" and paper["epochs"] == 10 and paper["lr"] == 0.02  # task < "*" < suite
    assert resolve_train(suite, recipe_method, "demo", "faces", {}, protocol="paper")["lr"] == 0.05
    assert resolve_train(suite, recipe_method, "demo", "digits", {"lr": 0.3}, protocol="paper")["lr"] == 0.3
    assert "published_runs" not in paper  # a fact about the published number, not a training setting
    for harmonised in ("vtab1k", "fgvc", "tune", "legacy-best-test"):  # one recipe for every method
        cfg = resolve_train(suite, recipe_method, "demo", "digits", {}, protocol=harmonised)
        assert cfg["optimizer"] == "adamw" and cfg["lr"] == 0.005 and cfg["selection"] == "protocol"


def test_selection_modes() -> None:
    table = {("vtab1k", "best-test"): "final", ("fgvc", "protocol"): "val", ("tune", "protocol"): "tune",
             ("legacy-best-test", "protocol"): "best-test", ("paper", "protocol"): "final",
             ("paper", "best-test"): "final", ("paper", "val"): "val", ("paper", "tune"): "tune",
             ("paper-best-test", "best-test"): "best-test", ("paper-best-test", "final"): "final"}
    for (protocol, selection), mode in table.items():
        assert selection_mode(protocol, {"selection": selection}, "vtab1k") == mode, (protocol, selection)
    assert selection_mode("paper", {"selection": "protocol"}, "fgvc_json") == "val"


def test_selection_outside_the_paper_protocols_is_one_line(recipe_method) -> None:
    with pytest.raises(PetlbenchError, match="'selection' is read by the paper protocols only") as err:
        resolve_train({}, recipe_method, "demo", "digits", {"selection": "val"}, protocol="vtab1k")
    assert "\n" not in str(err.value) and "Fix: --protocol paper" in str(err.value)


def test_test_selected_protocols_evaluate_at_the_official_cadence(recipe_method) -> None:
    """A suite's eval_every is a learning-curve cadence: best-of-N on test uses every epoch (legacy,
    as ARC's script) or the recipe's cadence; the user's --set still wins."""
    suite = {"eval_every": 10}
    assert resolve_train(suite, recipe_method, "demo", "digits", {}, protocol="vtab1k")["eval_every"] == 10
    assert resolve_train(suite, recipe_method, "demo", "digits", {}, protocol="legacy-best-test")["eval_every"] == 0
    assert resolve_train(suite, recipe_method, "demo", "digits", {"eval_every": 5},
                         protocol="legacy-best-test")["eval_every"] == 5
    assert resolve_train(suite, recipe_method, "demo", "digits", {}, protocol="paper-best-test")["eval_every"] == 1


def test_recipe_for_an_unknown_task_is_one_line(demo_cache, tmp_path) -> None:
    class Typo(Method):
        name = "recipe_typo"
        recipes = {"demo": {"digitz": {"lr": 0.1}}}

    register_method(Typo)
    try:
        with pytest.raises(PetlbenchError, match="names 'digitz', not a task of suite 'demo'") as err:
            plan("demo", ["recipe_typo"], ["digits"], [0], pretrained="none", output=str(tmp_path), protocol="paper")
        assert "\n" not in str(err.value)
        plan("demo", ["recipe_typo"], ["digits"], [0], pretrained="none", output=str(tmp_path))  # harmonised: unread
    finally:
        unregister_method("recipe_typo")


def test_dry_run_lists_the_recipe_its_source_and_what_it_changes(recipe_method, tmp_path) -> None:
    result = CliRunner().invoke(main, ["run", "-s", "demo", "-m", "recipe_probe,lora", "-t", "digits", "--protocol",
                                       "paper", "--pretrained", "none", "--set", "epochs=2", "--output",
                                       str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "recipe recipe_probe on demo: paper; source: example/recipe-probe: train.py" in out
    assert "recipe recipe_probe on demo: differences: none: the demo suite has no official script" in out
    assert "selects the best TEST epoch; --protocol paper reports the final epoch instead" in out
    assert "mean of 3 runs; this sweep requests 1 seed per task. Fix: e.g. --seeds 0,1,2" in out
    assert "recipe lora on demo: the method declares no paper recipe for demo; these runs use the harmonised" in out
    line = next(x for x in out.splitlines() if "optimizer=sgd" in x)
    for tagged in ("epochs=2 [set]", "batch_size=32 [suite]", "lr=0.02 [recipe]", "optimizer=sgd [recipe]",
                   "schedule=timm_epoch [recipe]", "selection=best-test [recipe]", "selects: final epoch",
                   "label_smoothing=0.0 [recipe]"):  # stated by the recipe: listed even at the engine default
        assert tagged in line, (tagged, line)


def test_dry_run_without_data_and_without_a_recipe_for_the_suite(recipe_method, tmp_path) -> None:
    """FGVC's data is not on this machine: --dry-run still lists the runs (and says what it skipped)."""
    result = CliRunner().invoke(main, ["run", "-s", "fgvc", "-m", "recipe_probe", "-t", "cub", "--protocol",
                                       "paper", "--pretrained", "none", "--backbone", "vit_tiny_patch16_224",
                                       "--backbone-arg", "depth=1", "--backbone-arg", "embed_dim=32",
                                       "--backbone-arg", "num_heads=2", "--data-root", str(tmp_path / "nowhere"),
                                       "--output", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "recipe recipe_probe on fgvc: the method declares no paper recipe for fgvc" in result.stdout
    assert "selects: best validation epoch" in result.stdout
    assert "--dry-run lists the runs without checking their data" in result.stderr


def test_paper_runs_use_and_record_the_recipe(recipe_method, tmp_path) -> None:
    sets = {**FAST, "epochs": 2, "warmup_epochs": 1}
    records = {}
    for protocol in ("paper", "paper-best-test", "vtab1k"):
        (spec,) = plan("demo", ["recipe_probe"], ["digits"], [0], pretrained="none", output=str(tmp_path),
                       protocol=protocol, sets=sets).specs
        records[protocol] = rec = execute_spec(spec, device="cpu")
        assert rec["status"] == "ok", rec.get("error")
    paper, best, harmonised = records["paper"], records["paper-best-test"], records["vtab1k"]
    assert paper["config"]["recipe"] == {
        "name": "paper", "source": _Recipe.recipe_source["demo"], "differences": _Recipe.recipe_differences["demo"],
        "declared_as": "recipes", "published_runs": 3}
    assert paper["config"]["train"]["optimizer"] == "sgd" and paper["config"]["train"]["lr"] == 0.02
    assert paper["config"]["effective"]["lr"] == 0.02 and paper["config"]["effective"]["epochs_trained"] == 2
    assert paper["metrics"]["selection"] == "final" and paper["metrics"]["top1"] == paper["metrics"]["top1_final"]
    tests = [c["top1"] for c in best["metrics"]["curve"] if c["split"] == "test"]
    assert len(tests) == 2 and best["metrics"]["top1"] == max(tests) and best["metrics"]["selected_on"] == "test"
    assert "TEST set" in best["protocol_description"]
    assert harmonised["config"]["recipe"]["name"] == "harmonised"
    assert harmonised["config"]["train"]["optimizer"] == "adamw" and harmonised["config"]["train"]["lr"] == 0.005
    assert len({r["run_id"] for r in records.values()}) == 3  # different recipes are never the same run


def test_no_recipe_under_paper_is_a_harmonised_run_with_another_identity(demo_cache, tmp_path) -> None:
    specs = {p: plan("demo", ["lora"], ["digits"], [0], pretrained="none", output=str(tmp_path), protocol=p,
                     sets=FAST).specs[0] for p in ("vtab1k", "paper")}
    assert specs["vtab1k"].train == specs["paper"].train  # same settings: lora declares no demo recipe
    assert specs["vtab1k"].run_id != specs["paper"].run_id  # ... but the protocol is part of the identity
    assert describe(plan("demo", ["lora"], ["digits"], [0], pretrained="none", output=str(tmp_path),
                         protocol="paper", sets=FAST), specs["paper"]).endswith("selects: final epoch")


def test_paper_val_selection_never_trains_on_val(recipe_method, tmp_path) -> None:
    (spec,) = plan("demo", ["recipe_probe"], ["faces"], [0], pretrained="none", output=str(tmp_path),
                   protocol="paper", sets={**FAST, "selection": "val"}).specs
    rec = execute_spec(spec, device="cpu")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["config"]["splits"]["train"] == "train800" and rec["config"]["splits"]["eval"] == ["val"]
    assert rec["metrics"]["selected_on"] == "val" and rec["metrics"]["selection"] == "val"


def test_fewer_seeds_than_published_runs_is_said(recipe_method, tmp_path) -> None:
    three = plan("demo", ["recipe_probe"], ["digits"], [0, 1, 2], pretrained="none", output=str(tmp_path),
                 protocol="paper", sets=FAST)
    assert not any("mean of 3 runs" in n for n in recipe_notes(three))
    harmonised = plan("demo", ["recipe_probe"], ["digits"], [0], pretrained="none", output=str(tmp_path), sets=FAST)
    assert recipe_notes(harmonised) == ["recipe recipe_probe on demo: harmonised (protocol vtab1k: one recipe for "
                                        "every method); its paper recipe applies under --protocol paper / "
                                        "paper-best-test only"]


def test_report_rows_never_mix_protocols_and_label_test_selection() -> None:
    from petlbench.report.aggregate import build_report
    from petlbench.report.table import DAGGER
    from tests.report.factory import make_record

    recs = [make_record("arc", "cifar", 0, 70.0, protocol=p) for p in ("vtab1k", "paper", "paper-best-test",
                                                                       "legacy-best-test")]
    report = build_report(recs, on_warning=lambda _w: None)
    rows = {r.protocol: r for r in report.rows}
    assert set(rows) == {"vtab1k", "paper", "paper-best-test", "legacy-best-test"}  # four rows, never one
    assert rows["paper-best-test"].legacy and rows["legacy-best-test"].legacy
    assert not rows["paper"].legacy and not rows["vtab1k"].legacy
    assert rows["paper-best-test"].label.endswith(DAGGER) and rows["legacy-best-test"].label.endswith(DAGGER)
    assert len({r.label for r in report.rows}) == 4
    notes = " ".join(n.text for n in report.notes)
    assert "Protocol paper-best-test" in notes and "selected on the TEST set" in notes
