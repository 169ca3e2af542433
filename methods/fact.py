"""FacT (Jie & Deng, "FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer", AAAI 2023).

FacT treats the weight updates of every q, k, v, o (``attn.proj``), fc1 and fc2 in all L blocks
as one tensor and factorises it. Every update is a branch in parallel with its frozen linear,
as in the official ``JieShibo/PETL-ViT`` ``FacT/fact_tt.py`` and ``fact_tk.py``:

    delta_y = s * V(dropout(core_l(U x)))

with U (r x dim) and V (dim x r) shared by all blocks and all positions. The per-layer cores:

- **FacT-TT** (tensor train): a learned r x r map for each of q, k, v, o, an r -> 4r map for
  fc1 (its 4r outputs are read as 4 groups of r, each lifted by V to one quarter of the hidden
  width) and a 4r -> r map for fc2 (the hidden input is cut into 4 groups of dim, each projected
  by U). ViT-B/16 at rank r: 2 * 768 r + 12 * 12 r^2.
- **FacT-TK** (Tucker): the 12 maps of block l are ``C x_3 P[:, 12l:12l+12]`` with a shared
  core C (r x r x r) and a factor P (r x 12L); fc1 and fc2 use four slices each, reshaped to
  (r, 4r) exactly as the official code does. ViT-B/16: 2 * 768 r + r^3 + 144 r.

Initialisation as the official code: U like ``nn.Linear`` (kaiming-uniform, a=sqrt(5)), V zero
(so the model starts as the pre-trained one), the TT maps like ``nn.Linear``, C and P
xavier-uniform. Dropout 0.1 on the r-dimensional activations; the scale s and the rank are
published per VTAB task (``configs/tt``, ``configs/tk``) and are the VTAB presets. With the
per-task ranks, the VTAB mean counts are 68,985 for TK (the published 0.07 M) and 39,734 for TT
(0.04 M; no published TT count was found in the sources read).
Outside the presets: r = 8 (TT) and r = 32 (TK), the ranks most tasks use, and s = 1.

Every branch is linear, so eval-mode FacT merges: delta_W is read off the branch applied to the
identity and added to the frozen weight.

Run side by side with the official ``set_FacT`` forwards on the same tensors (eval mode), the
outputs agree to 6e-7 (TT) and 2e-6 (TK) relative, merged or not.

Deliberate differences: none in the forward pass. The official code hard-codes width 768, depth
12 and an MLP ratio of 4; here they come from the backbone (the MLP ratio must be an integer).
The head is timm's (the official ``reset_classifier`` of timm 0.4.12 used PyTorch's default
Linear init).
Not defined on Swin (one U and V cannot be shared across stages of different width), and the
official code has no Swin version.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import add_to_weight_rows

from ._recipes import PETL_VIT_DIFFERENCES, PETL_VIT_VTAB

# Per-task (rank, scale) from FacT/configs/{tt,tk}/<task>.yaml (VTAB-1k).
_VTAB = {
    #  task:                 TT (rank, s)    TK (rank, s)
    "cifar": ((8, 1.0), (32, 0.1)),
    "caltech101": ((16, 10.0), (32, 10.0)),
    "dtd": ((8, 0.01), (16, 0.01)),
    "oxford_flowers102": ((16, 1.0), (32, 1.0)),
    "oxford_iiit_pet": ((8, 1.0), (16, 10.0)),
    "svhn": ((16, 100.0), (32, 100.0)),
    "sun397": ((8, 1.0), (16, 1.0)),
    "patch_camelyon": ((8, 10.0), (32, 10.0)),
    "eurosat": ((8, 100.0), (32, 100.0)),
    "resisc45": ((8, 0.1), (32, 10.0)),
    "diabetic_retinopathy": ((8, 1.0), (16, 1.0)),
    "clevr_count": ((16, 1.0), (32, 10.0)),
    "clevr_dist": ((4, 10.0), (16, 10.0)),
    "dmlab": ((16, 10.0), (32, 10.0)),
    "kitti": ((16, 10.0), (32, 10.0)),
    "dsprites_loc": ((16, 100.0), (32, 100.0)),
    "dsprites_ori": ((16, 1.0), (32, 1.0)),
    "smallnorb_azi": ((16, 100.0), (32, 100.0)),
    "smallnorb_ele": ((8, 10.0), (16, 10.0)),
}


def _linear_init(weight: torch.Tensor) -> None:
    """``nn.Linear``'s default weight init (kaiming-uniform with a=sqrt(5)) on each trailing 2-D map."""
    for w in weight.reshape(-1, *weight.shape[-2:]):
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))


