"""Linear probing: only the classifier head trains on frozen backbone features."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from petlbench import Backbone, Method
from petlbench.backbone import FAMILIES


class Linear(Method):
    name = "linear"
    families = frozenset(FAMILIES)
    display_name = "Linear probing"
    published = {"vtab": "Linear probing", "fgvc": "Linear probing"}
    summary = "Linear probing: train the classifier head only."
    paper = "Baseline (VPT, Jia et al., ECCV 2022, Table 1)"
    mergeable = True
    frozen_features = True

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        return backbone.head_parameters()

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the backbone was never changed."""
