"""The method x backbone-variant matrix: tiny models of every backbone variant petlbench supports,
and what each registered method does on each of them (merges exactly, runs unmerged, or is
refused before training).

Shared by ``tests/test_backbone_matrix.py`` (which checks every cell: build, a train step that
moves only trainable tensors, merge equal to the trained model, counts explained) and by the
table in ``docs/backbone-methods.md`` (rendered here, checked by a test so it cannot drift)::

    python -m tests.backbone_matrix            # print the table
    python -m tests.backbone_matrix --write    # rewrite it in docs/backbone-methods.md

To add a backbone family, append a :class:`Variant` to :data:`VARIANTS` (a timm architecture
and the arguments that make it tiny); every test and the table pick it up.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import petlbench
from petlbench.errors import PetlbenchError
from tests.conftest import TINY_CONVNEXT, TINY_DEIT_DISTILLED, TINY_EVA, TINY_VIT


@dataclass(frozen=True)
class Variant:
    """One backbone variant, built tiny (depth 2, width 16-32) from a timm architecture."""

    name: str  # column name in the table
    arch: str
    kwargs: dict[str, Any]
    what: str  # one line: what is special about it
    input_size: tuple[int, int] = (32, 32)  # (H, W) of the test images
    num_classes: int = 5


#: The tiny ViT arguments of the rest of the suite (depth 2, width 32, 32x32 images, 8x8 patches).
TINY: dict[str, Any] = dict(TINY_VIT[1])

#: The matrix columns. Perturbed LayerNorm affines, biases, LayerScale and tokens (see
#: :func:`perturb`) make every misplaced site visible; init values (LN = identity, zero biases,
#: LayerScale 1e-5) would hide them.
VARIANTS: list[Variant] = [
    Variant("vit", "vit_tiny_patch16_224", dict(TINY), "ViT, class token, final norm (the original ViT-B/16 recipe)"),
    Variant("clip", "vit_base_patch16_clip_224", dict(TINY),
            "pre-norm ViT (CLIP): LayerNorm before block 0, bias-less patch embedding"),
    Variant("dinov2_reg", "vit_small_patch14_reg4_dinov2", dict(TINY),
            "DINOv2 with 4 registers, LayerScale, no position embedding on prefix tokens"),
    Variant("siglip", "vit_base_patch16_siglip_224", dict(TINY),
            "SigLIP: no class token, attention-pool (MAP) head"),
    Variant("mae_gap", "vit_tiny_patch16_224", {**TINY, "global_pool": "avg"},
            "MAE-style: average pool of the patch tokens, then fc_norm (final norm is Identity)"),
    Variant("no_bias", "vit_tiny_patch16_224", {**TINY, "qkv_bias": False, "proj_bias": False},
            "qkv, proj, fc1 and fc2 without biases (qkv_bias=False, proj_bias=False)"),
    Variant("non_square", "vit_tiny_patch16_224", {**TINY, "img_size": (16, 64)},
            "16x64 images: a 2x8 token grid (16 tokens, which a square reshape would read as 4x4)",
            input_size=(16, 64)),
    Variant("dynamic", "vit_tiny_patch16_224", {**TINY, "dynamic_img_size": True},
            "dynamic_img_size=True, fed 16x64 images (built for 32x32): the grid follows the input",
            input_size=(16, 64)),
    Variant("swin", "swin_tiny_patch4_window7_224",
            {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
             "window_size": 4}, "Swin: windowed attention, patch merging, average pool"),
    Variant("swin_non_square", "swin_tiny_patch4_window7_224",
            {"img_size": (16, 64), "patch_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2),
             "window_size": 2}, "Swin on 16x64 images: 4x16, then 2x8 token maps", input_size=(16, 64)),
    Variant("deit_distilled", TINY_DEIT_DISTILLED[0], dict(TINY_DEIT_DISTILLED[1]),
            "distilled DeiT: class + distillation token, two heads averaged at evaluation"),
    Variant("eva02", TINY_EVA[0], dict(TINY_EVA[1]),
            "EVA-02: RoPE, SwiGLU MLP, split q/k/v, LayerScale, average pool + fc_norm"),
    Variant("convnext", TINY_CONVNEXT[0], dict(TINY_CONVNEXT[1]),
            "ConvNeXt: depthwise convolutions, linear MLPs, LayerScale, no tokens"),
]

#: Hyperparameters that make a method meaningful on tiny models (budgets in millions of
#: parameters far above a tiny model's size would tune everything whole).
TINY_HP: dict[str, dict[str, Any]] = {
    "spt_lora": {"budget": 0.003, "sweep_step": 0.003 / 40, "drop_path": 0.0},
    "spt_adapter": {"budget": 0.003, "sweep_step": 0.003 / 40, "drop_path": 0.0},
}

STATUS_MERGE, STATUS_UNMERGED, STATUS_REFUSED = "merge", "unmerged", "refused"


def variant(name: str) -> Variant:
    return next(v for v in VARIANTS if v.name == name)


def batches(v: Variant, n: int = 2, size: int = 4, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic (images, labels) batches at the variant's input size (calibration, train steps)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, *v.input_size, generator=gen),
             torch.randint(0, v.num_classes, (size,), generator=gen)) for _ in range(n)]


@torch.no_grad()
def perturb(net: nn.Module, seed: int = 0) -> None:
    """Random, non-init values for every LayerNorm affine, every bias, every LayerScale and the
    prefix tokens / position embedding, so a site folded into the wrong place shows up."""
    gen = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen).to(t) * std

    for module in net.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.weight.copy_(1.0 + noise(module.weight, 0.3))
        own = module._parameters
        if isinstance(own.get("bias"), nn.Parameter):
            own["bias"].add_(noise(own["bias"], 0.2))
        if isinstance(own.get("gamma"), nn.Parameter):  # LayerScale
            own["gamma"].copy_(0.5 + noise(own["gamma"], 0.3))
    for name in ("cls_token", "reg_token", "pos_embed"):
        token = getattr(net, name, None)
        if isinstance(token, nn.Parameter):
            token.add_(noise(token, 0.2))


def build(method: str, v: Variant, calibrate: bool = True, **hp: Any) -> petlbench.PETLModel:
    """The tiny, perturbed model of ``method`` on ``v`` (calibrated when the method needs it); a
    refusal raises PetlbenchError from create_model, as planning would."""
    model = petlbench.create_model(v.arch, method, v.num_classes, backbone_kwargs=v.kwargs, reuse_backbone=True,
                                   **{**TINY_HP.get(method, {}), **hp})
    perturb(model.net)
    if calibrate and model.method.needs_calibration:
        petlbench.calibrate(model, batches(v))
    return model


def outcome(method: str, v: Variant) -> tuple[str, str]:
    """(status, reason) of one cell, as planning decides it: refused with the one-line reason, or
    built and then deployed merged or unmerged (the reason of an unmerged deployment)."""
    try:  # planning builds on the meta device; the tiny CPU build from the backbone cache decides the same, faster
        model = petlbench.create_model(v.arch, method, v.num_classes, backbone_kwargs=v.kwargs, reuse_backbone=True,
                                       **TINY_HP.get(method, {}))
    except PetlbenchError as exc:
        return STATUS_REFUSED, str(exc)
    if model.method.mergeable:
        return STATUS_MERGE, ""
    return STATUS_UNMERGED, getattr(model.method, "unmerged_reason", "") or "not linear in the backbone's weights"


# ------------------------------------------------------------------------ the docs table
MARK_BEGIN = "<!-- backbone-matrix:begin (generated by `python -m tests.backbone_matrix --write`) -->"
MARK_END = "<!-- backbone-matrix:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "backbone-methods.md"
_SYMBOL = {STATUS_MERGE: "✔ merge", STATUS_UNMERGED: "✔ unmerged", STATUS_REFUSED: "refused"}


def render() -> str:
    """The methods x variants table, then the reasons: one note per distinct refusal or
    backbone-specific unmerged deployment of a method (the line planning gives)."""
    methods = petlbench.list_methods()
    lines = ["| method | " + " | ".join(v.name for v in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    cells = {(m, v.name): outcome(m, v) for v in VARIANTS for m in methods}  # variant-major: backbone cache hits
    notes: dict[tuple[str, str], int] = {}
    for m in methods:
        row = []
        for v in VARIANTS:
            status, reason = cells[(m, v.name)]
            mark = _SYMBOL[status]
            if status == STATUS_REFUSED or (status == STATUS_UNMERGED and petlbench.get_method(m).mergeable):
                mark += f" [{notes.setdefault((m, reason), len(notes) + 1)}]"
            row.append(mark)
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    columns = [f"- **{v.name}**: {v.what} (`{v.arch}` with {_kwargs(v.kwargs)})" for v in VARIANTS]
    reasons = [f"{i}. {m}: {reason}" for (m, reason), i in notes.items()]
    return "\n".join(["Columns:", "", *columns, "", *lines, "", "Reasons:", "", *reasons]) + "\n"


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v!r}`" for k, v in kwargs.items())


def current_table(path: Path = DOC) -> str | None:
    """The generated part of ``path`` (None when the markers are missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK_BEGIN not in text or MARK_END not in text:
        return None
    return text.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0].strip("\n") + "\n"


def write(path: Path = DOC) -> None:
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    path.write_text(f"{head}{MARK_BEGIN}\n{render()}{MARK_END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
        print(f"wrote {DOC}")
    else:
        print(render(), end="")
