"""Bottleneck adapter, the VPT/NOAH "Adapter" baseline (Pfeiffer-style, MLP side only).

After each block's MLP: ``y <- y + up(GELU(down(y)))`` with a bottleneck of 8. ``down`` is
xavier-uniform, ``up`` starts at zero, so the model is the pre-trained one at initialisation.
ViT-B/16: 12 * (768*8 + 8 + 8*768 + 768) = 156,768 parameters. The GELU makes it non-linear, so
it cannot be merged.
"""

from __future__ import annotations

import torch
from torch import nn

from petlbench import Backbone, HParam, Method


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.dropout(self.act(self.down(y))))


class Adapter(Method):
    name = "adapter"
    display_name = "Adapter"
    summary = "Bottleneck adapter (dim 8) after every MLP; the VPT/NOAH baseline."
    paper = "Pfeiffer et al. 2021 / Houlsby et al. 2019, as the VPT & NOAH baseline"
    hparams = {
        "bottleneck": HParam(8, "hidden size of the adapter", low=1),
        "dropout": HParam(0.0, "dropout inside the adapter", low=0.0, high=0.99),
    }

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        adapters = nn.ModuleList(Bottleneck(b.dim, self.hp.bottleneck, self.hp.dropout) for b in backbone.blocks)
        petl["adapters"] = adapters
        for blk, adapter in zip(backbone.blocks, adapters, strict=True):
            backbone.transform_output(blk.mlp, adapter)
