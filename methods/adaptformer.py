"""AdaptFormer (Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", NeurIPS 2022): a scaled bottleneck in parallel with every block's MLP.

As the official code does it (ShoufaChen/AdaptFormer ``models/custom_modules.py`` Block,
``models/adapter.py`` Adapter, settings of ``main_image.py``), for the residual stream ``x``
entering the MLP sub-layer:

    out = x + MLP(norm2(x)) + s * up(dropout(ReLU(down(x))))

- the adapter reads ``x`` itself, *before* ``norm2`` (``ffn_adapter_layernorm_option="none"``;
  PETL_Vision calls this "LN before"), not the normalised MLP input;
- ``s = 0.1`` is fixed; dropout 0.1 on the bottleneck; ReLU;
- "lora" initialisation: ``down`` kaiming-uniform(a=sqrt 5) with zero bias, ``up`` weight and
  bias zero, so the model starts as the pre-trained one;
- the adapter output is added after the MLP's stochastic depth, so it is never dropped.

The official image scripts use a bottleneck of 64; the VTAB-1k rows that tables quote (0.16 M)
use 8, the default here. ViT-B/16, bottleneck 8: 12 * (768*8 + 8 + 8*768 + 768) = 156,768.
The optional ``layernorm="in"``/``"out"`` (the official code's other options) add a learnable
LayerNorm on the adapter input/output.

Deliberate difference: the official code is ViT-only; on Swin the same block-level placement is
used (SCT's comparison code does the same), without a published reference. The ReLU makes the
branch non-linear, so it cannot be merged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from petlbench import Backbone, HParam, Method


class ParallelAdapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, layernorm: str) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.layernorm = layernorm
        self.norm = nn.LayerNorm(dim) if layernorm != "none" else None
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None and self.layernorm == "in":
            x = self.norm(x)
        out = self.up(self.dropout(self.act(self.down(x)))) * self.scale
        if self.norm is not None and self.layernorm == "out":
            out = self.norm(out)
        return out

    def branch(self, h: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """``h`` is the residual stream entering the MLP sub-layer, ``mlp_out`` what it adds."""
        return mlp_out + self.delta(h)


class AdaptFormer(Method):
    name = "adaptformer"
    families = frozenset({"vit", "deit_distilled", "eva", "swin"})
    family_refusals = {
        "convnext": "AdaptFormer runs beside the MLP branch of pre-norm attention and MLP blocks; a ConvNeXt block "
                    "has one convolutional branch, normalised after its convolution",
    }
    display_name = "AdaptFormer"
    summary = "AdaptFormer: 0.1-scaled ReLU bottleneck (dim 8) in parallel with every MLP."
    paper = "Chen et al., AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition, NeurIPS 2022"
    published = {"vtab": "AdaptFormer", "fgvc": "AdaptFormer"}
    bounded_by_width = frozenset({"bottleneck"})
    hparams = {
        "bottleneck": HParam(8, "hidden size of the adapter (official image scripts: 64; VTAB tables: 8)", low=1),
        "scale": HParam(0.1, "fixed scale s of the adapter output", low=0.0, low_exclusive=True),
        "dropout": HParam(0.1, "dropout on the bottleneck activations (official: 0.1)", low=0.0, high=0.99),
        "layernorm": HParam("none", "learnable LayerNorm on the adapter input ('in') or output ('out')",
                            choices=("none", "in", "out")),
    }

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """The quoted VTAB rows are the bottleneck-8, s = 0.1 configuration (0.16 M); every quoted row
        is the official default without an adapter LayerNorm."""
        if config.get("layernorm", "none") != "none":
            return None
        if suite == "vtab" and (config.get("bottleneck") != 8 or config.get("scale") != 0.1):
            return None
        return super().published_as(suite, config)

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        adapters = nn.ModuleList(
            ParallelAdapter(b.dim, self.hp.bottleneck, self.hp.scale, self.hp.dropout, self.hp.layernorm)
            for b in backbone.blocks
        )
        petl["adapters"] = adapters
        for blk, adapter in zip(backbone.blocks, adapters, strict=True):
            backbone.transform_branch(blk, "mlp", adapter.branch)
