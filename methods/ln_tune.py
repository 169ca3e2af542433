"""LN-tune: train only the LayerNorm affine parameters of the backbone, plus the head.

The "LayerNorm tuning" baseline as PETL_Vision runs it (OSU-MLB/PETL_Vision
``experiment/build_model.py``: every parameter of a ``norm`` module trains): each block's norm1
and norm2 and the final norm; on Swin also the patch-embedding and patch-merging norms. The
norms are :attr:`Backbone.layernorms` (found by type, never by name), so every LayerNorm of the
pretrained network: also CLIP's pre-norm, MAE's ``fc_norm`` and the norm of SigLIP's attention-pool
head. ViT-B/16: 12 * 2 * 1536 + 1536 = 38,400 parameters (0.04 M). The tuned values live in the plain model's own tensors, so merging
is free (the adapted model is already a plain timm model).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from petlbench import Backbone, Method


class LNTune(Method):
    name = "ln_tune"
    display_name = "LN-tune"
    summary = "LN-tune: train every LayerNorm scale and shift of the backbone, and the head."
    paper = "LayerNorm tuning baseline (PETL_Vision, Mai et al., arXiv 2409.16434)"
    # PETL_Vision publishes only means (73.52 / 71.20) and the shipped reference CSV has no per-task LN-tune rows.
    published: dict[str, str] = {}
    mergeable = True

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        for norm in backbone.layernorms:
            yield from norm.parameters()
        yield from backbone.head_parameters()

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the tuned LayerNorms are the plain model's own parameters."""
