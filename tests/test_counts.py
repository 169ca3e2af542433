"""Parameter counts on the real architectures (built on the meta device: shapes only, instant).

Expected values are the formula counts in shared/reference/methods.md §1.5, §2.4 and §6.
"""

from __future__ import annotations

import pytest

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
