"""NOAH (Zhang et al., "Neural Prompt Search", arXiv 2206.04673 / TPAMI): a searched mix of
Adapter, LoRA and VPT with a size per block, as the timm model in ``ZhangYuanhan-AI/NOAH``
(``model/supernet_vision_transformer_timm.py``) retrains a searched sub-network:

- **LoRA** on the fused qkv of block l, rank ``lora_dims[l]``: ``qkv(x) + B A dropout(x)``, scale 1,
  dropout 0.1 on the input (``--drop_rate_LoRA``).
- **Adapter** on the MLP sub-layer's output *after* drop path, width ``adapter_dims[l]``: NOAH's block
  is ``x + adapter(drop_path(mlp(norm2(x))))`` with ``adapter(y) = y + up(dropout(QuickGELU(down(y))))``,
  QuickGELU = x * sigmoid(1.702 x), dropout 0.1 (``--drop_rate_adapter``). A sample whose MLP branch
  drop path removes still gets ``up(dropout(QuickGELU(down.bias))) + up.bias``.
- **Initialisation**: NOAH's ``VisionTransformer.__init__`` ends with ``init_weights('')``, i.e.
  ``self.apply(_init_vit_weights)`` over the whole model, after the LoRA and adapter modules exist:
  every ``nn.Linear`` is redrawn trunc-normal(std 0.02) with zero bias. So LoRA A **and B** start
  N(0, 0.02) (B is not zero: the model is not the pre-trained one at step 0), both adapter
  projections N(0, 0.02) with zero biases; the kaiming/zero and xavier/N(0, 1e-6) inits written in
  ``Attention`` and ``AdapterSuper`` are overwritten. The prompt tokens are ``nn.Parameter``s, not
  Linears, and keep their xavier-uniform init. Every entry is an independent draw, so the order of
  the draws does not matter for equality in distribution.
- **Prompts**: ``prompt_dims[l]`` learned tokens appended to the sequence before block l; block l
  drops the previous block's prompt outputs (its last ``prompt_dims[l-1]`` tokens) first, as
  NOAH does; prompt dropout 0.1 per image (``--drop_rate_prompt``). All prompt outputs are
  removed before the final norm (NOAH classifies from the class token, so this changes nothing
  there and keeps average pooling clean).

The retrained sub-network is a slice of a supernet of width ``init_width`` (100 for VTAB), so the
prompts' xavier bound is the supernet tensors' one, U(+-sqrt(6 / (101 dim))) (the trunc-normal
Linears do not depend on the width). The published searched sub-networks
(``experiments/NOAH/subnet/VTAB/*.yaml``, RETRAIN) are the VTAB presets; outside them a single
size applies to every block (default 5). ViT-B/16 counts (head excluded) average 360,134 over
the 19 VTAB presets ("0.36 M"); caltech101 is 426,313.

Run side by side with NOAH's model (retrain mode, ``set_sample_config``) on the same tensors, the
logits agree to 1.3e-7 relative, including a block without prompts between two with prompts.

Deliberate differences: NOAH's model also creates model-level prompt tokens and prompt position
embeddings, but block 0 replaces those tokens before any block sees them, so they never change
the output; they are left out here (a trainable tensor without gradient). Counting them, as
NOAH's ``get_sampled_params_numel`` does (with the full 100-token position embedding), gives
442,512 on average, close to the "0.43 M" some tables quote.

The search, as an optional stage. NOAH (1) trains a supernet that, at every step, gives each
kind a random depth (3, 6, 9 or 12 leading blocks) and each of those blocks a random size
(VTAB: 1, 5 or 10) (``supernet_train_prompt.py --mode super``), (2) searches sub-networks
under a parameter budget with an evolutionary search scored on the supernet's weights
(``evolution.py``) and (3) retrains the winner from the pre-trained backbone. Here (1) is
``--set supernet=true`` (``search_dims``, ``search_depths``; every block gets each module at the
largest searched size, NOAH's 100-wide supernet tensors never use more; eval runs the ``*_dims``),
(2) is :func:`search` on the trained supernet model, and (3) is an ordinary run with the
returned ``*_dims``. (1) and (2) are Python-level (train the supernet model with
``petlbench.engine.train`` or any loop; ``petlbench run`` keeps no weights); give the search a
validation split.

ViT only (prompts need the token sequence); not mergeable (the adapter is non-linear, prompts add
tokens).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import QuickGELU, init_vit_linear
from petlbench.search import accuracy, evolve

from ._recipes import NOAH_DIFFERENCES, NOAH_SOURCE, NOAH_VTAB

# RETRAIN sizes of experiments/NOAH/subnet/VTAB/ViT-B_prompt_<task>.yaml, blocks 0..11:
# (VISUAL_PROMPT_DIM, LORA_DIM, ADAPTER_DIM). PREFIX_DIM is 0 everywhere.
_VTAB: dict[str, tuple[str, str, str]] = {
    "caltech101": ("5,10,1,5,10,1,10,1,10,1,10,1", "1,10,10,10,5,10,10,10,5,1,10,1", "10,1,5,10,10,1,5,5,10,1,5,10"),
    "cifar": ("10,5,10,1,5,1,10,1,10,5,1,10", "10,1,5,5,1,10,1,1,1,10,1,1", "5,10,10,10,5,1,1,1,10,10,10,1"),
    "clevr_count": ("10,1,5,10,5,1,10,5,5,5,10,1", "1,1,10,5,10,10,10,1,5,1,10,1", "1,10,10,10,10,1,5,10,10,10,1,1"),
    "clevr_dist": ("10,1,1,10,5,10,5,1,5,10,5,5", "5,1,10,5,10,10,1,1,5,10,1,10", "1,1,1,10,1,1,1,10,5,1,10,10"),
    "diabetic_retinopathy": ("10,1,5,10,1,5,5,10,5,10,5,5", "1,1,10,5,5,10,1,10,10,5,10,1",
                             "1,1,5,5,10,10,10,5,1,10,10,1"),
    "dmlab": ("1,10,5,1,10,10,5,10,10,1,1,1", "10,5,1,5,10,10,5,5,5,10,10,1", "5,1,5,1,5,1,5,5,5,10,10,10"),
    "dsprites_loc": ("5,10,1,10,10,5,5,1,5,5,10,1", "1,1,1,1,10,10,1,10,5,1,5,10", "1,1,1,10,1,1,10,10,10,10,10,1"),
    "dsprites_ori": ("5,5,1,1,10,5,1,10,10,10,10,10", "1,10,1,10,1,5,10,10,5,5,1,5", "1,10,10,10,10,1,5,10,10,10,1,1"),
    "dtd": ("10,5,1,1,5,10,5,1,1,5,1,1", "10,5,1,1,5,10,5,1,1,5,1,1", "1,1,1,10,1,1,10,10,10,10,10,1"),
    "eurosat": ("10,10,10,10,10,1,5,5,10,10,5,10", "10,1,10,10,1,5,10,1,1,1,10,1", "10,10,5,1,10,1,10,5,10,1,10,10"),
    "kitti": ("1,5,10,1,10,5,1,1,1,5,5,5", "5,10,10,10,1,10,5,5,10,5,10,1", "5,1,10,10,1,10,1,1,5,10,5,5"),
    "oxford_flowers102": ("10,10,5,5,1,10,1,5,10,1,5,10", "10,10,5,5,1,10,1,5,10,1,5,10",
                          "5,1,5,5,1,1,10,5,5,10,5,10"),
    "oxford_iiit_pet": ("10,5,5,10,1,10,10,10,10,5,10,10", "10,1,1,10,5,1,1,5,10,10,1,10",
                        "1,5,5,5,5,10,1,5,10,1,1,5"),
    "patch_camelyon": ("10,10,5,10,1,10,10,10,5,1,5,5", "10,10,1,10,1,1,5,5,5,1,5,5", "5,1,10,5,5,1,1,10,1,5,1,5"),
    "resisc45": ("5,5,10,1,5,1,5,10,1,1,5,1", "10,10,5,5,5,10,10,10,1,5,1,5", "5,5,5,1,5,1,10,5,5,1,5,5"),
    "smallnorb_azi": ("1,10,1,10,1,5,10,10,1,10,10,5", "10,5,1,5,1,1,5,5,10,1,1,10", "5,1,1,1,5,5,1,10,1,1,5,1"),
    "smallnorb_ele": ("10,1,1,1,1,5,10,10,10,10,1,10", "10,1,1,1,5,5,10,5,1,10,1,1", "1,1,1,10,1,1,10,10,10,10,10,1"),
    "sun397": ("5,1,10,5,5,10,1,5,1,1,1,1", "10,10,5,5,1,1,10,1,1,1,1,10", "10,5,1,1,1,10,5,5,1,1,5,1"),
    "svhn": ("10,5,5,10,5,5,5,5,5,5,5,5", "5,5,5,10,5,5,5,10,10,10,10,5", "5,5,5,5,5,10,5,10,5,5,5,5"),
}


def parse_sizes(text: str, key: str, blocks: int) -> list[int]:
    """Per-block sizes from ``"5"`` (every block) or ``"5,10,..."`` (one per block)."""
    try:
        sizes = [int(v) for v in str(text).split(",")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * blocks
    if len(sizes) != blocks or any(s < 0 for s in sizes):
        raise PetlbenchError(
            f"method 'noah': {key}={text!r} must be one size >= 0 or {blocks} comma-separated sizes (one per block). "
            f"Fix: e.g. --set {key}=5."
        )
    return sizes


def _choices(text: str, key: str) -> list[int]:
    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise PetlbenchError(f"method 'noah': {key}={text!r} must be comma-separated sizes >= 1. Fix: e.g. --set {key}=1,5,10.")
    return values


class NOAHAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        init_vit_linear(self.down)  # NOAH's whole-model _init_vit_weights
        init_vit_linear(self.up)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, width: int) -> torch.Tensor:
        """``y + up(dropout(QuickGELU(down(y))))`` with the first ``width`` hidden units."""
        z = F.linear(y, self.down.weight[:width].to(y.dtype), self.down.bias[:width].to(y.dtype))
        return y + F.linear(self.dropout(self.act(z)), self.up.weight[:, :width].to(y.dtype), self.up.bias.to(y.dtype))


class NOAHLoRA(nn.Module):
    def __init__(self, dim: int, rank: int, dropout: float) -> None:
        super().__init__()
        # NOAH's LoRA_a / LoRA_b are nn.Linear(bias=False): redrawn trunc-normal 0.02 by _init_vit_weights
        self.a = nn.Parameter(nn.init.trunc_normal_(torch.empty(rank, dim), std=0.02))
        self.b = nn.Parameter(nn.init.trunc_normal_(torch.empty(3 * dim, rank), std=0.02))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.a[:rank].to(x.dtype)), self.b[:, :rank].to(x.dtype))


class NOAHNet(nn.Module):
    """LoRA, adapters and prompts of every block, run at the sizes in ``active``.

    Fixed sub-network: each module is allocated at its size and ``active`` never changes. Supernet
    (``sample`` set): every block gets each module at the largest searched size; in training mode
    ``begin`` draws a new sub-network at the start of every forward, as NOAH's supernet training
    does per step; in eval mode the ``fixed`` sizes run (the candidate being scored).
    """

    def __init__(self, dim: int, alloc: dict[str, list[int]], fixed: dict[str, list[int]], init_width: int,
                 dropout: dict[str, float], sample: dict[str, list[int]] | None = None) -> None:
        super().__init__()
        self.blocks = len(alloc["lora"])
        self.lora = nn.ModuleDict({str(i): NOAHLoRA(dim, r, dropout["lora"]) for i, r in enumerate(alloc["lora"]) if r})
        self.adapter = nn.ModuleDict({str(i): NOAHAdapter(dim, d, dropout["adapter"])
                                      for i, d in enumerate(alloc["adapter"]) if d})
        bound = math.sqrt(6.0 / ((init_width + 1) * dim))  # xavier of NOAH's (1, init_width, dim) tensor
        self.prompts = nn.ParameterDict({str(i): nn.Parameter(torch.empty(n, dim).uniform_(-bound, bound))
                                         for i, n in enumerate(alloc["prompt"]) if n})
        self.prompt_dropout = dropout["prompt"]
        self.fixed = {k: list(v) for k, v in fixed.items()}
        self.active = {k: list(v) for k, v in fixed.items()}
        self.sample = sample  # {"dims": [...], "depths": [...]} for the supernet

    def _draw(self) -> dict[str, list[int]]:
        """NOAH's ``sample_configs``: per kind a depth k, random sizes in blocks < k, 0 after."""
        dims, depths = self.sample["dims"], self.sample["depths"]
        out = {}
        for kind in ("prompt", "lora", "adapter"):
            k = depths[int(torch.randint(len(depths), ()))]
            out[kind] = [dims[int(torch.randint(len(dims), ()))] if i < k else 0 for i in range(self.blocks)]
        return out

    def lora_branch(self, block: int, x: torch.Tensor) -> torch.Tensor:
        rank = self.active["lora"][block]
        if not rank:
            return x.new_zeros(())
        return self.lora[str(block)](x, rank)

    def adapter_branch(self, block: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` is the MLP sub-layer's update after drop path (``h``, the stream, is not used)."""
        width = self.active["adapter"][block]
        return self.adapter[str(block)](y, width) if width else y

    def _tokens(self, block: int, x: torch.Tensor) -> torch.Tensor:
        n = self.active["prompt"][block]
        tokens = self.prompts[str(block)][:n].to(x.dtype).expand(x.shape[0], -1, -1)
        return F.dropout(tokens, self.prompt_dropout, self.training)  # one mask per image, as NOAH

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        """The token sequence before block 0: choose this forward's sub-network, add block 0's prompts."""
        self.active = self._draw() if self.sample is not None and self.training else self.fixed
        return self.enter(0, x)

    def enter(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Before block ``block``: drop the previous block's prompt outputs, append this block's prompts."""
        sizes = self.active["prompt"]
        if not sizes[block]:
            return x  # NOAH: a block without prompts carries the sequence as it is
        last = sizes[block - 1] if block > 0 else 0
        kept = x[:, : x.shape[1] - last] if last else x
        return torch.cat([kept, self._tokens(block, x)], dim=1)

    def extra(self) -> int:
        """Prompt outputs still in the sequence after the last block."""
        sizes, extra = self.active["prompt"], 0
        for i, n in enumerate(sizes):
            if n:
                extra += n - (sizes[i - 1] if i > 0 else 0)
        return extra

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[1] - self.extra()]


def noah_count(sizes: dict[str, list[int]], dim: int, init_width: int, dead: bool = False) -> int:
    """Parameters of a sub-network: LoRA 4 dim r, adapter 2 dim d + d + dim, prompts n dim per block.
    ``dead`` adds what NOAH's ``get_sampled_params_numel`` also counts: the model-level prompts
    (block 0's size) and their full ``init_width``-token position embedding, replaced before block 0."""
    total = sum(4 * dim * r for r in sizes["lora"]) + sum(2 * dim * d + d + dim for d in sizes["adapter"] if d)
    total += sum(dim * n for n in sizes["prompt"])
    if dead and sizes["prompt"][0]:
        total += dim * (sizes["prompt"][0] + init_width)
    return total


class NOAH(Method):
    name = "noah"
    display_name = "NOAH"
    summary = "NOAH: searched per-block mix of LoRA (qkv), Adapter (MLP) and VPT prompts; published VTAB subnets."
    paper = "Zhang et al., Neural Prompt Search, arXiv 2206.04673"
    published = {"vtab": "NOAH"}
    families = frozenset({"vit", "deit_distilled"})
    family_refusals = {
        "eva": f"{EVA_NO_QKV}; and NOAH appends prompt tokens, which RoPE cannot place",
        "swin": "NOAH appends prompt tokens to one token sequence; Swin attends within windows of the patch grid",
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    hparams = {
        "lora_dims": HParam("5", "LoRA rank per block: one size or one per block, comma-separated (0 = none)"),
        "adapter_dims": HParam("5", "adapter width per block: one size or one per block (0 = none)"),
        "prompt_dims": HParam("5", "prompt tokens per block: one size or one per block (0 = none)"),
        "lora_dropout": HParam(0.1, "dropout on the LoRA input (--drop_rate_LoRA)", low=0.0, high=0.99),
        "adapter_dropout": HParam(0.1, "dropout after QuickGELU (--drop_rate_adapter)", low=0.0, high=0.99),
        "prompt_dropout": HParam(0.1, "dropout on the prompt tokens (--drop_rate_prompt)", low=0.0, high=0.99),
        "init_width": HParam(100, "width of the supernet whose xavier bound the prompts inherit", low=1),
        "supernet": HParam(False, "train NOAH's supernet (a random sub-network every step; eval runs the *_dims)"),
        "search_dims": HParam("1,5,10", "supernet: sizes a block's module may take (VTAB search space)"),
        "search_depths": HParam("", "supernet: how many leading blocks carry a module (default: 1/4..4/4 of depth)"),
    }
    # The retraining of the searched sub-network is the run behind the published rows. NOAH's supernet
    # (--set supernet=true) trains 500 epochs at lr 5e-4 on train800 (configs/NOAH/VTAB/supernet/
    # slurm_train_vtab.sh), a separate stage: give it --set epochs=500 lr=5e-4 when running that stage.
    recipes = {"vtab": {"*": dict(NOAH_VTAB)}}
    recipe_source = {
        "vtab": NOAH_SOURCE.format(script="configs/NOAH/VTAB/subnet/slurm_retrain_vtab.sh (--mode=retrain, the "
                                          "searched sub-network experiments/NOAH/subnet/VTAB/ViT-B_prompt_<task>.yaml)"),
    }
    recipe_differences = {
        "vtab": NOAH_DIFFERENCES + " The supernet stage (500 epochs, lr 5e-4, train800, evolutionary search on "
                "val200) is not part of this recipe; the published sub-networks are the presets.",
        "fgvc": "no recipe: NOAH publishes VTAB-1k, few-shot and domain-generalisation runs, not VPT's FGVC.",
    }

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: dict[str, Any]) -> dict[str, Any]:
        out = super().preset(suite, task, current)
        if suite == "vtab" and task in _VTAB:
            prompts, lora, adapter = _VTAB[task]
            out.update(prompt_dims=prompts, lora_dims=lora, adapter_dims=adapter)
        return out

    def _sizes(self, n: int) -> dict[str, list[int]]:
        return {"prompt": parse_sizes(self.hp.prompt_dims, "prompt_dims", n),
                "lora": parse_sizes(self.hp.lora_dims, "lora_dims", n),
                "adapter": parse_sizes(self.hp.adapter_dims, "adapter_dims", n)}

    def _search_space(self, n: int) -> dict[str, list[int]]:
        dims = _choices(self.hp.search_dims, "search_dims")
        if self.hp.search_depths:
            depths = _choices(self.hp.search_depths, "search_depths")
        else:
            depths = sorted({max(1, n * q // 4) for q in (1, 2, 3, 4)})
        if depths[-1] > n:
            raise PetlbenchError(f"method 'noah': search_depths {self.hp.search_depths!r} goes beyond the {n} blocks. "
                                 f"Fix: e.g. --set search_depths={n}.")
        return {"dims": dims, "depths": depths}

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        blocks = backbone.blocks
        n, dim = len(blocks), blocks[0].dim
        fixed = self._sizes(n)
        sample = self._search_space(n) if self.hp.supernet else None
        if sample is not None:
            widest = sample["dims"][-1]
            if any(v > widest for sizes in fixed.values() for v in sizes):
                raise PetlbenchError(f"method 'noah': with supernet=true the *_dims evaluated must be <= the largest "
                                     f"search_dims ({widest}). Fix: e.g. --set lora_dims={widest}.")
            alloc = {k: [widest] * n for k in fixed}
        else:
            alloc = fixed
        for key, kind in (("lora_dims", "lora"), ("adapter_dims", "adapter")):
            if max(alloc[kind]) > dim:
                raise PetlbenchError(
                    f"method 'noah': {key} has a size {max(alloc[kind])} larger than the width {dim}. "
                    f"Fix: e.g. --set {key}=5."
                )
        dropout = {"lora": self.hp.lora_dropout, "adapter": self.hp.adapter_dropout, "prompt": self.hp.prompt_dropout}
        net = NOAHNet(dim, alloc, fixed, self.hp.init_width, dropout, sample)
        petl["noah"] = net
        for blk in blocks:
            i = blk.index
            if alloc["lora"][i]:
                backbone.add_parallel(blk.qkv, functools.partial(net.lora_branch, i))
            if alloc["adapter"][i]:  # x + adapter(drop_path(mlp(norm2(x)))), as NOAH's Block
                backbone.transform_branch(blk, "mlp", functools.partial(net.adapter_branch, i))
        if any(alloc["prompt"]):
            backbone.transform_output(backbone.token_site, net.begin)
            for blk in blocks[1:]:
                if alloc["prompt"][blk.index]:
                    backbone.transform_input(blk.block, functools.partial(net.enter, blk.index))
            backbone.transform_input(backbone.final_norm, net.strip)
        elif sample is not None:
            backbone.transform_output(backbone.token_site, net.begin)


# ------------------------------------------------------------------------ evolutionary search
def search(model, loader: Iterable, device: torch.device | str = "cpu", *, param_limit: float = 0.64e6,
           min_params: float = 0, epochs: int = 20, population: int = 50, select: int = 10, mutation: int = 25,
           crossover: int = 25, m_prob: float = 0.2, s_prob: float = 0.4, seed: int = 0) -> dict[str, Any]:
    """NOAH's evolutionary search (``evolution.py``) over a trained supernet.

    ``model``: a NOAH model built with ``supernet=True`` whose supernet weights were trained. A
    candidate gives each kind (prompts, LoRA, adapter) a depth from ``search_depths`` and a size
    from ``search_dims`` for each of those leading blocks; it is scored by accuracy on ``loader``
    with the supernet's weights, within [min_params, param_limit] counted as NOAH counts (its dead
    model-level prompts included). Mutation re-draws a kind's depth (probability m_prob, then
    s_prob), crossover takes each kind's sizes from one parent. Defaults are NOAH's. NOAH then
    retrains the winner from the pre-trained backbone: pass the returned ``*_dims`` to a run with
    ``supernet=false``. Use a validation split.

    Returns ``{"prompt_dims", "lora_dims", "adapter_dims", "accuracy", "params", "noah_params",
    "evaluated"}``; ``params`` is petlbench's count of the sub-network, ``noah_params`` NOAH's.
    """
    if getattr(model.method, "name", None) != "noah" or not model.method.hp.supernet:
        raise PetlbenchError("NOAH search needs a NOAH model built with supernet=True (its trained supernet). "
                             "Fix: petlbench.create_model(..., 'noah', ..., supernet=True) and load its weights.")
    net: NOAHNet = model.petl["noah"]
    dims, depths, n = net.sample["dims"], net.sample["depths"], net.blocks
    dim, init_width = model.backbone.blocks[0].dim, model.method.hp.init_width
    kinds = ("prompt", "lora", "adapter")
    rng = random.Random(seed)
    original, was_training = net.fixed, model.training

    def sizes_of(cand: tuple) -> dict[str, list[int]]:
        return {k: list(v) for k, v in zip(kinds, cand, strict=True)}

    def score(cand: tuple) -> tuple[float, int] | None:
        counted = noah_count(sizes_of(cand), dim, init_width, dead=True)
        if counted > param_limit or counted < min_params:
            return None
        net.fixed = sizes_of(cand)
        return accuracy(model, loader, device), counted

    def grow(k: int) -> tuple[int, ...]:
        return tuple(rng.choice(dims) if i < k else 0 for i in range(n))

    def random_cand() -> tuple:
        return tuple(grow(rng.choice(depths)) for _ in kinds)

    def mutate(top: list[tuple]) -> tuple:
        out = []
        for sizes in rng.choice(top):
            sizes = list(sizes)
            if rng.random() < m_prob:
                current = next((i for i, v in enumerate(sizes) if v == 0), n)
                new = rng.choice(depths) if rng.random() < s_prob else current
                if new > current:
                    sizes = sizes[:current] + [rng.choice(dims) for _ in range(new - current)] + [0] * (n - new)
                else:
                    sizes = sizes[:new] + [0] * (n - new)
            out.append(tuple(sizes))
        return tuple(out)

    def cross(top: list[tuple]) -> tuple:
        a, b = rng.choice(top), rng.choice(top)
        return tuple(rng.choice([x, y]) for x, y in zip(a, b, strict=True))

    model.eval()
    try:
        best, scores = evolve(score, random_cand, mutate, cross, epochs=epochs, population=population,
                              select=select, mutation=mutation, crossover=crossover,
                              what="NOAH search", budget=f"{min_params:g}..{param_limit:g} parameters")
    finally:
        net.fixed = original
        net.active = original
        model.train(was_training)
    found = sizes_of(best)
    return {"prompt_dims": ",".join(map(str, found["prompt"])), "lora_dims": ",".join(map(str, found["lora"])),
            "adapter_dims": ",".join(map(str, found["adapter"])), "accuracy": scores[best][0],
            "params": noah_count(found, dim, init_width), "noah_params": scores[best][1], "evaluated": len(scores)}
