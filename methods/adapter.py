"""Bottleneck adapter after each block's MLP (Pfeiffer placement), as the VTAB/FGVC baselines ran it.

``y <- y + up(drop(act(down(y))))`` on the MLP output, before the residual add, with a bottleneck
of 8 (NOAH's width; VPT tunes its width per task). Placement and count (ViT-B/16: 12 * (768*8 + 8 +
8*768 + 768) = 156,768) are equal in both codebases; they differ in everything else, so each is a
``variant``:

- ``noah`` (default; the ``vtab`` preset): ZhangYuanhan-AI/NOAH ``AdapterSuper``, the source of the
  quoted VTAB row "Adapter 0.16 M, 71.44 mean of 19". QuickGELU ``x * sigmoid(1.702 x)``,
  xavier-uniform weights and N(0, 1e-6) biases for BOTH projections, dropout 0.1 after the
  activation. The model is therefore *not* exactly the pre-trained one at step 0.
- ``vpt`` (the ``fgvc`` preset): KMnP/vpt ``ADPT_Block`` (Pfeiffer), the source of the FGVC
  "Adapter" row. GELU, both projections zero-initialised, no dropout. With ``down`` and ``up``
  both zero, every gradient except the up-projection bias's is zero, and stays zero: this
  variant **effectively trains only a bias on the MLP output** (VPT's published Adapter rows, and
  V-PETL Bench's copy of the code, are that). Kept because it is what those numbers measured.
- ``zero_up``: xavier-uniform ``down``, zero ``up`` (both biases zero), GELU -- the model equals the
  pre-trained one at step 0 and every parameter trains. No published row comes from this variant.

The activation makes every variant non-linear, so the adapter cannot be merged.
"""

from __future__ import annotations

import torch
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.layers import QuickGELU


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, variant: str) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = QuickGELU() if variant == "noah" else nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        if variant == "noah":
            for layer in (self.down, self.up):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.normal_(layer.bias, std=1e-6)
        elif variant == "vpt":
            for layer in (self.down, self.up):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:  # zero_up
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.dropout(self.act(self.down(y))))


class Adapter(Method):
    name = "adapter"
    families = frozenset({"vit", "deit_distilled", "eva", "swin"})
    family_refusals = {
        "convnext": "the adapter sits after the MLP of an attention + MLP block, the placement its papers define; "
                    "a ConvNeXt block is not one",
    }
    display_name = "Adapter"
    summary = "Bottleneck adapter (dim 8) after every MLP: NOAH's VTAB baseline (default) or VPT's FGVC one."
    paper = "Pfeiffer et al. 2021 placement; baselines of Zhang et al. (NOAH, 2022) and Jia et al. (VPT, ECCV 2022)"
    bounded_by_width = frozenset({"bottleneck"})
    hparams = {
        "bottleneck": HParam(8, "hidden size of the adapter (1 .. block width)", low=1),
        "dropout": HParam(0.1, "dropout after the activation (NOAH: 0.1; VPT: none)", low=0.0, high=0.99),
        "variant": HParam("noah", "noah: NOAH's baseline (QuickGELU, xavier + N(0,1e-6) biases); vpt: VPT's "
                          "(both projections zero: effectively only a bias trains); zero_up: xavier down, zero up",
                          choices=("noah", "vpt", "zero_up")),
    }
    presets = {"vtab": {"*": {"variant": "noah", "dropout": 0.1}}, "fgvc": {"*": {"variant": "vpt", "dropout": 0.0}}}
    train_presets = {"vtab": {"*": {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100}}}
    published = {"vtab": "Adapter (NOAH code, bottleneck 8)", "fgvc": "Adapter (VPT code)"}

    @classmethod
    def published_as(cls, suite: str, config) -> str | None:
        """NOAH's row needs NOAH's variant at width 8; VPT's row needs VPT's (zero-initialised) variant."""
        if suite == "vtab" and config["variant"] == "noah" and config["bottleneck"] == 8:
            return cls.published["vtab"]
        if suite == "fgvc" and config["variant"] == "vpt":
            return cls.published["fgvc"]
        return None

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        adapters = nn.ModuleList(Bottleneck(b.dim, self.hp.bottleneck, self.hp.dropout, self.hp.variant)
                                 for b in backbone.blocks)
        petl["adapters"] = adapters
        for blk, adapter in zip(backbone.blocks, adapters, strict=True):
            backbone.transform_output(blk.mlp, adapter)
