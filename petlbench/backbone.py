"""The backbone interface: roles of an *unmodified* timm model, and the only way methods touch it.

A method never looks up timm attribute names. It asks the :class:`Backbone` for roles
(blocks, the attention and MLP inputs after ``norm1``/``norm2``, the ``qkv``/``proj``/``fc1``/``fc2``
linears, the token sequence, the head) and changes behaviour only through hooks attached with
:meth:`Backbone.transform_input`, :meth:`Backbone.transform_output` and :meth:`Backbone.add_parallel`.
The timm module tree is therefore never restructured: the same classes, the same parameter
names, timm's fused attention (``scaled_dot_product_attention``) untouched. Merging a linear
method folds its parameters into the existing weights and removes the hooks, which leaves a plain
timm model by construction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from petlbench.errors import PetlbenchError

FAMILIES = ("vit", "swin")


@dataclass(frozen=True)
class BlockRoles:
    """One transformer block, by role.

    ``attn`` and ``mlp`` are the modules whose *input* is the attention-input / MLP-input
    position (the output of ``norm1`` / ``norm2``); hooking their input is exactly "after the
    LayerNorm, before qkv / fc1", the place ARC and RepAdapter adapt. ``stage`` groups blocks of
    equal width (always 0 for ViT; the Swin stage otherwise).
    """

    index: int
    stage: int
    dim: int
    num_heads: int
    block: nn.Module
    norm1: nn.Module
    attn: nn.Module
    qkv: nn.Linear
    proj: nn.Linear
    norm2: nn.Module
    mlp: nn.Module
    fc1: nn.Linear
    fc2: nn.Linear


def _family_of(model: nn.Module) -> str | None:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    # Exact class for ViT: subclasses (distilled DeiT, rel-pos variants) change the token
    # sequence or the head in ways the roles below do not describe.
    if type(model) is VisionTransformer:
        return "vit"
    if type(model) is SwinTransformer:
        return "swin"
    return None


def _linear(module: nn.Module, attr: str, where: str) -> nn.Linear:
    layer = getattr(module, attr, None)
    if not isinstance(layer, nn.Linear):
        raise PetlbenchError(
            f"backbone block {where} has no nn.Linear {attr!r} (found {type(layer).__name__}); this timm "
            "variant is not supported. Fix: use a standard ViT/DeiT/Swin architecture (`petlbench list backbones`)."
        )
    return layer


class Backbone:
    """Role view over a timm ViT or Swin model; cheap to build, holds no state of its own."""

    def __init__(self, model: nn.Module, arch: str = "") -> None:
        family = _family_of(model)
        if family is None:
            raise PetlbenchError(
                f"backbone {arch or type(model).__name__!r} is a {type(model).__name__}; petlbench supports timm "
                "VisionTransformer (ViT, DeiT) and SwinTransformer models. Fix: pick one from `petlbench list backbones`."
            )
        self.model = model
        self.arch = arch
        self.family = family
        self.blocks: list[BlockRoles] = list(self._collect_blocks())

    # ----------------------------------------------------------------- roles
    def _collect_blocks(self) -> Iterator[BlockRoles]:
        if self.family == "vit":
            stages = [self.model.blocks]
        else:
            stages = [stage.blocks for stage in self.model.layers]
        index = 0
        for stage_idx, blocks in enumerate(stages):
            for blk in blocks:
                where = f"{index}"
                attn, mlp = blk.attn, blk.mlp
                qkv = _linear(attn, "qkv", where)
                yield BlockRoles(
                    index=index,
                    stage=stage_idx,
                    dim=qkv.in_features,
                    num_heads=int(attn.num_heads),
                    block=blk,
                    norm1=blk.norm1,
                    attn=attn,
                    qkv=qkv,
                    proj=_linear(attn, "proj", where),
                    norm2=blk.norm2,
                    mlp=mlp,
                    fc1=_linear(mlp, "fc1", where),
                    fc2=_linear(mlp, "fc2", where),
                )
                index += 1

    @property
    def head(self) -> nn.Linear:
        """The classifier: a fresh ``nn.Linear(feature_dim, num_classes)``."""
        head = self.model.head.fc if self.family == "swin" else self.model.head
        if not isinstance(head, nn.Linear):
            raise PetlbenchError(f"backbone {self.arch!r} has no linear classifier head; create it with num_classes >= 1.")
        return head

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def patch_embed(self) -> nn.Module:
        """Patch embedding; its output is channels-last tokens ((B,N,C) for ViT, (B,H,W,C) for Swin)."""
        return self.model.patch_embed

    @property
    def patch_proj(self) -> nn.Conv2d:
        """The patch-embedding convolution; its output is channels-first (B, C, H, W), before any
        patch-embedding norm."""
        return self.model.patch_embed.proj

    @property
    def patch_norm(self) -> nn.Module | None:
        """The LayerNorm inside the patch embedding, or None when it is an Identity (ViT)."""
        norm = self.model.patch_embed.norm
        return None if isinstance(norm, nn.Identity) else norm

    @property
    def downsample_norms(self) -> list[nn.LayerNorm]:
        """Swin: the LayerNorm of each patch-merging (downsampling) layer, in stage order; its output
        has 4x the previous stage's channels and feeds the merging projection. ViT: none."""
        if self.family != "swin":
            return []
        norms = []
        for stage in self.model.layers:
            norm = getattr(stage.downsample, "norm", None)
            if isinstance(norm, nn.LayerNorm):
                norms.append(norm)
        return norms

    @property
    def layernorms(self) -> list[nn.LayerNorm]:
        """Every LayerNorm of the backbone, found by type: each block's norm1/norm2, the final norm;
        Swin also the patch-embedding and patch-merging norms. The head has none."""
        return [m for m in self.model.modules() if isinstance(m, nn.LayerNorm)]

    @property
    def patch_size(self) -> int:
        return int(self.patch_proj.kernel_size[0])

    @property
    def in_chans(self) -> int:
        return int(self.patch_proj.in_channels)

    @property
    def final_norm(self) -> nn.Module:
        """The LayerNorm after the last block (its input is the last block's tokens)."""
        return self.model.norm

    @property
    def token_site(self) -> nn.Module:
        """ViT only: the module whose output is the token sequence (prefix tokens + patches, with
        position embeddings) right before block 0. An output transform here may add tokens. Its
        input is the same sequence before the pre-norm (:attr:`norm_pre`, when there is one): a
        delta on the class token or position embedding folds into them only when made there."""
        self.require("vit", "a token sequence with a class token")
        return self.model.norm_pre

    @property
    def cls_token(self) -> nn.Parameter | None:
        """ViT: the learned class token (1, 1, dim) that starts the token sequence, or None when the
        model has none; Swin: None. A method that tunes it adds a delta at :attr:`token_site`."""
        if self.family != "vit":
            return None
        token = getattr(self.model, "cls_token", None)
        return token if isinstance(token, nn.Parameter) else None

    @property
    def num_prefix_tokens(self) -> int:
        """ViT only: class/register tokens at the start of the sequence."""
        self.require("vit", "prefix tokens")
        return int(self.model.num_prefix_tokens)

    @property
    def pooling(self) -> str:
        """How this backbone pools tokens into the classifier input, as recorded with each run.

        ``"cls_token"``: the class token after the final norm (timm ViT ``global_pool='token'``);
        ``"avg"``: the mean of the (patch) tokens after the final norm (Swin, ViT ``'avg'``);
        other timm pools by their timm name. A method that changes the pooling says so in
        :attr:`~petlbench.method.Method.pooling`.
        """
        if self.family == "swin":
            return "avg"
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
        norm = getattr(self.model, "norm_pre", None) if self.family == "vit" else None
        return norm if isinstance(norm, nn.LayerNorm) else None

    @property
    def fc_norm(self) -> nn.LayerNorm | None:
        """The LayerNorm on the pooled features, after pooling and before the head (MAE-style
        ``global_pool='avg'``, where :attr:`final_norm` is then an Identity), or None. It is the
        last norm of such a backbone, where methods that adapt "the final norm" act."""
        norm = getattr(self.model, "fc_norm", None) if self.family == "vit" else None
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
        pool = getattr(self.model, "attn_pool", None) if self.family == "vit" else None
        return pool if isinstance(pool, nn.Module) else None

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch-token grid (H, W) the patch embedding produces for the input size the backbone
        was built for (``img_size``, which may be non-square). A backbone built with
        ``dynamic_img_size`` takes other sizes too; a method that needs the grid of the input
        being processed keeps a :class:`TokenGrid` and passes it to :meth:`track_grid`."""
        h, w = self.model.patch_embed.grid_size
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
        pos = getattr(self.model, "pos_embed", None) if self.family == "vit" else None
        if not isinstance(pos, nn.Parameter):
            return None
        return pos[:, 0 if getattr(self.model, "no_embed_class", False) else self.num_prefix_tokens:]

    def bias_argument(self, layer: nn.Module) -> str | None:
        """The timm constructor argument that gives ``layer`` a bias, when ``layer`` is a block
        linear built without one: ``qkv_bias`` for qkv, ``proj_bias`` for proj, fc1 and fc2 of a
        ViT (timm ties the MLP biases to it); None for any other layer. A merge that must add a
        bias to such a layer adds it to every layer of that argument, so the merged model is the
        plain timm model built with that argument set to True."""
        for b in self.blocks:
            if layer is b.qkv:
                return "qkv_bias"
            if self.family == "vit" and any(layer is getattr(b, r) for r in ("proj", "fc1", "fc2")):
                return "proj_bias"
        return None

    def bias_group(self, argument: str) -> list[nn.Linear]:
        """Every layer whose bias the timm constructor argument ``argument`` switches (see
        :meth:`bias_argument`)."""
        return [getattr(b, r) for b in self.blocks for r in ("qkv", "proj", "fc1", "fc2")
                if self.bias_argument(getattr(b, r)) == argument]

    def require(self, family: str, what: str) -> None:
        if self.family != family:
            raise PetlbenchError(f"backbone {self.arch!r} ({self.family}) has no {what}; only {family} backbones do.")

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def body_parameters(self) -> list[nn.Parameter]:
        """Every backbone parameter except the head's."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.model.parameters() if id(p) not in head]

    def modules_with_bias(self) -> Iterator[tuple[nn.Module, nn.Parameter]]:
        """(module, bias) for every module that owns a ``bias`` parameter, head excluded."""
        head = self.head
        for module in self.model.modules():
            bias = module._parameters.get("bias") if module is not head else None
            if isinstance(bias, nn.Parameter):
                yield module, bias

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
        from timm.models.swin_transformer import SwinTransformerBlock
        from timm.models.vision_transformer import Block

        # Only the pre-norm blocks ``x + drop_path(ls(sublayer(norm(x))))`` have h = the norm's input.
        if type(block.block) not in (Block, SwinTransformerBlock):
            raise PetlbenchError(
                f"backbone {self.arch!r} block {block.index} is a {type(block.block).__name__}, not timm's pre-norm "
                "Block/SwinTransformerBlock, so its residual branches are not where this method acts. Fix: use a "
                "standard ViT/DeiT/Swin architecture."
            )
        norm = block.norm1 if position == "attn" else block.norm2
        branch = block.block.drop_path1 if position == "attn" else block.block.drop_path2
        fn = _checked(fn)
        cell = _Cell()
        norm.register_forward_pre_hook(_StashHook(fn, cell))
        branch.register_forward_hook(_BranchHook(fn, cell))


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
