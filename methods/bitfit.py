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


class BitFit(Method):
    name = "bitfit"
    display_name = "BitFit"
    published = {"vtab": "BitFit", "fgvc": "BitFit"}  # the same tensors train as VPT's "tinytl-bias" baseline
    summary = "BitFit: train all bias terms (incl. LayerNorm biases) and the head."
    paper = "Zaken et al., ACL 2022; VPT 'Bias' baseline"
    mergeable = True

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        yield from (bias for _, bias in backbone.modules_with_bias())
        yield from backbone.head_parameters()

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the tuned biases live in the plain model's own tensors."""
