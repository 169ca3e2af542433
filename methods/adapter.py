"""Bottleneck adapter after each block's MLP (Pfeiffer placement), as the VTAB/FGVC baselines ran it.

``y <- y + up(drop(act(down(y))))`` on the MLP output, before the residual add, with a bottleneck
of 8 (NOAH's width; VPT tunes its width per task). Placement and count (ViT-B/16: 12 * (768*8 + 8 +
8*768 + 768) = 156,768) are equal in both codebases; they differ in everything else, so each is a
``variant``:

- ``noah`` (default; the ``vtab`` preset): ZhangYuanhan-AI/NOAH ``AdapterSuper`` in NOAH's ViT, the
  source of the quoted VTAB row "Adapter 0.16 M, 71.44 mean of 19". QuickGELU ``x * sigmoid(1.702 x)``,
  dropout 0.1 after the activation. Initialisation: ``AdapterSuper`` writes xavier-uniform weights
  and N(0, 1e-6) biases, but NOAH's ViT constructor then runs timm's ``_init_vit_weights`` over the
  whole model, which redraws both projections trunc-normal (std 0.02) with zero biases; that is
  what trains, and what this variant draws. The model is therefore *not* the pre-trained one at
  step 0. Placement: NOAH's block is ``x + adapter(drop_path(mlp(norm2(x))))``, so the adapter
  acts on the MLP update *after* stochastic depth (a dropped sample still gets the adapter of a
  zero input).
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
from petlbench.layers import QuickGELU, init_vit_linear

from ._recipes import (
    NOAH_DIFFERENCES,
    NOAH_SOURCE,
    NOAH_VTAB,
    VPT_DIFFERENCES,
    VPT_FGVC_SOURCE,
    VPT_LR_GRID,
    VPT_SGD,
    head_bias,
)


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, variant: str) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = QuickGELU() if variant == "noah" else nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        if variant == "noah":  # NOAH's whole-model _init_vit_weights, after AdapterSuper's own xavier init
            init_vit_linear(self.down)
            init_vit_linear(self.up)
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

    def after_drop_path(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """NOAH's placement: ``b`` is the MLP sub-layer's update after drop path (``h`` unused)."""
        return self.forward(b)


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
        "variant": HParam("noah", "noah: NOAH's baseline (QuickGELU, trunc-normal 0.02 + zero biases, after drop "
                          "path); vpt: VPT's "
                          "(both projections zero: effectively only a bias trains); zero_up: xavier down, zero up",
                          choices=("noah", "vpt", "zero_up")),
    }
    presets = {"vtab": {"*": {"variant": "noah", "dropout": 0.1}}, "fgvc": {"*": {"variant": "vpt", "dropout": 0.0}}}
    recipes = {
        "vtab": {"*": dict(NOAH_VTAB)},
        # VPT's "adapter" transfer type has no base config of its own: the prompt config's batch (128) is used,
        # and the ten-value lr grid its paper lists for every non-full baseline (tune_fgvc.py linear_main).
        "fgvc": {"*": {**VPT_SGD, "batch_size": 128, "tune_lr": VPT_LR_GRID}},
    }
    recipe_source = {
        "vtab": NOAH_SOURCE.format(script="configs/Adapter/VTAB/slurm_train_adapter_vtab.sh (--is_adapter, "
                                          "experiments/Adapter/ViT-B_prompt_adapter_8.yaml: width 8 on every block)"),
        "fgvc": VPT_FGVC_SOURCE.format(what="MODEL.TRANSFER_TYPE adapter (src/models/vit_adapter/)",
                                       grid=VPT_LR_GRID),
    }
    recipe_differences = {
        "vtab": NOAH_DIFFERENCES,
        "fgvc": VPT_DIFFERENCES + " VPT tuned the adapter width per task (reduction 8/64/256); the width here "
                "is the bottleneck hyperparameter. The batch size and lr grid of VPT's adapter runs are not in "
                "the repository's configs (128 and the linear grid assumed).",
    }

    published = {"vtab": "Adapter (NOAH code, bottleneck 8)", "fgvc": "Adapter (VPT code)"}

    @classmethod
    def published_as(cls, suite: str, config) -> str | None:
        """NOAH's row needs NOAH's variant at width 8; VPT's row needs VPT's (zero-initialised) variant."""
        if suite == "vtab" and config["variant"] == "noah" and config["bottleneck"] == 8:
            return cls.published["vtab"]
        if suite == "fgvc" and config["variant"] == "vpt":
            return cls.published["fgvc"]
        return None

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """VPT's SGD exempts only the classifier's bias (the FGVC recipe; NOAH's VTAB one uses the 1-D rule)."""
        return head_bias(backbone)

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        adapters = nn.ModuleList(Bottleneck(b.dim, self.hp.bottleneck, self.hp.dropout, self.hp.variant)
                                 for b in backbone.blocks)
        petl["adapters"] = adapters
        for blk, adapter in zip(backbone.blocks, adapters, strict=True):
            if self.hp.variant == "noah":  # x + adapter(drop_path(mlp(norm2(x)))), NOAH's Block
                backbone.transform_branch(blk, "mlp", adapter.after_drop_path)
            else:  # VPT's ViT has no drop path: the adapter on the MLP output, inside the branch
                backbone.transform_output(blk.mlp, adapter)
