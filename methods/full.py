"""Full fine-tuning: every backbone parameter trains (the usual upper-cost baseline)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from petlbench import Backbone, Method
from petlbench.backbone import FAMILIES

from ._recipes import VPT_DIFFERENCES, VPT_FGVC_SOURCE, VPT_SGD, VPT_VTAB_SOURCE, head_bias

# KMnP/vpt's end2end runs: configs/base-finetune.yaml (AdamW, batch 384, 100 epochs, 5 warm-up epochs);
# src/solver/optimizer.py gives every tensor whose name contains "bias" no decay and the others 0.01 whenever
# the grid's weight decay is > 0 (a grid value of 0 falls through to SGD without decay).
_VPT_FULL = {**{k: v for k, v in VPT_SGD.items() if k != "momentum"}, "optimizer": "adamw", "warmup_epochs": 5,
             "tune_lr": "0.001,0.0001,0.0005,0.005", "tune_weight_decay": "0.01"}
_FULL_DIFFERENCES = (
    " Weight decay: VPT's AdamW branch decays the non-bias tensors by 0.01 for every grid value > 0 (0.01, "
    "0.001, 0.0001 give the same run) and a grid value of 0 trains with SGD (momentum 0.9) instead; only the "
    "0.01 AdamW run is reproduced. VPT's AdamW is the transformers one (decay applied after the Adam step), "
    "torch's here."
)


class Full(Method):
    name = "full"
    families = frozenset(FAMILIES)
    display_name = "Full fine-tuning"
    published = {"vtab": "Full fine-tuning", "fgvc": "Full fine-tuning"}
    summary = "Full fine-tuning: train every parameter."
    paper = "Baseline (VPT, Jia et al., ECCV 2022, Table 1)"
    mergeable = True
    recipes = {
        "vtab": {"*": {**_VPT_FULL, "batch_size": 128, "interpolation": "bilinear"}},
        "fgvc": {"*": {**_VPT_FULL, "batch_size": 384}},
    }
    recipe_source = {
        "vtab": VPT_VTAB_SOURCE.format(what="MODEL.TRANSFER_TYPE end2end, configs/base-finetune.yaml (AdamW, 5 "
                                            "warm-up epochs), train type finetune", grid="0.001, 0.0001, 0.0005, 0.005"),
        "fgvc": VPT_FGVC_SOURCE.format(what="MODEL.TRANSFER_TYPE end2end, configs/base-finetune.yaml (AdamW, batch "
                                            "384, 5 warm-up epochs), tune_fgvc.py finetune_main",
                                       grid="0.001, 0.0001, 0.0005, 0.005"),
    }
    recipe_differences = {
        "vtab": VPT_DIFFERENCES + _FULL_DIFFERENCES + " VPT's VTAB batch for full fine-tuning is not in the "
                "repository (128, the VTAB tuning command's, used).",
        "fgvc": VPT_DIFFERENCES + _FULL_DIFFERENCES,
    }

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        return backbone.model.parameters()

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """VPT's AdamW exempts every bias (LayerNorm biases and the head's included), nothing else."""
        return [bias for _, bias in backbone.modules_with_bias()] + head_bias(backbone)

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the fine-tuned weights are the plain model."""
