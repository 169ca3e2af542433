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
from petlbench.backbone import FAMILIES


class LNTune(Method):
    name = "ln_tune"
    families = frozenset(FAMILIES)
    display_name = "LN-tune"
    summary = "LN-tune: train every LayerNorm scale and shift of the backbone, and the head."
    paper = "LayerNorm tuning baseline (PETL_Vision, Mai et al., arXiv 2409.16434)"
    # PETL_Vision publishes only means (73.52 / 71.20) and the shipped reference CSV has no per-task LN-tune rows.
    published: dict[str, str] = {}
    mergeable = True
    # OSU-MLB/PETL_Vision: experiment/config/default_vtab_processed.yml + lr_wd_vtab_processed.yml, engine/.
    recipes = {
        "vtab": {"*": {"optimizer": "adamw", "decay_groups": "all", "batch_size": 64, "drop_last": True, "epochs": 100,
                       "schedule": "timm_epoch", "warmup_epochs": 10, "warmup_lr": 1e-6, "min_lr": 1e-5,
                       "drop_path_rate": 0.1, "label_smoothing": 0.0, "grad_clip": 0.0, "selection": "tune",
                       "normalization": "none",
                       "tune_lr": "0.001,0.01", "tune_weight_decay": "0.0001,0.001"}},
    }
    recipe_source = {
        "vtab": "OSU-MLB/PETL_Vision: experiment/config/method/ln.yml (ln: True), default_vtab_processed.yml "
                "(AdamW, batch 64, 100 epochs, warm-up 10 epochs from 1e-6, lr_min 1e-5, drop_path_rate 0.1, "
                "normalized: False, final_acc_hp: True), lr_wd_vtab_processed.yml (lr 0.001, 0.01 x wd 0.0001, "
                "0.001), engine/trainer.py (timm CosineLRScheduler stepped scheduler.step(epoch) after each epoch), "
                "engine/optimizer.py (one AdamW group), experiment/build_loader.py (drop_last=True), "
                "experiment/run.py (grid trained on train800 and scored on val200 by the final accuracy; the best "
                "retrained on train800val200 and its final test accuracy reported; one seed, 42).",
    }
    recipe_differences = {
        "vtab": "its "
                "classifier initialisation was not checked (timm's used); PETL_Vision publishes only LN-tune's "
                "means, so there is no per-task row to compare with.",
        "fgvc": "no recipe: PETL_Vision's LN-tune runs are VTAB-1k (and other, non-FGVC) tasks.",
    }

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        for norm in backbone.layernorms:
            yield from norm.parameters()
        yield from backbone.head_parameters()

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Nothing to fold: the tuned LayerNorms are the plain model's own parameters."""
