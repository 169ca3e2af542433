"""LoRA (Hu et al., ICLR 2022) on timm's fused ``qkv``, in the two forms that VTAB/FGVC tables quote.

``targets=qv`` -- **the LoRA paper** (microsoft/LoRA ``loralib.MergedLinear`` with q and v enabled):
separate rank-r pairs on q and v, k untouched; the branch adds ``[B_q A_q x, 0, B_v A_v x] * alpha/r``.
Equal to loralib tensor for tensor (1.2e-6). ViT-B/16, rank 8: 12 * 2 * 8 * (768 + 768) = 294,912.

``targets=qkv`` -- **the NOAH baseline** (ZhangYuanhan-AI/NOAH ``--is_LoRA``, the source of the
quoted VTAB row "LoRA 0.29 M, 72.25 mean of 19"): ONE rank-r pair on the whole fused qkv (k is
adapted too), scale 1 (petlbench: ``alpha = rank``), dropout 0.1 on the LoRA input. Also what peft
does on timm. Same count (12 * 8 * (768 + 3 * 768) = 294,912), a different function. The ``vtab``
preset is this baseline, so ``--suite vtab`` reproduces the code behind the published row.

Initialisation (``init``): ``lora`` (default; loralib and peft) draws A kaiming-uniform(a=sqrt(5))
and zeroes B, so the model is the pre-trained one at step 0. ``noah`` is what NOAH's baseline
really starts from: its ViT constructor ends with timm's ``_init_vit_weights`` over the whole
model, which redraws every ``nn.Linear`` -- ``LoRA_a`` and ``LoRA_b`` included -- trunc-normal
(std 0.02), so A and B are both N(0, 0.02) and the model changes at step 0; the ``vtab`` preset
uses it. Both forms scale the rank-r activations. Merging adds ``alpha/r * B A`` to the adapted
row blocks of ``qkv.weight``. No FGVC preset: the source of the FGVC LoRA row tables print is not
stated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import add_to_weight_rows

from ._recipes import NOAH_DIFFERENCES, NOAH_SOURCE, NOAH_VTAB


@torch.no_grad()
def init_pair(a: torch.Tensor, b: torch.Tensor, init: str) -> None:
    """``lora``: A kaiming-uniform(a=sqrt(5)) (nn.Linear's default), B zero. ``noah``: both
    trunc-normal std 0.02, as timm's ``_init_vit_weights`` leaves NOAH's bias-free Linears."""
    if init == "noah":
        nn.init.trunc_normal_(a, std=0.02)
        nn.init.trunc_normal_(b, std=0.02)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


class QVLoRA(nn.Module):
    def __init__(self, dim: int, rank: int, alpha: float, dropout: float, init: str = "lora") -> None:
        super().__init__()
        self.dim, self.rank, self.scaling = dim, rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(2, rank, dim))  # [q, v]
        self.lora_b = nn.Parameter(torch.zeros(2, dim, rank))
        for a, b in zip(self.lora_a, self.lora_b, strict=True):
            init_pair(a, b, init)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, r = self.dim, self.rank
        z = F.linear(self.dropout(x), self.lora_a.reshape(2 * r, d).to(x.dtype))
        b = self.lora_b.to(x.dtype)
        # (3d, 2r): q rows read the first r columns, v rows the last r, k rows nothing.
        up = torch.cat([F.pad(b[0], (0, r)), b.new_zeros(d, 2 * r), F.pad(b[1], (r, 0))])
        return F.linear(z * self.scaling, up)  # scale the rank-r activations, not the qkv-wide output

    def delta(self, which: int) -> torch.Tensor:
        return self.scaling * self.lora_b[which].double() @ self.lora_a[which].double()


class FusedLoRA(nn.Module):
    """One low-rank pair on the whole fused qkv (NOAH's LoRA baseline; also peft on timm)."""

    def __init__(self, dim: int, rank: int, alpha: float, dropout: float, init: str = "lora") -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_b = nn.Parameter(torch.zeros(3 * dim, rank))
        init_pair(self.lora_a, self.lora_b, init)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.lora_a.to(x.dtype))
        return F.linear(z * self.scaling, self.lora_b.to(x.dtype))  # scaled at rank r, not at 3 * dim

    def delta(self) -> torch.Tensor:
        return self.scaling * self.lora_b.double() @ self.lora_a.double()


#: The reference-CSV name of NOAH's LoRA baseline rows (VTAB-1k).
NOAH_ROW = "LoRA (r=8, fused qkv, NOAH code)"


class LoRA(Method):
    name = "lora"
    families = frozenset({"vit", "deit_distilled", "swin"})
    family_refusals = {
        "eva": EVA_NO_QKV,
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    display_name = "LoRA"
    summary = "LoRA: qv = the LoRA paper (pairs on q and v); qkv = NOAH's baseline (one pair on fused qkv)."
    paper = "Hu et al., LoRA, ICLR 2022; VTAB baseline: Zhang et al., NOAH, 2022"
    mergeable = True
    bounded_by_width = frozenset({"rank"})
    hparams = {
        "rank": HParam(8, "rank r of each low-rank pair (1 .. block width)", low=1),
        "alpha": HParam(8.0, "scaling numerator: the update is alpha/r * B A (NOAH: alpha = rank, scale 1)", low=0.0,
                        low_exclusive=True),
        "dropout": HParam(0.0, "dropout on the LoRA branch input (NOAH: 0.1)", low=0.0, high=0.99),
        "targets": HParam("qv", "qv: the LoRA paper (pairs on q and v); qkv: NOAH baseline / peft (one pair on the "
                          "fused qkv)", choices=("qv", "qkv")),
        "init": HParam("lora", "lora: A kaiming-uniform, B zero (loralib, peft); noah: A and B trunc-normal std 0.02, "
                       "as NOAH's whole-model _init_vit_weights leaves its baseline", choices=("lora", "noah")),
    }
    recipes = {"vtab": {"*": dict(NOAH_VTAB)}}
    recipe_source = {"vtab": NOAH_SOURCE.format(script="configs/LoRA/VTAB/slurm_train_lora_vtab.sh (--is_LoRA, "
                                                       "experiments/LoRA/ViT-B_prompt_lora_8.yaml: rank 8 on every block)")}
    recipe_differences = {
        "vtab": NOAH_DIFFERENCES,
        "fgvc": "no recipe: the source of the FGVC LoRA row that tables print is not stated, so no official "
                "script is known (the harmonised protocol applies).",
    }
    published = {"vtab": NOAH_ROW}  # for targets=qkv, rank 8, scale 1 only (see published_as)

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: Mapping[str, Any]) -> dict[str, Any]:
        """VTAB: NOAH's baseline (fused qkv, scale 1 whatever the rank, dropout 0.1, NOAH's init)."""
        if suite == "vtab":
            return {"targets": "qkv", "alpha": float(current["rank"]), "dropout": 0.1, "init": "noah"}
        return super().preset(suite, task, current)

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """Only NOAH's configuration is compared with NOAH's row (the LoRA paper has no VTAB row)."""
        noah = config["targets"] == "qkv" and config["rank"] == 8 and float(config["alpha"]) == 8.0
        return cls.published.get(suite) if noah else None

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        kind = QVLoRA if self.hp.targets == "qv" else FusedLoRA
        loras = nn.ModuleList(kind(b.dim, self.hp.rank, self.hp.alpha, self.hp.dropout, self.hp.init)
                              for b in backbone.blocks)
        petl["lora"] = loras
        for blk, lora in zip(backbone.blocks, loras, strict=True):
            backbone.add_parallel(blk.qkv, lora)

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for blk, lora in zip(backbone.blocks, petl["lora"], strict=True):
            if self.hp.targets == "qkv":
                add_to_weight_rows(blk.qkv, 0, lora.delta())
            else:
                add_to_weight_rows(blk.qkv, 0, lora.delta(0))
                add_to_weight_rows(blk.qkv, 2 * blk.dim, lora.delta(1))
