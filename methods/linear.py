"""Linear probing: only the classifier head trains on frozen backbone features."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from petlbench import Backbone, Method
from petlbench.backbone import FAMILIES

from ._recipes import (
    VPT_DIFFERENCES,
    VPT_FGVC_SOURCE,
    VPT_LR_GRID,
    VPT_SGD,
    VPT_VTAB,
    VPT_VTAB_SOURCE,
    head_bias,
)


class Linear(Method):
    name = "linear"
    families = frozenset(FAMILIES)
    display_name = "Linear probing"
    published = {"vtab": "Linear probing", "fgvc": "Linear probing"}
    summary = "Linear probing: train the classifier head only."
    paper = "Baseline (VPT, Jia et al., ECCV 2022, Table 1)"
    mergeable = True
    frozen_features = True
    # KMnP/vpt's linear runs: configs/base-linear.yaml (SGD, batch 1024, 100 epochs, 10 warm-up epochs).
    recipes = {
        "vtab": {"*": dict(VPT_VTAB)},
        "fgvc": {"*": {**VPT_SGD, "batch_size": 1024, "tune_lr": VPT_LR_GRID}},
    }
    recipe_source = {
        "vtab": VPT_VTAB_SOURCE.format(what="MODEL.TRANSFER_TYPE linear (train type linear)", grid=VPT_LR_GRID),
        "fgvc": VPT_FGVC_SOURCE.format(what="MODEL.TRANSFER_TYPE linear, configs/base-linear.yaml (batch 1024), "
                                            "tune_fgvc.py linear_main", grid=VPT_LR_GRID),
    }
    recipe_differences = {
        "vtab": VPT_DIFFERENCES + " configs/base-linear.yaml's batch 1024 exceeds VTAB's 1000 training images; "
                "VPT's VTAB batch for linear probing is not in the repository (128, the VTAB tuning command's, used).",
        "fgvc": VPT_DIFFERENCES,
    }

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        return backbone.head_parameters()

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """VPT's SGD decays the classifier's weight, not its bias."""
        return head_bias(backbone)

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the backbone was never changed."""
