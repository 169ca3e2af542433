"""The backbone interface: roles of an *unmodified* timm model, and the only way methods touch it.

A method never looks up timm attribute names. It asks the :class:`Backbone` for roles
(blocks, the attention and MLP inputs after ``norm1``/``norm2``, the ``qkv``/``proj``/``fc1``/``fc2``
linears, the token sequence, the head) and changes behaviour only through hooks attached with
:meth:`Backbone.transform_input`, :meth:`Backbone.transform_output` and :meth:`Backbone.add_parallel`.
The timm module tree is therefore never restructured: the same classes, the same parameter
names, timm's fused attention (``scaled_dot_product_attention``) untouched. Merging a linear
method folds its parameters into the existing weights and removes the hooks, which leaves a plain
timm model by construction.

Families (:data:`FAMILIES`), each one timm class: ``vit`` (VisionTransformer: ViT, DeiT, CLIP with
its pre-norm, DINOv2 with registers and LayerScale, SigLIP's attention-pool head, MAE's average
pool), ``deit_distilled`` (a class and a distillation token, two heads averaged), ``eva`` (EVA-02:
RoPE, SwiGLU, split or bias-outside q/k/v, LayerScale), ``swin`` and ``convnext``. A role a model
does not have (a ConvNeXt block's attention, EVA-02's fused qkv module) raises a one-line
:class:`~petlbench.errors.PetlbenchError` saying why, never an AttributeError and never a stand-in
module whose hooks would silently not run. :meth:`Backbone.describe` lists what a model has.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from petlbench.errors import PetlbenchError

#: Backbone families: one timm model class each, described below by role. ``Method.families``
#: names the ones a method runs on; ``petlbench backbone describe`` shows a model's roles.
FAMILIES = ("vit", "deit_distilled", "eva", "swin", "convnext")
#: Families whose features are one token sequence (prefix tokens, then patches) through plain blocks.
TOKEN_FAMILIES = frozenset({"vit", "deit_distilled", "eva"})

#: What each family is (shown in messages and by ``petlbench backbone describe``).
FAMILY_SUMMARY = {
    "vit": "timm VisionTransformer: ViT, DeiT, DeiT-III, CLIP (pre-norm), DINOv2 (registers, LayerScale), "
           "SigLIP (attention-pool head), MAE (average pool)",
    "deit_distilled": "timm VisionTransformerDistilled: distilled DeiT (class + distillation token, two heads "
                      "averaged)",
    "eva": "timm Eva: EVA-02, EVA, DINOv3, PE, RoPE ViTs (RoPE, SwiGLU MLP, fused or split q/k/v, LayerScale)",
    "swin": "timm SwinTransformer",
    "convnext": "timm ConvNeXt (a convolutional network: no attention, no tokens)",
}

#: Why a method that adapts attention projections or the MLP's input linear is refused on EVA-02 and
#: ConvNeXt; methods name these in their ``family_refusals`` (or their own reason where it differs).
EVA_NO_QKV = ("EVA-02 has no qkv module to adapt: Base and Large split q, k and v into three linears, Tiny and "
              "Small apply the fused weight with F.linear beside separate q/v biases (the qkv module never runs), "
              "and its MLP is gated (SwiGLU)")
CONVNEXT_NO_ATTENTION = ("ConvNeXt blocks have no attention and no token sequence (a depthwise convolution mixes "
                         "the tokens)")
ROPE_NO_EXTRA_TOKENS = ("EVA-02 rotates every query and key after the prefix tokens by its patch's grid position "
                        "(RoPE), so tokens inserted into the sequence have no position to be rotated by")

#: The timm modules whose architectures :func:`petlbench.model.supported_backbones` lists, per family.
FAMILY_MODULES = {
    "vit": ("vision_transformer", "deit"),
    "deit_distilled": ("deit",),
    "eva": ("eva",),
    "swin": ("swin_transformer",),
    "convnext": ("convnext",),
}


@functools.cache
def _family_classes() -> dict[type, str]:
    from timm.models.convnext import ConvNeXt
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    # Exact classes: a subclass (VisionTransformerDistilled is one of VisionTransformer) changes
    # the token sequence or the head in ways its parent's roles do not describe.
    return {VisionTransformer: "vit", VisionTransformerDistilled: "deit_distilled", Eva: "eva",
            SwinTransformer: "swin", ConvNeXt: "convnext"}


def family_of(model: nn.Module) -> str | None:
    """The family of a timm model (by its exact class), or None when petlbench does not describe it."""
    return _family_classes().get(type(model))



#: Block roles, in the order ``describe`` lists them.
BLOCK_ROLES = ("num_heads", "norm1", "attn", "qkv", "q", "k", "v", "proj", "norm2", "mlp", "fc1", "fc2")


class BlockRoles:
    """One block, by role.

    ``attn`` and ``mlp`` are the modules whose *input* is the attention-input / MLP-input position
    (the output of ``norm1`` / ``norm2``); hooking their input is exactly "after the LayerNorm,
    before qkv / fc1", the place ARC and RepAdapter adapt. ``stage`` groups blocks of equal width
    (always 0 for ViT, DeiT and EVA; the Swin or ConvNeXt stage otherwise).

    A role the block does not have (``qkv`` of EVA-02's split q/k/v, ``attn`` of a ConvNeXt block)
    raises a one-line :class:`PetlbenchError` saying why; :meth:`has` asks without raising.
    LayerScale is optional by nature: ``ls_attn``/``ls_mlp`` are None where there is none.
    """

    __slots__ = ("index", "stage", "dim", "block", "ls_attn", "ls_mlp", "qkv_fused", "mlp_gated", "_roles",
                 "_why", "_where")

    def __init__(self, *, index: int, stage: int, dim: int, block: nn.Module, roles: dict[str, Any],
                 why: dict[str, str], where: str, ls_attn: nn.Parameter | None = None,
                 ls_mlp: nn.Parameter | None = None, qkv_fused: bool | None = None, mlp_gated: bool = False) -> None:
        self.index, self.stage, self.dim, self.block = index, stage, dim, block
        #: The per-channel gamma (dim,) of the LayerScale on the attention / MLP branch, or None.
        self.ls_attn, self.ls_mlp = ls_attn, ls_mlp
        #: True: q, k and v come from one linear; False: three (q/k/v roles); None: no attention.
        self.qkv_fused = qkv_fused
        #: True when the MLP is gated (SwiGLU): hidden = act(gate) * value, not act(fc1(x)).
        self.mlp_gated = mlp_gated
        self._roles, self._why, self._where = roles, why, where

    def has(self, role: str) -> bool:
        return role in self._roles

    def _get(self, role: str) -> Any:
        try:
            return self._roles[role]
        except KeyError:
            why = self._why.get(role, "this block type does not have it")
            raise PetlbenchError(f"{self._where} block {self.index} has no {role!r}: {why}. Fix: choose a method "
                                 "that runs on this backbone (see `petlbench backbone describe`).") from None

    @property
    def num_heads(self) -> int:
        return self._get("num_heads")

    @property
    def norm1(self) -> nn.Module:
        """The norm before attention (its output is the attention input)."""
        return self._get("norm1")

    @property
    def attn(self) -> nn.Module:
        """The attention module; its first input is the output of ``norm1``."""
        return self._get("attn")

    @property
    def qkv(self) -> nn.Linear:
        """The fused q/k/v linear (output rows q, k, v), run as a module (hooks on it fire)."""
        return self._get("qkv")

    @property
    def q(self) -> nn.Linear:
        """The query linear where q, k and v are separate linears."""
        return self._get("q")

    @property
    def k(self) -> nn.Linear:
        return self._get("k")

    @property
    def v(self) -> nn.Linear:
        return self._get("v")

    @property
    def proj(self) -> nn.Linear:
        """The attention output projection."""
        return self._get("proj")

    @property
    def norm2(self) -> nn.Module:
        """The norm before the MLP (its output is the MLP input)."""
        return self._get("norm2")

    @property
    def mlp(self) -> nn.Module:
        """The MLP; its first input is the output of ``norm2``."""
        return self._get("mlp")

    @property
    def fc1(self) -> nn.Linear:
        """The MLP's input linear (for a packed gated MLP, gate and value rows in one linear)."""
        return self._get("fc1")

    @property
    def fc2(self) -> nn.Linear:
        """The MLP's output linear."""
        return self._get("fc2")

    def __repr__(self) -> str:
        return f"BlockRoles(index={self.index}, stage={self.stage}, dim={self.dim}, roles={sorted(self._roles)})"


def _linear(module: nn.Module, attr: str, where: str) -> nn.Linear:
    layer = getattr(module, attr, None)
    if not isinstance(layer, nn.Linear):
        raise PetlbenchError(
            f"backbone block {where} has no nn.Linear {attr!r} (found {type(layer).__name__}); this timm "
            "variant is not supported. Fix: use a standard ViT/DeiT/Swin architecture (`petlbench list backbones`)."
        )
    return layer


def _gamma(ls: Any) -> nn.Parameter | None:
    """LayerScale's per-channel gamma, whether timm holds it as a module (ViT ``ls1``) or a parameter (EVA)."""
    if isinstance(ls, nn.Parameter):
        return ls
    gamma = getattr(ls, "gamma", None)
    return gamma if isinstance(gamma, nn.Parameter) else None


@functools.cache
def _non_layernorm_norms() -> tuple[type, ...]:
    """timm's affine token norms that are not LayerNorms (RMSNorm and its kin), by class."""
    import timm.layers as layers

    names = ("RmsNorm", "RmsNormFp32", "RmsNorm2d", "RmsNorm2dFp32", "SimpleNorm", "SimpleNormFp32",
             "SimpleNorm2d", "SimpleNorm2dFp32")
    return tuple(cls for cls in (getattr(layers, n, None) for n in names) if isinstance(cls, type))


def _qkv_bypassed(attn: nn.Module) -> bool:
    """EVA's fused attention with q/v biases multiplies by ``qkv.weight`` with ``F.linear`` and never
    calls the ``qkv`` module, unless timm is told to add the biases separately."""
    from timm.models.eva import EvaAttention

    return type(attn) is EvaAttention and attn.qkv is not None and attn.q_bias is not None \
        and not attn.qkv_bias_separate


def _transformer_block(index: int, stage: int, blk: nn.Module, where: str) -> BlockRoles:
    """A pre-norm block ``x + ls(attn(norm1(x)))``, ``x + ls(mlp(norm2(x)))`` (ViT, Swin, EVA)."""
    attn, mlp = blk.attn, blk.mlp
    roles: dict[str, Any] = {"norm1": blk.norm1, "attn": attn, "norm2": blk.norm2, "mlp": mlp,
                             "num_heads": int(attn.num_heads), "proj": _linear(attn, "proj", str(index))}
    why: dict[str, str] = {}
    qkv = getattr(attn, "qkv", None)
    fused: bool | None = None
    if isinstance(qkv, nn.Linear):
        fused = True
        why.update(dict.fromkeys(("q", "k", "v"), "q, k and v are one fused linear (role 'qkv')"))
        if _qkv_bypassed(attn):
            why["qkv"] = ("its q/k/v biases live outside the fused linear (q_bias, v_bias) and timm applies qkv.weight "
                          "with F.linear, so the qkv module never runs and a hook on it would be silently skipped")
        else:
            roles["qkv"] = qkv
    elif all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        fused = False
        roles.update(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj)
        why["qkv"] = "q, k and v are separate linears (roles 'q', 'k', 'v'), there is no fused qkv linear"
    else:
        why.update(dict.fromkeys(("qkv", "q", "k", "v"),
                                 f"its attention ({type(attn).__name__}) has no q/k/v linears"))
    roles["fc2"] = _linear(mlp, "fc2", str(index))
    gated = False
    if isinstance(getattr(mlp, "fc1_g", None), nn.Linear):
        gated = True
        why["fc1"] = ("its MLP is gated (SwiGLU) with two input linears, fc1_g (gate) and fc1_x (value), "
                      "not one fc1")
    else:
        from timm.layers.mlp import GluMlp

        roles["fc1"] = _linear(mlp, "fc1", str(index))
        gated = isinstance(mlp, GluMlp)
    ls_attn, ls_mlp = (_gamma(getattr(blk, vit, None) if hasattr(blk, vit) else getattr(blk, eva, None))
                       for vit, eva in (("ls1", "gamma_1"), ("ls2", "gamma_2")))
    return BlockRoles(index=index, stage=stage, dim=roles["proj"].out_features, block=blk, roles=roles, why=why,
                      where=where, ls_attn=ls_attn, ls_mlp=ls_mlp, qkv_fused=fused, mlp_gated=gated)


def _convnext_block(index: int, stage: int, blk: nn.Module, where: str) -> BlockRoles:
    """``x + gamma * mlp(norm(conv_dw(x)))``: the norm and MLP play norm2 and mlp; no attention."""
    roles: dict[str, Any] = {"norm2": blk.norm, "mlp": blk.mlp}
    why = dict.fromkeys(("num_heads", "norm1", "attn", "qkv", "q", "k", "v", "proj"), CONVNEXT_NO_ATTENTION)
    for name in ("fc1", "fc2"):
        layer = getattr(blk.mlp, name, None)
        if isinstance(layer, nn.Linear):
            roles[name] = layer
        else:
            why[name] = f"its MLP uses 1x1 convolutions ({type(layer).__name__}), not linears (conv_mlp=True)"
    dim = int(blk.conv_dw.out_channels)
    return BlockRoles(index=index, stage=stage, dim=dim, block=blk, roles=roles, why=why, where=where,
                      ls_mlp=_gamma(blk.gamma), qkv_fused=None)


def _unknown_block(index: int, stage: int, blk: nn.Module, dim: int, where: str) -> BlockRoles:
    why = dict.fromkeys(BLOCK_ROLES, f"it is a {type(blk).__name__}, not a pre-norm block whose roles petlbench "
                                     "describes (e.g. a post-norm or parallel block)")
    return BlockRoles(index=index, stage=stage, dim=dim, block=blk, roles={}, why=why, where=where)


class _TwoTokenHeads(nn.Module):
    """Distilled DeiT's classifier as timm runs it outside distillation training: the class-token
    head and the distillation-token head each read their own token; their logits are averaged.
    Holds references to the model's own heads (it is never registered in the model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head, self.head_dist, self.drop = model.head, model.head_dist, model.head_drop

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: (B, 2, D), the class and distillation tokens after the final norm."""
        return (self.head(self.drop(tokens[:, 0])) + self.head_dist(self.drop(tokens[:, 1]))) / 2


class Backbone:
    """Role view over a timm model of a supported family; cheap to build, holds no state of its own."""

    def __init__(self, model: nn.Module, arch: str = "") -> None:
        family = family_of(model)
        if family is None:
            raise PetlbenchError(
                f"backbone {arch or type(model).__name__!r} is a {type(model).__name__}; petlbench describes timm "
                "VisionTransformer (ViT, DeiT, CLIP, DINOv2, SigLIP, MAE), VisionTransformerDistilled, Eva (EVA-02), "
                "SwinTransformer and ConvNeXt models. Fix: pick one from `petlbench list backbones`."
            )
        self.model = model
        self.arch = arch
        self.family = family
        self.blocks: list[BlockRoles] = list(self._collect_blocks())

    # ----------------------------------------------------------------- roles
    @property
    def _where(self) -> str:
        return f"backbone {self.arch or type(self.model).__name__!r} ({self.family})"

    def _missing(self, role: str, why: str) -> PetlbenchError:
        return PetlbenchError(f"{self._where} has no {role}: {why}. Fix: choose a method that runs on this backbone "
                              "(see `petlbench backbone describe`).")

    def _collect_blocks(self) -> Iterator[BlockRoles]:
        from timm.models.eva import EvaBlock
        from timm.models.swin_transformer import SwinTransformerBlock
        from timm.models.vision_transformer import Block

        if self.family in TOKEN_FAMILIES:
            stages = [self.model.blocks]
        else:
            stages = [stage.blocks for stage in (self.model.layers if self.family == "swin" else self.model.stages)]
        where = self._where
        index = 0
        for stage_idx, blocks in enumerate(stages):
            for blk in blocks:
                if type(blk) in (Block, SwinTransformerBlock, EvaBlock):
                    yield _transformer_block(index, stage_idx, blk, where)
                elif self.family == "convnext":
                    yield _convnext_block(index, stage_idx, blk, where)
                else:
                    yield _unknown_block(index, stage_idx, blk, int(self.model.num_features), where)
                index += 1

    def has(self, role: str) -> bool:
        """Whether the backbone has ``role`` (an attribute of this class), without raising."""
        try:
            getattr(self, role)
        except PetlbenchError:
            return False
        return True

    @property
    def heads(self) -> list[nn.Linear]:
        """Every classifier linear: one, or distilled DeiT's class-token and distillation-token heads."""
        model = self.model
        if self.family in ("swin", "convnext"):
            heads = [model.head.fc]
        elif self.family == "deit_distilled":
            heads = [model.head, model.head_dist]
        else:
            heads = [model.head]
        if not all(isinstance(h, nn.Linear) for h in heads):
            raise PetlbenchError(f"backbone {self.arch!r} has no linear classifier head; create it with num_classes >= 1.")
        return heads

    @property
    def head(self) -> nn.Linear:
        """The classifier: a fresh ``nn.Linear(feature_dim, num_classes)`` (distilled DeiT: the
        class-token head; :attr:`heads` lists both)."""
        return self.heads[0]

    @property
    def head_tokens(self) -> int:
        """How many leading tokens the heads read, one token each (distilled DeiT: 2); 0 when the
        classifier reads one pooled feature vector."""
        return 2 if self.family == "deit_distilled" else 0

    @property
    def classifier(self) -> nn.Module:
        """Maps the pre-logit features (:meth:`petlbench.model.PETLModel.forward_features`) to the
        logits: the head itself, or for distilled DeiT both heads on their tokens, averaged."""
        if self.family == "deit_distilled":
            return _TwoTokenHeads(self.model)
        return self.head

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def patch_embed(self) -> nn.Module:
        """Patch embedding; its output is channels-last tokens ((B,N,C) for ViT/DeiT/EVA, (B,H,W,C) for Swin)."""
        if self.family == "convnext":
            raise self._missing("patch embedding with token outputs", "its stem outputs a channels-first feature "
                                "map (roles patch_proj and patch_norm are its convolution and norm)")
        return self.model.patch_embed

    @property
    def patch_proj(self) -> nn.Conv2d:
        """The patch-embedding convolution (ConvNeXt: the patchify stem's); its output is
        channels-first (B, C, H, W), before any patch-embedding norm."""
        proj = self.model.stem[0] if self.family == "convnext" else self.model.patch_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise self._missing("patch-embedding convolution", f"its stem starts with a {type(proj).__name__}")
        return proj

    @property
    def patch_norm(self) -> nn.Module | None:
        """The LayerNorm inside the patch embedding (ConvNeXt: after the stem convolution), or None."""
        if self.family == "convnext":
            stem = list(self.model.stem)
            return stem[1] if len(stem) == 2 and isinstance(stem[1], nn.LayerNorm) else None
        norm = self.model.patch_embed.norm
        return None if isinstance(norm, nn.Identity) else norm

    @property
    def downsample_norms(self) -> list[nn.LayerNorm]:
        """The LayerNorm of each downsampling layer, in stage order. Swin: of each patch merging (its
        output has 4x the previous stage's channels and feeds the merging projection); ConvNeXt:
        before each strided downsampling convolution. ViT, DeiT, EVA: none."""
        if self.family == "swin":
            downsamples = [getattr(stage.downsample, "norm", None) for stage in self.model.layers]
        elif self.family == "convnext":
            downsamples = [stage.downsample[0] if isinstance(stage.downsample, nn.Sequential) else None
                           for stage in self.model.stages]
        else:
            return []
        return [norm for norm in downsamples if isinstance(norm, nn.LayerNorm)]

    @property
    def layernorms(self) -> list[nn.LayerNorm]:
        """Every LayerNorm of the backbone, found by type: each block's norms, the final and pooled-
        feature norms; Swin and ConvNeXt also the stem and downsampling norms. The head has none.
        A backbone that normalises with something else (RMSNorm) says so in one line, rather than
        hand out a list that silently leaves its norms out."""
        other = next((m for m in self.model.modules() if isinstance(m, _non_layernorm_norms())), None)
        if other is not None:
            raise self._missing("LayerNorm-only normalisation", f"it normalises with {type(other).__name__} too")
        return [m for m in self.model.modules() if isinstance(m, nn.LayerNorm)]

    @property
    def patch_size(self) -> int:
        return int(self.patch_proj.kernel_size[0])

    @property
    def in_chans(self) -> int:
        return int(self.patch_proj.in_channels)

    @property
    def final_norm(self) -> nn.Module:
        """The module whose input is the last block's output, normalised before pooling: the final
        LayerNorm, or an Identity where the model normalises after pooling instead (MAE-style
        average pooling with fc_norm, ConvNeXt's head norm)."""
        return self.model.norm_pre if self.family == "convnext" else self.model.norm

    def _require_tokens(self, what: str) -> None:
        if self.family not in TOKEN_FAMILIES:
            raise self._missing(what, "its features are a spatial map through stages, not one token sequence "
                                f"(families with one: {', '.join(sorted(TOKEN_FAMILIES))})")

    @property
    def token_site(self) -> nn.Module:
        """ViT, DeiT, EVA: the module whose output is the token sequence (prefix tokens + patches, with
        absolute position embeddings) right before block 0. An output transform here may add tokens. Its
        input is the same sequence before the pre-norm (:attr:`norm_pre`, when there is one): a
        delta on the class token or position embedding folds into them only when made there."""
        self._require_tokens("token sequence")
        return self.model.norm_pre

    @property
    def cls_token(self) -> nn.Parameter | None:
        """The learned class token (1, 1, dim) that starts the token sequence, or None when the model
        has none (Swin, ConvNeXt: never). A method that tunes it adds a delta at :attr:`token_site`."""
        token = getattr(self.model, "cls_token", None) if self.family in TOKEN_FAMILIES else None
        return token if isinstance(token, nn.Parameter) else None

    @property
    def dist_token(self) -> nn.Parameter | None:
        """Distilled DeiT: the distillation token (1, 1, dim), second in the sequence; else None."""
        token = getattr(self.model, "dist_token", None) if self.family == "deit_distilled" else None
        return token if isinstance(token, nn.Parameter) else None

    @property
    def reg_token(self) -> nn.Parameter | None:
        """The register tokens (1, R, dim) after the class token (DINOv2 and EVA with registers), or None."""
        token = getattr(self.model, "reg_token", None) if self.family in ("vit", "eva") else None
        return token if isinstance(token, nn.Parameter) else None

    @property
    def prefix_tokens(self) -> list[str]:
        """The tokens before the patches, in sequence order: ``"cls"``, ``"dist"``, ``"reg"`` (one entry each)."""
        self._require_tokens("prefix tokens")
        names = ["cls"] if self.cls_token is not None else []
        if self.dist_token is not None:
            names.append("dist")
        if self.reg_token is not None:
            names += ["reg"] * self.reg_token.shape[1]
        if len(names) != self.num_prefix_tokens:
            raise self._missing("known prefix tokens", f"it starts the sequence with {self.num_prefix_tokens} "
                                f"tokens, of which petlbench knows {len(names)}")
        return names

    @property
    def num_prefix_tokens(self) -> int:
        """Class, distillation and register tokens at the start of the sequence."""
        self._require_tokens("prefix tokens")
        return int(self.model.num_prefix_tokens)

    @property
    def rope(self) -> bool:
        """Whether attention rotates queries and keys by position (RoPE, EVA-02): a token's place in
        the sequence then matters, so tokens inserted among the patches would be rotated wrongly."""
        return self.family == "eva" and getattr(self.model, "rope", None) is not None

    @property
    def pooling(self) -> str:
        """How this backbone pools tokens into the classifier input, as recorded with each run.

        ``"cls_token"``: the class token after the final norm (timm ViT ``global_pool='token'``);
        ``"avg"``: the mean of the (patch) tokens after the final norm (Swin, ConvNeXt, ViT ``'avg'``);
        ``"cls_and_dist_tokens"``: distilled DeiT, one head per token, logits averaged;
        other timm pools by their timm name. A method that changes the pooling says so in
        :attr:`~petlbench.method.Method.pooling`.
        """
        if self.family == "swin":
            return "avg"
        if self.family == "convnext":
            return str(getattr(self.model.head.global_pool, "pool_type", "avg") or "none")
        if self.family == "deit_distilled":
            return "cls_and_dist_tokens"
        pool = str(getattr(self.model, "global_pool", "token") or "none")
        return "cls_token" if pool == "token" else pool

    # ------------------------------------------------ ViT variants: pre-norm, pooling heads, token grid
    # The order of operations of a timm ViT, which every merge must respect:
    #   patch_embed -> [prefix tokens, + pos_embed] -> norm_pre -> blocks -> final_norm -> pool
    #   (class token / mean of patch tokens / attn_pool) -> fc_norm -> head
    # A delta folded into a tensor on the left of a LayerNorm is NOT the same delta on its right.
    @property
    def norm_pre(self) -> nn.LayerNorm | None:
        """The LayerNorm over the whole token sequence (prefix tokens and patches, position
        embeddings added) before block 0, or None (timm's Identity). CLIP-style ViTs have one
        (``pre_norm=True``); a change to the class token or the position embedding then passes
        through it, so it folds into ``cls_token``/``pos_embed`` only when made at its input."""
        norm = getattr(self.model, "norm_pre", None) if self.family in TOKEN_FAMILIES else None
        return norm if isinstance(norm, nn.LayerNorm) else None

    @property
    def fc_norm(self) -> nn.LayerNorm | None:
        """The LayerNorm on the pooled features, after pooling and before the head (MAE-style
        ``global_pool='avg'``, where :attr:`final_norm` is then an Identity), or None. It is the
        last norm of such a backbone, where methods that adapt "the final norm" act."""
        if self.family == "convnext":  # its head: pool, norm, then the classifier linear
            norm = getattr(getattr(self.model, "head", None), "norm", None)
        else:
            norm = getattr(self.model, "fc_norm", None) if self.family in TOKEN_FAMILIES else None
        return norm if isinstance(norm, nn.LayerNorm) else None

    @property
    def last_norm(self) -> nn.LayerNorm | None:
        """The last LayerNorm before the classifier: :attr:`final_norm` (on the token sequence,
        before pooling) when it is one, else :attr:`fc_norm` (on the pooled features), else None."""
        final = self.final_norm
        return final if isinstance(final, nn.LayerNorm) else self.fc_norm

    @property
    def attn_pool(self) -> nn.Module | None:
        """The learned attention-pooling head (SigLIP's ``global_pool='map'``: a latent query,
        attention over the tokens after :attr:`final_norm`, its own LayerNorm and MLP), or None.
        It sits between the final norm and the classifier and is part of the pretrained backbone:
        it is frozen unless a method's rule covers it (see docs/backbone-methods.md)."""
        pool = getattr(self.model, "attn_pool", None) if self.family in TOKEN_FAMILIES else None
        return pool if isinstance(pool, nn.Module) else None

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch-token grid (H, W) the patch embedding produces for the input size the backbone
        was built for (``img_size``, which may be non-square). A backbone built with
        ``dynamic_img_size`` takes other sizes too; a method that needs the grid of the input
        being processed keeps a :class:`TokenGrid` and passes it to :meth:`track_grid`."""
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is None:  # ConvNeXt: a convolutional stem, no fixed token grid
            raise PetlbenchError(f"backbone {self.arch!r} ({self.family}) has no patch-token grid.")
        h, w = grid
        return int(h), int(w)

    def track_grid(self, grid: TokenGrid) -> None:
        """Keep ``grid.size`` equal to the token grid of the input being processed: set from the
        patch embedding's output at every forward (its (B, H, W, C) shape when the backbone takes
        dynamic sizes; :attr:`grid_size` otherwise, where timm enforces the built size)."""
        grid.size = self.grid_size
        self.transform_output(self.patch_embed, grid.observe)

    @property
    def patch_position_embedding(self) -> torch.Tensor | None:
        """The learned position embedding of the patch positions, a (1, H*W, C) view of timm's
        ``pos_embed`` (without the prefix-token rows), or None when the backbone has none. It is
        added right after the patch embedding, so a per-channel shift of the patch-embedding output
        folds into it (in place, under ``no_grad``): how a shift after a bias-less patch embedding
        (CLIP) merges. For dynamic input sizes timm resamples it by interpolation, which keeps a
        constant shift constant."""
        pos = getattr(self.model, "pos_embed", None) if self.family in TOKEN_FAMILIES else None
        if not isinstance(pos, nn.Parameter):
            return None
        return pos[:, 0 if getattr(self.model, "no_embed_class", False) else self.num_prefix_tokens:]

    def bias_argument(self, layer: nn.Module) -> str | None:
        """The timm constructor argument that gives ``layer`` a bias, when ``layer`` is a block
        linear built without one: ``qkv_bias`` for qkv, ``proj_bias`` for proj, fc1 and fc2 of a
        ViT (timm ties the MLP biases to it); None for any other layer. A merge that must add a
        bias to such a layer adds it to every layer of that argument, so the merged model is the
        plain timm model built with that argument set to True."""
        for b in self.blocks:  # EVA-02 and ConvNeXt blocks lack some of these roles
            if b.has("qkv") and layer is b.qkv:
                return "qkv_bias"
            if self.family == "vit" and any(b.has(r) and layer is getattr(b, r) for r in ("proj", "fc1", "fc2")):
                return "proj_bias"
        return None

    def bias_group(self, argument: str) -> list[nn.Linear]:
        """Every layer whose bias the timm constructor argument ``argument`` switches (see
        :meth:`bias_argument`)."""
        return [getattr(b, r) for b in self.blocks for r in ("qkv", "proj", "fc1", "fc2")
                if b.has(r) and self.bias_argument(getattr(b, r)) == argument]

    def require(self, family: str | Iterable[str], what: str) -> None:
        families = {family} if isinstance(family, str) else set(family)
        if self.family not in families:
            raise PetlbenchError(f"backbone {self.arch!r} ({self.family}) has no {what}; only "
                                 f"{', '.join(sorted(families))} backbones do.")

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for head in self.heads for p in head.parameters()]

    def body_parameters(self) -> list[nn.Parameter]:
        """Every backbone parameter except the heads'."""
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.model.parameters() if id(p) not in head]

    def modules_with_bias(self) -> Iterator[tuple[nn.Module, nn.Parameter]]:
        """(module, bias) for every additive bias of the body, heads excluded: each module's ``bias``
        parameter, and EVA's attention q/v biases (``q_bias``, ``v_bias``: the key has none)."""
        from timm.models.eva import EvaAttention

        heads = {id(h) for h in self.heads}
        for module in self.model.modules():
            if id(module) in heads:
                continue
            bias = module._parameters.get("bias")
            if isinstance(bias, nn.Parameter):
                yield module, bias
            if type(module) is EvaAttention:
                for name in ("q_bias", "v_bias"):
                    extra = module._parameters.get(name)
                    if isinstance(extra, nn.Parameter):
                        yield module, extra

    # ----------------------------------------------------------------- description
    def describe(self) -> dict[str, Any]:
        """Which roles this model has and what they are, as plain data (``petlbench backbone describe``).

        ``roles`` maps each structural role to its value here (None: the model does not have it);
        ``absent`` says in one line why each block or backbone role a method may ask for is missing.
        """
        model, blocks = self.model, self.blocks
        first = blocks[0] if blocks else None
        tokens = self.family in TOKEN_FAMILIES

        if tokens:
            absolute = getattr(model, "pos_embed", None) is not None
            position = " + ".join([p for p, on in (("absolute", absolute), ("rope", self.rope)) if on]) or "none"
        else:
            position = "relative (windows)" if self.family == "swin" else "none (convolutional)"
        mlp = None
        if first is not None and first.has("mlp"):
            if not first.has("fc1"):
                mlp = "gated, split fc1_g/fc1_x" if first.mlp_gated else "convolutional"
            else:
                mlp = "gated, packed fc1" if first.mlp_gated else "plain"
        qkv = None
        if first is not None and first.qkv_fused is not None:
            qkv = "split q/k/v" if not first.qkv_fused else ("fused" if first.has("qkv") else "fused, biases outside")
        norms = sorted({type(b._roles[r]).__name__ for b in blocks for r in ("norm1", "norm2") if b.has(r)})
        roles: dict[str, Any] = {
            "blocks": len(blocks),
            "stages": len({b.stage for b in blocks}),
            "widths": list(dict.fromkeys(b.dim for b in blocks)),
            "token_prefix": self.prefix_tokens if tokens else None,
            "position": position,
            "pre_norm": self.norm_pre is not None,
            "final_norm": isinstance(self.final_norm, nn.LayerNorm),
            "pooling": self.pooling,
            "fc_norm": self.fc_norm is not None,
            "attn_pool": self.attn_pool is not None,
            "heads": len(self.heads),
            "qkv": qkv,
            "qkv_bias": self._qkv_bias(),
            "mlp": mlp,
            "layer_scale": any(b.ls_attn is not None or b.ls_mlp is not None for b in blocks),
            "block_norm": norms[0] if len(norms) == 1 else norms,
            "patch_size": self.patch_size if self.has("patch_proj") else None,
            "grid": list(self.grid_size) if self.has("grid_size") else None,
        }
        absent: dict[str, str] = {}
        for role in ("patch_embed", "token_site", "num_prefix_tokens", "layernorms"):
            try:
                getattr(self, role)
            except PetlbenchError as exc:
                absent[role] = str(exc).split(": ", 1)[-1].split(". Fix:")[0]
        if first is not None:
            for role in BLOCK_ROLES:
                if not first.has(role):
                    absent[f"block.{role}"] = first._why.get(role, "")
        return {"arch": self.arch, "family": self.family, "model_class": f"{type(model).__module__}."
                f"{type(model).__qualname__}", "summary": FAMILY_SUMMARY[self.family], "roles": roles,
                "absent": absent}

    def _qkv_bias(self) -> bool | None:
        """Whether the attention's q/k/v projections add a bias (None without attention)."""
        first = self.blocks[0] if self.blocks else None
        if first is None or first.qkv_fused is None:
            return None
        attn = first.attn
        if first.has("q"):
            return first.q.bias is not None
        return attn.qkv.bias is not None or getattr(attn, "q_bias", None) is not None

    # ----------------------------------------------------------------- hooks
    def transform_input(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace ``module``'s first positional input ``x`` by ``fn(x)`` (other arguments pass through)."""
        module.register_forward_pre_hook(_InputHook(_checked(fn)))

    def transform_output(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace ``module``'s output ``y`` by ``fn(y)``."""
        module.register_forward_hook(_OutputHook(_checked(fn)))

    def add_parallel(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace ``module``'s output ``y`` by ``y + fn(x)``: a branch in parallel with ``module``."""
        module.register_forward_hook(_ParallelHook(_checked(fn)))

    def transform_branch(
        self, block: BlockRoles, position: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        """Replace a sub-layer's residual update ``h + b`` by ``h + fn(h, b)``.

        ``position`` is ``"attn"`` or ``"mlp"``; ``h`` is the residual stream entering that
        sub-layer (the input of ``norm1``/``norm2``) and ``b`` is what the sub-layer adds to it
        (after layer scale and stochastic depth). This is where adapters that sit on the residual
        stream act: ``fn(h, b) = b + f(h)`` runs parallel to the whole sub-layer (AdaptFormer),
        ``b + f(b)`` adapts its output (Houlsby), ``b + f(h + b)`` adapts the stream after it
        (a post-block adapter when ``position="mlp"``). ``h`` is held only between the norm and
        the end of the sub-layer.
        """
        if position not in ("attn", "mlp"):
            raise PetlbenchError(f"transform_branch: position must be 'attn' or 'mlp', got {position!r}.")
        from timm.models.eva import EvaBlock
        from timm.models.swin_transformer import SwinTransformerBlock
        from timm.models.vision_transformer import Block

        # Only the pre-norm blocks ``x + drop_path(ls(sublayer(norm(x))))`` have h = the norm's input.
        if type(block.block) not in (Block, SwinTransformerBlock, EvaBlock):
            raise PetlbenchError(
                f"backbone {self.arch!r} block {block.index} is a {type(block.block).__name__}, not timm's pre-norm "
                "Block/SwinTransformerBlock/EvaBlock, so its residual branches are not where this method acts. Fix: "
                "use a standard ViT/DeiT/EVA/Swin architecture."
            )
        norm = block.norm1 if position == "attn" else block.norm2
        branch = block.block.drop_path1 if position == "attn" else block.block.drop_path2
        fn = _checked(fn)
        cell = _Cell()
        norm.register_forward_pre_hook(_StashHook(fn, cell))
        branch.register_forward_hook(_BranchHook(fn, cell))

    # ----------------------------------------------------------------- build settings
    def set_mlp_dropout(self, p: float) -> None:
        """Dropout ``p`` after the MLP activation and after ``fc2`` in every block, nothing else.

        timm's ``proj_drop_rate`` also drops after the attention projection; ARC's ViT (its FGVC
        ``--vit_drop``) drops only inside the MLP (and after the embeddings, timm's
        ``pos_drop_rate``). timm's ``Mlp`` already holds both dropout modules (``p=0`` unless
        built otherwise), so this sets their rate and leaves the module tree unchanged.
        """
        if not 0.0 <= p < 1.0:
            raise PetlbenchError(f"MLP dropout must be in [0, 1), got {p!r}.")
        for blk in self.blocks:
            drops = [getattr(blk.mlp, name, None) for name in ("drop1", "drop2")]
            if not all(isinstance(d, nn.Dropout) for d in drops):
                raise PetlbenchError(
                    f"backbone {self.arch!r} block {blk.index}: its MLP ({type(blk.mlp).__name__}) has no dropout after "
                    "the activation and after fc2, so mlp_drop_rate cannot be set. Fix: use a standard ViT/DeiT/Swin "
                    "architecture, or proj_drop_rate."
                )
            for drop in drops:
                drop.p = float(p)


class TokenGrid(nn.Module):
    """The patch-token grid (H, W) of the input being processed, for methods that convolve over it.

    A method keeps one in ``petl`` (it has no parameters, so it counts for nothing and copies
    with the model) and passes it to :meth:`Backbone.track_grid`; its hooks then read ``size``.
    A token sequence ``prefix + H*W`` long does not say H and W (2 x 8 and 4 x 4 are both 16
    tokens), so a square guess is never made.
    """

    def __init__(self) -> None:
        super().__init__()
        self.size: tuple[int, int] = (0, 0)

    def observe(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 4:  # (B, H, W, C): a dynamic-size ViT's or a Swin's patch embedding
            self.size = (int(tokens.shape[1]), int(tokens.shape[2]))
        return tokens

    def hw(self, tokens: int, method: str) -> tuple[int, int]:
        """(H, W) of ``tokens`` patch tokens: the recorded grid, checked to hold exactly that many."""
        h, w = self.size
        if h * w != tokens:  # a forward that bypassed the patch embedding (not the model's own forward)
            raise PetlbenchError(f"method {method!r}: {tokens} patch tokens do not fill the {h}x{w} grid the patch "
                                 "embedding produced; run the model's own forward.")
        return h, w

    def extra_repr(self) -> str:
        return f"size={self.size}"


# --------------------------------------------------------------------- hook plumbing
# Hooks hold a callable that belongs to a module registered in the model (a module, a bound
# method of one, or a functools.partial of those). ``copy.deepcopy`` of the whole model then maps
# each hook onto the copied module, so copies and merges never share state with the original.


def _owner(fn: object) -> nn.Module | None:
    if isinstance(fn, functools.partial):
        return _owner(fn.func)
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _checked(fn: Callable) -> Callable:
    if _owner(fn) is None:
        raise TypeError(
            "petlbench hooks must be an nn.Module, a bound method of one, or a functools.partial of those, "
            f"so that copies of the model stay independent; got {fn!r}"
        )
    return fn


class _PetlHook:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    @property
    def owner(self) -> nn.Module | None:
        return _owner(self.fn)


class _InputHook(_PetlHook):
    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.fn(args[0]), *args[1:])


class _OutputHook(_PetlHook):
    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.fn(output)


class _ParallelHook(_PetlHook):
    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.fn(args[0])
        if type(module) is nn.Linear and delta.dtype == output.dtype and delta.shape == output.shape:
            return output.add_(delta)  # a Linear's backward never reads its output: no extra buffer
        return output + delta


class _Cell:
    """The residual stream ``h`` between a sub-layer's norm and its branch end (see transform_branch)."""

    value: torch.Tensor | None = None


class _StashHook(_PetlHook):
    def __init__(self, fn: Callable, cell: _Cell) -> None:
        super().__init__(fn)
        self.cell = cell

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.cell.value = args[0]


class _BranchHook(_PetlHook):
    def __init__(self, fn: Callable, cell: _Cell) -> None:
        super().__init__(fn)
        self.cell = cell

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        h, self.cell.value = self.cell.value, None
        if h is None:
            raise RuntimeError("transform_branch: the sub-layer ran without its norm; the block forward is not standard")
        return self.fn(h, output)


def petl_hooks(model: nn.Module) -> Iterator[tuple[nn.Module, dict, int, _PetlHook]]:
    """Every petlbench hook in ``model``: (module, hook dict, key, hook)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, _PetlHook):
                    yield module, hooks, key, hook


def remove_petl_hooks(model: nn.Module) -> int:
    """Detach every petlbench hook; returns how many were removed."""
    count = 0
    for module, hooks, key, _ in petl_hooks(model):
        del hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
        module._forward_pre_hooks_with_kwargs.pop(key, None)
        count += 1
    return count
