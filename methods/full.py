"""Full fine-tuning: every backbone parameter trains (the usual upper-cost baseline)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from petlbench import Backbone, Method
from petlbench.backbone import FAMILIES


class Full(Method):
    name = "full"
    families = frozenset(FAMILIES)
    display_name = "Full fine-tuning"
    published = {"vtab": "Full fine-tuning", "fgvc": "Full fine-tuning"}
    summary = "Full fine-tuning: train every parameter."
    paper = "Baseline (VPT, Jia et al., ECCV 2022, Table 1)"
    mergeable = True

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        return backbone.model.parameters()

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the fine-tuned weights are the plain model."""
