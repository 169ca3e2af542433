"""Parameter counts on the real architectures (built on the meta device: shapes only, instant).

Expected values are the formula counts in shared/reference/methods.md §1.5, §2.4 and §6.
"""

from __future__ import annotations

import pytest
import torch

import petlbench

VIT_B = "vit_base_patch16_224"


def counts(method: str, backbone: str = VIT_B, num_classes: int = 100, **hp) -> petlbench.ParamCounts:
    model = petlbench.create_model(backbone, method, num_classes, device="meta", **hp)
    return petlbench.count_params(model)


@pytest.mark.parametrize(
    "method,hp,expected",
    [
        ("arc", {}, 96_432),
        ("arc_att", {}, 48_216),
        ("repadapter", {}, 239_808),
        ("repadapter", {"variant": "repattn"}, 119_904),
        ("adapter", {}, 156_768),
        ("lora", {}, 294_912),
        ("bitfit", {}, 102_912),
        ("ssf", {}, 205_824),
        ("linear", {}, 0),
        ("vpt_shallow", {"num_tokens": 50}, 50 * 768),
        ("vpt_deep", {"num_tokens": 50}, 12 * 50 * 768),
    ],
)
def test_vit_b16_counts_without_head(method: str, hp: dict, expected: int) -> None:
    c = counts(method, **hp)
    assert c.trainable_without_head == expected
    assert c.head == 768 * 100 + 100
    assert c.backbone == 85_798_656
    assert c.extra_after_merge == (0 if petlbench.get_method(method).mergeable else expected)


@pytest.mark.parametrize("task,classes,arc_with_head", [("cifar", 100, 173_332), ("kitti", 4, 99_508),
                                                        ("sun397", 397, 401_725)])
def test_arc_per_task_totals(task: str, classes: int, arc_with_head: int) -> None:
    assert counts("arc", num_classes=classes).trainable == arc_with_head


def test_full_finetuning_counts_everything() -> None:
    c = counts("full")
    assert c.trainable == c.total == 85_798_656 + 76_900


def test_vit_l16_arc() -> None:
    assert counts("arc", "vit_large_patch16_224").trainable_without_head == 153_952
    assert counts("arc_att", "vit_large_patch16_224").trainable_without_head == 76_976


def test_swin_b_arc_shares_one_projection_per_stage() -> None:
    assert counts("arc", "swin_base_patch4_window7_224").trainable_without_head == 218_464


def test_repadapter_scale_presets_follow_the_variant() -> None:
    cls = petlbench.get_method("repadapter")
    assert cls.resolve(suite="vtab", task="caltech101")["scale"] == 5.0
    assert cls.resolve({"variant": "repattn"}, suite="vtab", task="caltech101")["scale"] == 10.0
    assert cls.resolve({"scale": 0.5}, suite="vtab", task="caltech101")["scale"] == 0.5  # the user wins
    assert cls.resolve()["scale"] == 1.0


def test_arc_fgvc_preset() -> None:
    assert petlbench.get_method("arc").resolve(suite="fgvc", task="StanfordCars")["dropout"] == 0.0


# ------------------------------------------------------------------ second wave (issue 12)
def test_ssf_on_swin_b_matches_the_official_code() -> None:
    """dongzelian/SSF also scales/shifts before the patch-embedding norm and after every patch-merging norm."""
    assert counts("ssf", "swin_base_patch4_window7_224").trainable_without_head == 274_432


@pytest.mark.parametrize("hp", [{"targets": "qv"}, {"targets": "qkv"}, {"targets": "qkv", "alpha": 8.0, "dropout": 0.1}])
def test_both_loras_count_294912(hp: dict) -> None:
    """LoRA paper (q, v pairs) and NOAH's baseline (one pair on fused qkv): same count, another function."""
    assert counts("lora", **hp).trainable_without_head == 294_912