class _FacT(nn.Module):
    """The shared U and V plus the per-layer cores; one bound method per adapted linear."""

    def __init__(self, dim: int, ratio: int, layers: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.dim, self.ratio, self.rank, self.scale, self.p = dim, ratio, rank, scale, dropout
        self.u = nn.Parameter(torch.empty(rank, dim))  # FacTu.weight
        _linear_init(self.u)
        self.v = nn.Parameter(torch.zeros(dim, rank))  # FacTv.weight, zero

    # ----------------------------------------------------------- per-layer maps (subclasses)
    def attn_map(self, layer: int, which: int) -> torch.Tensor:
        """(r, r) matrix M with ``core(z) = z @ M`` for q (0), k (1), v (2), o (3)."""
        raise NotImplementedError

    def fc1_map(self, layer: int) -> torch.Tensor:
        """(r, ratio * r) matrix M with ``core(z) = z @ M``."""
        raise NotImplementedError

    def fc2_map(self, layer: int) -> torch.Tensor:
        """(ratio * r, r) matrix M with ``core(z) = z @ M``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- branches
    def _drop(self, t: torch.Tensor, train: bool) -> torch.Tensor:
        return F.dropout(t, self.p, train)

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        return F.linear(t, self.v.to(t.dtype))

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.u.to(x.dtype))

    def qkv(self, layer: int, x: torch.Tensor, train: bool | None = None) -> torch.Tensor:
        train = self.training if train is None else train
        z = self._down(x)
        outs = [self._up(self._drop(z @ self.attn_map(layer, j).to(x.dtype), train)) for j in range(3)]
        return torch.cat(outs, dim=-1) * self.scale

    def proj(self, layer: int, x: torch.Tensor, train: bool | None = None) -> torch.Tensor:
        train = self.training if train is None else train
        z = self._down(x) @ self.attn_map(layer, 3).to(x.dtype)
        return self._up(self._drop(z, train)) * self.scale

    def fc1(self, layer: int, x: torch.Tensor, train: bool | None = None) -> torch.Tensor:
        train = self.training if train is None else train
        t = self._drop(self._down(x) @ self.fc1_map(layer).to(x.dtype), train)  # (..., ratio * r)
        t = self._up(t.reshape(*t.shape[:-1], self.ratio, self.rank))  # (..., ratio, dim)
        return t.reshape(*t.shape[:-2], self.ratio * self.dim) * self.scale

    def fc2(self, layer: int, x: torch.Tensor, train: bool | None = None) -> torch.Tensor:
        train = self.training if train is None else train
        h = self._down(x.reshape(*x.shape[:-1], self.ratio, self.dim))  # (..., ratio, r)
        z = h.reshape(*h.shape[:-2], self.ratio * self.rank) @ self.fc2_map(layer).to(x.dtype)
        return self._up(self._drop(z, train)) * self.scale

    @torch.no_grad()
    def delta(self, site: str, layer: int, width: int) -> torch.Tensor:
        """delta_W (out, in) of one linear: the dropout-free branch applied to the identity, in float64."""
        eye = torch.eye(width, dtype=torch.float64, device=self.u.device)
        return getattr(self, site)(layer, eye, train=False).t()


class _FacTTT(_FacT):
    def __init__(self, dim: int, ratio: int, layers: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__(dim, ratio, layers, rank, scale, dropout)
        # nn.Linear weights (out, in): q/k/v/proj_FacTs r->r, fc1_FacTs r->ratio*r, fc2_FacTs ratio*r->r.
        self.attn = nn.Parameter(torch.empty(layers, 4, rank, rank))
        self.mlp_in = nn.Parameter(torch.empty(layers, ratio * rank, rank))
        self.mlp_out = nn.Parameter(torch.empty(layers, rank, ratio * rank))
        for p in (self.attn, self.mlp_in, self.mlp_out):
            _linear_init(p)

    def attn_map(self, layer: int, which: int) -> torch.Tensor:
        return self.attn[layer, which].t()

    def fc1_map(self, layer: int) -> torch.Tensor:
        return self.mlp_in[layer].t()

    def fc2_map(self, layer: int) -> torch.Tensor:
        return self.mlp_out[layer].t()


class _FacTTK(_FacT):
    def __init__(self, dim: int, ratio: int, layers: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__(dim, ratio, layers, rank, scale, dropout)
        self.per_layer = 4 + 2 * ratio  # q, k, v, o, then `ratio` slices for fc1 and for fc2
        self.core = nn.Parameter(torch.empty(rank, rank, rank))  # FacTc
        self.factor = nn.Parameter(torch.empty(rank, self.per_layer * layers))  # FacTp
        nn.init.xavier_uniform_(self.core)
        nn.init.xavier_uniform_(self.factor)

    def _layer(self, layer: int) -> torch.Tensor:
        start = self.per_layer * layer
        return self.core @ self.factor[:, start:start + self.per_layer]  # (r, r, per_layer)

    def attn_map(self, layer: int, which: int) -> torch.Tensor:
        return self._layer(layer)[:, :, which]

    def fc1_map(self, layer: int) -> torch.Tensor:
        # FacTc[:, :, 4:8].reshape(dim, 4 dim) in the official code: column index = b * ratio + slice.
        return self._layer(layer)[:, :, 4:4 + self.ratio].reshape(self.rank, self.ratio * self.rank)

    def fc2_map(self, layer: int) -> torch.Tensor:
        return self._layer(layer)[:, :, 4 + self.ratio:].reshape(self.rank, self.ratio * self.rank).t()


class _FacTMethod(Method):
    families = frozenset({"vit", "deit_distilled"})
    family_refusals = {
        "eva": EVA_NO_QKV,
        "swin": "FacT shares one factorisation (U, V) across all blocks, which needs one width; Swin's stages "
                "differ in width",
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    mergeable = True
    bounded_by_width = frozenset({"rank"})
    kind: type[_FacT] = _FacT
    column = 0  # which entry of _VTAB
    hparams = {
        "rank": HParam(8, "rank r of the factorisation (dim in the official code; per-task VTAB presets)", low=1),
        "scale": HParam(1.0, "fixed scale s of every update (per-task VTAB presets)", low=0.0, low_exclusive=True),
        "dropout": HParam(0.1, "dropout on the r-dimensional activations (official: 0.1)", low=0.0, high=0.99),
    }
    recipes = {"vtab": {"*": dict(PETL_VIT_VTAB)}}
    recipe_source = {
        "vtab": "JieShibo/PETL-ViT: FacT/fact_tt.py and FacT/fact_tk.py (AdamW(FacT + head tensors, lr 1e-3, "
                "wd 1e-4), timm CosineLRScheduler(t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6) "
                "stepped scheduler.step(ep) after epoch ep, create_model(drop_path_rate=0.1), reset_classifier "
                "(PyTorch's default nn.Linear init), test evaluated when ep % 10 == 9 and the best kept), FacT/vtab.py "
                "(train800val200, batch 64, drop_last=True, Resize((224, 224)) bicubic, ImageNet mean/std), "
                "FacT/run.sh; per-task rank and scale from FacT/configs/{tt,tk}/*.yaml (hyperparameter presets); "
                "seed 42, one run.",
    }
    recipe_differences = {
        "vtab": PETL_VIT_DIFFERENCES,
        "fgvc": "no recipe: the FacT repository has VTAB-1k scripts only.",
    }

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: dict[str, Any]) -> dict[str, Any]:
        out = super().preset(suite, task, current)
        if suite == "vtab" and task in _VTAB:
            rank, scale = _VTAB[task][cls.column]
            out.update(rank=rank, scale=scale)
        return out

    def _shape(self, backbone: Backbone) -> tuple[int, int]:
        dim = backbone.blocks[0].dim
        hidden = backbone.blocks[0].fc1.out_features
        if any(b.dim != dim or b.fc1.out_features != hidden for b in backbone.blocks):
            raise PetlbenchError(f"method {self.name!r} needs blocks of one width (shared U and V).")
        if hidden % dim:
            raise PetlbenchError(
                f"method {self.name!r} needs an integer MLP ratio (hidden {hidden} / width {dim}); "
                "this backbone has none. Fix: use a standard ViT."
            )
        return dim, hidden // dim

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        dim, ratio = self._shape(backbone)
        fact = self.kind(dim, ratio, len(backbone.blocks), self.hp.rank, self.hp.scale, self.hp.dropout)
        petl["fact"] = fact
        for blk in backbone.blocks:
            for site in ("qkv", "proj", "fc1", "fc2"):
                backbone.add_parallel(getattr(blk, site), functools.partial(getattr(fact, site), blk.index))

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        fact = petl["fact"]
        for blk in backbone.blocks:
            for site in ("qkv", "proj", "fc1", "fc2"):
                linear = getattr(blk, site)
                add_to_weight_rows(linear, 0, fact.delta(site, blk.index, linear.in_features))


class FacTTT(_FacTMethod):
    name = "fact_tt"
    display_name = "FacT-TT"
    summary = "FacT-TT: all ViT weight updates as one tensor-train factorised tensor (shared U, V)."
    paper = "Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023"
    # The shipped reference table has no per-task FacT-TT rows yet (none found with provenance); once
    # it does, declare them here under their agreed name: {"vtab": "FacT (TT)"}.
    published: dict[str, str] = {}
    kind = _FacTTT
    column = 0


class FacTTK(_FacTMethod):
    name = "fact_tk"
    display_name = "FacT-TK"
    summary = "FacT-TK: all ViT weight updates as one Tucker-factorised tensor (shared U, V, core)."
    paper = "Jie & Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, AAAI 2023"
    published = {"vtab": "FacT (TK)"}
    kind = _FacTTK
    column = 1
    hparams = {**_FacTMethod.hparams,
               "rank": HParam(32, "rank r of the factorisation (dim in the official code; per-task VTAB presets)", low=1)}
