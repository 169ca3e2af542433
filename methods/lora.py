"""LoRA (Hu et al., ICLR 2022) on the query and value projections, as in the PETL papers.

timm fuses q, k, v into one ``qkv`` Linear; the papers' LoRA adapts q and v with *separate*
low-rank pairs and leaves k alone (not one low-rank update on the fused matrix, which is what
peft does on timm). The branch runs in parallel with ``qkv`` and adds
``[B_q A_q x, 0, B_v A_v x] * alpha / rank``. A is kaiming-uniform, B zero. Merging adds
``alpha/rank * B A`` to the q and v row blocks of ``qkv.weight``.
ViT-B/16, rank 8: 12 * 2 * 8 * (768 + 768) = 294,912 parameters.

``targets=qkv`` instead learns one rank-r pair on the whole fused ``qkv`` (what peft does on
timm); it exists to compare speed with peft on exactly the same adapted weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.layers import add_to_weight_rows


class QVLoRA(nn.Module):
    def __init__(self, dim: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.dim, self.rank, self.scaling = dim, rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(2, rank, dim))  # [q, v]
        self.lora_b = nn.Parameter(torch.zeros(2, dim, rank))
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
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
    """One low-rank pair on the whole fused qkv (peft's behaviour on timm)."""

    def __init__(self, dim: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, dim))
        self.lora_b = nn.Parameter(torch.zeros(3 * dim, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.lora_a.to(x.dtype))
        return F.linear(z * self.scaling, self.lora_b.to(x.dtype))  # scaled at rank r, not at 3 * dim

    def delta(self) -> torch.Tensor:
        return self.scaling * self.lora_b.double() @ self.lora_a.double()


class LoRA(Method):
    name = "lora"
    display_name = "LoRA"
    summary = "LoRA rank 8 on the query and value projections (separate low-rank pairs)."
    paper = "Hu et al., LoRA, ICLR 2022"
    mergeable = True
    hparams = {
        "rank": HParam(8, "rank r of each low-rank pair", low=1),
        "alpha": HParam(8.0, "scaling numerator: the update is alpha/r * B A", low=0.0, low_exclusive=True),
        "dropout": HParam(0.0, "dropout on the LoRA branch input", low=0.0, high=0.99),
        "targets": HParam("qv", "qv: separate pairs on q and v (the papers); qkv: one pair on fused qkv (peft)",
                          choices=("qv", "qkv")),
    }

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        kind = QVLoRA if self.hp.targets == "qv" else FusedLoRA
        loras = nn.ModuleList(kind(b.dim, self.hp.rank, self.hp.alpha, self.hp.dropout) for b in backbone.blocks)
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
