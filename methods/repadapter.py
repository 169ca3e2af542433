"""RepAdapter (Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization").

A linear bottleneck after the LayerNorm, before ``attn.qkv`` (``repattn``) and also before
``mlp.fc1`` (``repblock``, the paper's default):

    R(u) = u + s * (B(dropout(A u + a)) + beta)

A: dense dim -> 8, xavier-uniform, zero bias. B: 8 -> dim in 2 groups (block-diagonal), zero
weight and bias, so R is the identity at init. ``s`` is a fixed per-task scale (not learned),
with the paper's per-task VTAB values as presets. Eval-mode R is affine, so it folds into the
following linear: W' = W (I + s B A), b' = b + s W (B a + beta).
ViT-B/16 repblock: 24 * (768*8 + 8 + 768*4 + 768) = 239,808 parameters (221,184 without biases).
On a qkv / fc1 built without a bias the merge gives it one (the shift needs a place): the merged
model is the timm model built with ``qkv_bias``/``proj_bias`` True, recorded with the run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import fold_input

from ._recipes import PETL_VIT_DIFFERENCES, PETL_VIT_VTAB

# Per-task scale s from the official configs (configs/repblock, configs/repattn), VTAB-1k.
_VTAB_SCALE = {
    #  task:                 (repblock, repattn)
    "cifar": (0.1, 0.1),
    "caltech101": (5.0, 10.0),
    "dtd": (1.0, 0.1),
    "oxford_flowers102": (0.5, 0.5),
    "oxford_iiit_pet": (0.1, 0.5),
    "svhn": (10.0, 10.0),
    "sun397": (0.1, 0.1),
    "patch_camelyon": (1.0, 0.5),
    "eurosat": (1.0, 5.0),
    "resisc45": (5.0, 0.1),
    "diabetic_retinopathy": (0.1, 0.5),
    "clevr_count": (0.5, 1.0),
    "clevr_dist": (0.1, 0.1),
    "dmlab": (5.0, 5.0),
    "kitti": (5.0, 1.0),
    "dsprites_loc": (5.0, 10.0),
    "dsprites_ori": (0.1, 5.0),
    "smallnorb_azi": (10.0, 10.0),
    "smallnorb_ele": (1.0, 1.0),
}


class RepBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, groups: int, scale: float, dropout: float) -> None:
        super().__init__()
        if hidden % groups or dim % groups:
            raise PetlbenchError(
                f"method 'repadapter': groups={groups} must divide hidden_dim={hidden} and the width {dim}. "
                "Fix: e.g. --set groups=2 --set hidden_dim=8."
            )
        self.scale = scale
        self.down = nn.Linear(dim, hidden)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.up_weight = nn.Parameter(torch.zeros(groups, dim // groups, hidden // groups))
        self.up_bias = nn.Parameter(torch.zeros(dim))
        self.dropout = nn.Dropout(dropout)

    def up_dense(self) -> torch.Tensor:
        """The grouped up-projection as a dense (dim, hidden) block-diagonal matrix."""
        return torch.block_diag(*self.up_weight)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self.dropout(F.linear(u, self.down.weight.to(u.dtype), self.down.bias.to(u.dtype)))
        return u + self.scale * F.linear(z, self.up_dense().to(u.dtype), self.up_bias.to(u.dtype))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(matrix, shift) with R(u) = u @ matrix.T + shift in eval mode."""
        b, a = self.up_dense().double(), self.down.weight.double()
        eye = torch.eye(a.shape[1], dtype=torch.float64, device=a.device)
        shift = self.scale * (b @ self.down.bias.double() + self.up_bias.double())
        return eye + self.scale * b @ a, shift


class RepAdapter(Method):
    name = "repadapter"
    families = frozenset({"vit", "deit_distilled", "swin"})
    family_refusals = {
        "eva": EVA_NO_QKV,
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    display_name = "RepAdapter"
    published = {"vtab": "RepAdapter"}

    @classmethod
    def published_as(cls, suite: str, config) -> str | None:
        """The published row is the block variant (adapters before qkv and fc1)."""
        return super().published_as(suite, config) if config["variant"] == "repblock" else None
    summary = "RepAdapter: re-parameterisable linear adapters before qkv (and fc1 for repblock)."
    paper = "Luo et al., Towards Efficient Visual Adaption via Structural Re-parameterization, arXiv 2302.08106"
    mergeable = True
    hparams = {
        "variant": HParam("repblock", "repblock: before qkv and fc1; repattn: before qkv only",
                          choices=("repblock", "repattn")),
        "hidden_dim": HParam(8, "bottleneck width", low=1),
        "groups": HParam(2, "groups of the up-projection", low=1),
        "scale": HParam(1.0, "fixed scale s (per-task presets for VTAB)", low=0.0, low_exclusive=True),
        "dropout": HParam(0.1, "dropout between the two projections", low=0.0, high=0.99),
    }
    recipes = {"vtab": {"*": dict(PETL_VIT_VTAB)}}
    recipe_source = {
        "vtab": "luogen1996/RepAdapter: train.py (AdamW(adapter + head tensors, lr 1e-3, wd 1e-4), timm "
                "CosineLRScheduler(t_initial=100, warmup_t=10, warmup_lr_init=1e-6, lr_min=1e-5) stepped "
                "scheduler.step(ep) after epoch ep, 100 epochs, create_model(drop_path_rate=0.1), "
                "reset_classifier (PyTorch's default nn.Linear init), test evaluated when ep % 10 == 9 and the best "
                "kept), dataset.py (train800val200, batch 64, drop_last=True, Resize((224, 224)) bicubic, ImageNet "
                "mean/std); scripts/train_repblock.sh; per-task scale s from configs/repblock/*.yaml (a "
                "hyperparameter preset); seed 42, one run.",
    }
    recipe_differences = {
        "vtab": PETL_VIT_DIFFERENCES + " The scale s was grid-searched on the test set (scripts/search_*.sh); its "
                "published per-task values are the presets.",
        "fgvc": "no recipe: RepAdapter publishes no CUB/NABirds/Dogs/Cars/Flowers (VPT split) runs; its few-shot "
                "FGVC configs are another protocol.",
    }

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: dict[str, Any]) -> dict[str, Any]:
        out = super().preset(suite, task, current)
        if suite == "vtab" and task in _VTAB_SCALE:
            out["scale"] = _VTAB_SCALE[task][0 if current["variant"] == "repblock" else 1]
        return out

    def _positions(self, backbone: Backbone) -> list[str]:
        return ["attn", "mlp"] if self.hp.variant == "repblock" else ["attn"]

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for pos in self._positions(backbone):
            adapters = nn.ModuleList(
                RepBlock(b.dim, self.hp.hidden_dim, self.hp.groups, self.hp.scale, self.hp.dropout)
                for b in backbone.blocks
            )
            petl[pos] = adapters
            for blk, adapter in zip(backbone.blocks, adapters, strict=True):
                backbone.transform_input(getattr(blk, pos), adapter)

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for pos in self._positions(backbone):
            for blk, adapter in zip(backbone.blocks, petl[pos], strict=True):
                fold_input(blk.qkv if pos == "attn" else blk.fc1, *adapter.affine())
