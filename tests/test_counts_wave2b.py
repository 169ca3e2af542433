"""Published ViT-B/16 parameter counts of the wave-2b methods (meta device: shapes only, instant).

Sources (head excluded): AdaptFormer dim 8 "0.16 M" (VTAB tables, e.g. V-PETL Bench); Convpass
"0.33 M" (Convpass paper / methods-2026.md §1.2); DTL r=2 "0.04 M" (DTL paper, methods-2026.md);
SCT topN=96 "0.11 M" (V-PETL Bench table); LN-tune "0.04 M" (PETL_Vision); Adapter+ dim 8 is
the formula count of the official module (the paper's figure reads about 0.2 M).
"""

from __future__ import annotations

import pytest

import petlbench
from tests.test_counts import VIT_B, counts


@pytest.mark.parametrize(
    "method,hp,expected,published_m",
    [
        ("adaptformer", {}, 12 * (768 * 8 + 8 + 8 * 768 + 768), 0.16),  # 156,768
        ("adapter_plus", {}, 12 * (768 * 8 + 8 + 8 * 768 + 768 + 768), 0.17),  # 165,984
        ("convpass", {}, 12 * 2 * (768 * 8 + 8 + 8 * 8 * 9 + 8 + 8 * 768 + 768), 0.33),  # 327,552
        ("convpass", {"positions": "attn"}, 12 * (768 * 8 + 8 + 8 * 8 * 9 + 8 + 8 * 768 + 768), 0.16),
        ("dtl", {}, 12 * 2 * 2 * 768, 0.04),  # 36,864
        ("dtl_plus", {}, 12 * 2 * 2 * 768 + 768 * 9, 0.04),  # 43,776 with a 3x3 kernel
        ("sct", {"channels": 96}, 12 * (96 * 96 + 96), 0.11),  # 111,744
        ("sct", {}, 12 * (96 * 96 + 96), 0.11),  # width / 8 = 96 on ViT-B
        ("ln_tune", {}, 12 * 2 * 2 * 768 + 2 * 768, 0.04),  # 38,400
    ],
)
def test_vit_b16_counts_without_head(method: str, hp: dict, expected: int, published_m: float) -> None:
    c = counts(method, **hp)
    assert c.trainable_without_head == expected
    assert round(expected / 1e6, 2) == published_m
    assert c.head == 768 * 100 + 100
    assert c.backbone == 85_798_656
    assert c.extra_after_merge == (0 if petlbench.get_method(method).mergeable else expected)


def test_adapter_plus_family_counts() -> None:
    per_adapter = 768 * 8 + 8 + 8 * 768 + 768
    assert counts("adapter_plus", variant="post").trainable_without_head == 12 * per_adapter
    assert counts("adapter_plus", variant="pfeiffer").trainable_without_head == 12 * (per_adapter + 2 * 768)
    houlsby = counts("adapter_plus", variant="houlsby").trainable_without_head
    assert houlsby == 12 * 2 * per_adapter + 38_400  # two adapters per block + LayerNorm tuning
    assert counts("adapter_plus", suite="fgvc", task="StanfordCars").trainable_without_head == \
        12 * (768 * 32 + 32 + 32 * 768 + 768 + 768)


def test_sct_indices_are_state_not_parameters() -> None:
    model = petlbench.create_model(VIT_B, "sct", 10, device="meta")
    assert model.petl["sct"].index.shape == (12, 96)
    assert "index" not in {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}


def test_swin_b_counts() -> None:
    swin = "swin_base_patch4_window7_224"
    dims = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2
    assert counts("adaptformer", swin).trainable_without_head == sum(d * 8 + 8 + 8 * d + d for d in dims)
    assert counts("convpass", swin).trainable_without_head == sum(2 * (d * 8 + 8 + 584 + 8 * d + d) for d in dims)
    # LN-tune on Swin: block norms, the final norm, the patch-embedding norm and the three patch-merging norms (4x C).
    assert counts("ln_tune", swin).trainable_without_head == 2 * (2 * sum(dims) + 1024 + 128 + 4 * (128 + 256 + 512))
