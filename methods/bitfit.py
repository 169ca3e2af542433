"""BitFit: train every bias of the backbone (linears, LayerNorms, patch embedding) and the head.

Biases are selected from the module tree (each module's own ``bias`` parameter), never by name.
On ViT-B/16 that is 102,912 parameters without the head. Every bias of the pretrained network
trains, so on SigLIP those of its attention-pool head too (it sits before the classifier and is
part of the pretrained backbone); layers built without a bias (``qkv_bias=False``) have none.
"""

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


class BitFit(Method):
    name = "bitfit"
    families = frozenset(FAMILIES)
    display_name = "BitFit"
    published = {"vtab": "BitFit", "fgvc": "BitFit"}  # the same tensors train as VPT's "tinytl-bias" baseline
    summary = "BitFit: train all bias terms (incl. LayerNorm biases) and the head."
    paper = "Zaken et al., ACL 2022; VPT 'Bias' baseline"
    mergeable = True
    # KMnP/vpt's "tinytl-bias" runs: no base config of their own (base-prompt's batch 128 assumed).
    recipes = {
        "vtab": {"*": dict(VPT_VTAB)},
        "fgvc": {"*": {**VPT_SGD, "batch_size": 128, "tune_lr": VPT_LR_GRID}},
    }
    recipe_source = {
        "vtab": VPT_VTAB_SOURCE.format(what="MODEL.TRANSFER_TYPE tinytl-bias (src/models/vit_models.py: every "
                                            "'bias' tensor and the head train)", grid=VPT_LR_GRID),
        "fgvc": VPT_FGVC_SOURCE.format(what="MODEL.TRANSFER_TYPE tinytl-bias", grid=VPT_LR_GRID),
    }
    recipe_differences = {
        "vtab": VPT_DIFFERENCES + " The tuned biases get weight decay in VPT's SGD (only the head's bias is "
                "exempt), reproduced; the VTAB row's origin is not confirmed as VPT's (reference CSV).",
        "fgvc": VPT_DIFFERENCES + " Batch size of VPT's bias runs not in the repository (128 assumed).",
    }

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        yield from (bias for _, bias in backbone.modules_with_bias())
        yield from backbone.head_parameters()

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """VPT's SGD decays every trained bias except the classifier's."""
        return head_bias(backbone)

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the tuned biases live in the plain model's own tensors."""
