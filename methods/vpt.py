"""Visual Prompt Tuning (Jia et al., ECCV 2022): learnable prompt tokens.

Shallow: ``num_tokens`` prompts are inserted after the class token before block 0.
Deep: every block gets its own prompts, replacing the previous block's prompt outputs.
Prompts are removed again before the final norm, so pooling sees the original tokens.
Initialisation follows VPT: U(-v, v) with v = sqrt(6 / (3 * patch^2 + dim)); dropout on prompts.
Not defined for Swin here (windowed attention has no global token sequence), and not mergeable:
prompts add tokens, hence compute, at inference.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method


class Prompts(nn.Module):
    def __init__(self, layers: int, num_tokens: int, dim: int, prefix: int, patch: int, dropout: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(layers, num_tokens, dim))
        bound = math.sqrt(6.0 / (3 * patch * patch + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = dropout
        self.prefix = prefix
        self.num_tokens = num_tokens

    def _layer(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        prompts = F.dropout(self.prompts[layer], self.dropout, self.training)
        return prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)

    def insert(self, tokens: torch.Tensor) -> torch.Tensor:
        """[prefix | patches] -> [prefix | prompts | patches]."""
        p = self.prefix
        return torch.cat([tokens[:, :p], self._layer(0, tokens), tokens[:, p:]], dim=1)

    def replace(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Swap the previous block's prompt outputs for this block's prompts (VPT-deep)."""
        p, t = self.prefix, self.num_tokens
        return torch.cat([tokens[:, :p], self._layer(layer, tokens), tokens[:, p + t:]], dim=1)

    def strip(self, tokens: torch.Tensor) -> torch.Tensor:
        p, t = self.prefix, self.num_tokens
        return torch.cat([tokens[:, :p], tokens[:, p + t:]], dim=1)


class _VPT(Method):
    families = frozenset({"vit"})
    deep = False
    hparams = {
        "num_tokens": HParam(50, "prompt tokens per layer (VPT tunes this per task)", low=1),
        "dropout": HParam(0.1, "dropout on the prompt tokens", low=0.0, high=0.99),
    }

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        prompts = Prompts(
            layers=len(backbone.blocks) if self.deep else 1,
            num_tokens=self.hp.num_tokens,
            dim=backbone.blocks[0].dim,
            prefix=backbone.num_prefix_tokens,
            patch=backbone.patch_size,
            dropout=self.hp.dropout,
        )
        petl["prompts"] = prompts
        backbone.transform_output(backbone.token_site, prompts.insert)
        if self.deep:
            for blk in backbone.blocks[1:]:
                backbone.transform_input(blk.block, functools.partial(prompts.replace, blk.index))
        backbone.transform_input(backbone.final_norm, prompts.strip)


class VPTShallow(_VPT):
    name = "vpt_shallow"
    display_name = "VPT-Shallow"
    summary = "VPT-Shallow: learnable prompt tokens at the input of the first block."
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"


class VPTDeep(_VPT):
    name = "vpt_deep"
    display_name = "VPT-Deep"
    summary = "VPT-Deep: learnable prompt tokens at the input of every block."
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    deep = True