def test_lora_vtab_preset_is_the_noah_baseline() -> None:
    cls = petlbench.get_method("lora")
    assert cls.resolve(suite="vtab", task="cifar") == {"rank": 8, "alpha": 8.0, "dropout": 0.1, "targets": "qkv",
                                                       "init": "noah"}
    assert cls.resolve({"rank": 4}, suite="vtab")["alpha"] == 4.0  # scale 1 whatever the rank
    assert cls.resolve()["targets"] == "qv"  # without a suite: the LoRA paper


@pytest.mark.parametrize("variant", ["noah", "vpt", "zero_up"])
def test_adapter_variants_count_156768(variant: str) -> None:
    assert counts("adapter", variant=variant).trainable_without_head == 156_768


def test_adapter_presets_follow_the_published_rows_code() -> None:
    cls = petlbench.get_method("adapter")
    assert cls.resolve(suite="vtab")["variant"] == "noah" and cls.resolve(suite="vtab")["dropout"] == 0.1
    assert cls.resolve(suite="fgvc")["variant"] == "vpt" and cls.resolve(suite="fgvc")["dropout"] == 0.0


def test_vpt_deep_fgvc_presets_reproduce_the_published_085m() -> None:
    """VPT-Deep FGVC 0.85 M (V-PETL table, head included, averaged over the 5 tasks) from the per-task lengths."""
    from petlbench.data import get_suite

    suite = get_suite("fgvc")
    totals = [counts("vpt_deep", num_classes=t.classes, suite="fgvc", task=t.name).trainable for t in suite.tasks]
    assert round(sum(totals) / len(totals) / 1e6, 2) == 0.85
    assert counts("vpt_deep", suite="vtab", task="sun397").trainable_without_head == 12 * 5 * 768
    assert petlbench.get_method("vpt_shallow").resolve(suite="vtab")["dropout"] == 0.0


def test_spt_count_before_and_after_calibration() -> None:
    """Before calibration only the class-token delta trains; after it, about the budget."""
    from tests.test_methods import build

    assert counts("spt_lora").trainable_without_head == 768
    for method in ("spt_lora", "spt_adapter"):
        model = build(method, "vit", budget=0.003)
        got = petlbench.count_params(model).trainable_without_head
        assert 0.5 * 3000 <= got <= 1.5 * 3000, got
        assert got == sum(p.numel() for p in model.petl.parameters() if p.requires_grad)


def test_spt_decision_rule_is_the_official_one() -> None:
    """A matrix with >= cost/alpha sensitive entries gets a structured module; fewer: exactly those
    entries train; a vector with >= size/beta sensitive entries is tuned whole (ziplab/SPT engine.py)."""
    from petlbench_methods.spt import _units

    from tests.test_methods import build

    # one sweep step of 1050 entries: the 1041 marked below and 9 ties (b0_k's first, earlier entries first);
    # its total 512 + 9 + 7 + 32 + 768 (class token) = 1328 is the closest to the budget
    model = build("spt_lora", "vit", calibrated=False, budget=0.0013, sweep_step=0.00105)
    units = _units(model.backbone)
    names = [u.name for u in units]
    scores = [torch.full((u.size,), 1e-6) for u in units]
    scores[names.index("b0_q")][:] = 10.0  # every entry of q in block 0 is sensitive: 1024 >= 512 / 10
    scores[names.index("b1_fc1")][:7] = 5.0  # 7 entries of fc1 in block 1: < (32*8 + 8*128) / 10 -> sparse
    scores[names.index("b1_fc2_bias")][:10] = 5.0  # 10 of 32 bias entries >= 32 / 5 -> tuned whole
    whole, sparse = model.method._choose(units, torch.cat(scores))
    assert whole[names.index("b0_q")] and not whole[names.index("b1_fc1")] and whole[names.index("b1_fc2_bias")]
    assert sparse[names.index("b1_fc1")].tolist()[:7] == list(range(7))
    assert sparse[names.index("b0_q")].numel() == 0  # structured: no sparse entries on top
