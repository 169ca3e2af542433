"""NOAH (Zhang et al., "Neural Prompt Search", arXiv 2206.04673 / TPAMI): a searched mix of
Adapter, LoRA and VPT with a size per block, as the timm model in ``ZhangYuanhan-AI/NOAH``
(``model/supernet_vision_transformer_timm.py``) retrains a searched sub-network:

- **LoRA** on the fused qkv of block l, rank ``lora_dims[l]``: ``qkv(x) + B A dropout(x)``, scale 1,
  A kaiming-uniform (a=sqrt(5)), B zero, dropout 0.1 on the input (``--drop_rate_LoRA``).
- **Adapter** on the MLP output, width ``adapter_dims[l]``: ``y + up(dropout(QuickGELU(down(y))))``
  with QuickGELU = x * sigmoid(1.702 x), dropout 0.1 (``--drop_rate_adapter``), both weights
  xavier-uniform and both biases N(0, 1e-6).
- **Prompts**: ``prompt_dims[l]`` learned tokens appended to the sequence before block l; block l
  drops the previous block's prompt outputs (its last ``prompt_dims[l-1]`` tokens) first, as
  NOAH does; prompt dropout 0.1 per image (``--drop_rate_prompt``). All prompt outputs are
  removed before the final norm (NOAH classifies from the class token, so this changes nothing
  there and keeps average pooling clean).

The retrained sub-network is a slice of a supernet of width ``init_width`` (100 for VTAB), so
its xavier bounds are the supernet tensors' ones: adapter weights U(+-sqrt(6 / (dim + 100))),
prompts U(+-sqrt(6 / (101 dim))). The published searched sub-networks
(``experiments/NOAH/subnet/VTAB/*.yaml``, RETRAIN) are the VTAB presets; outside them a single
size applies to every block (default 5). ViT-B/16 counts (head excluded) average 360,134 over
the 19 VTAB presets ("0.36 M"); caltech101 is 426,313.

Deliberate differences: NOAH's model also creates model-level prompt tokens and prompt position
embeddings, but block 0 replaces those tokens before any block sees them, so they never change
the output; they are left out here (a trainable tensor without gradient). Counting them, as
NOAH's ``get_sampled_params_numel`` does (with the full 100-token position embedding), gives
442,512 on average, the "0.43 M" some tables quote. The adapter sits on the MLP output before
timm's drop-path (NOAH: after it), which only matters while drop-path is on in training.

Not implemented: the supernet training and the evolutionary search (``evolution.py``); the
published searched configurations are used instead. ViT only (prompts need the token sequence),
and not mergeable (the adapter is non-linear, prompts add tokens).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError

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


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class NOAHAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int, init_width: int, dropout: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        bound = math.sqrt(6.0 / (dim + init_width))  # xavier of the (init_width x dim) supernet tensors
        for layer in (self.down, self.up):
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.normal_(layer.bias, std=1e-6)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.dropout(self.act(self.down(y))))


class NOAHLoRA(nn.Module):
    def __init__(self, dim: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, dim))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.b = nn.Parameter(torch.zeros(3 * dim, rank))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.a.to(x.dtype)), self.b.to(x.dtype))


class NOAHPrompts(nn.Module):
    """Per-block prompt tokens appended at the end of the sequence."""

    def __init__(self, dim: int, sizes: list[int], init_width: int, dropout: float) -> None:
        super().__init__()
        self.sizes = list(sizes)
        bound = math.sqrt(6.0 / ((init_width + 1) * dim))  # xavier of NOAH's (1, init_width, dim) tensor
        self.tokens = nn.ParameterDict()
        for i, n in enumerate(sizes):
            if n:
                self.tokens[str(i)] = nn.Parameter(torch.empty(n, dim).uniform_(-bound, bound))
        self.dropout = dropout
        # Prompt outputs still in the sequence after the last block (dropped before the final norm).
        extra = 0
        for i, n in enumerate(sizes):
            if n:
                extra += n - (sizes[i - 1] if i > 0 else 0)
        self.extra = extra

    def _tokens(self, block: int, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens[str(block)].to(x.dtype).expand(x.shape[0], -1, -1)
        return F.dropout(tokens, self.dropout, self.training)  # one mask per image, as NOAH

    def enter(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Before block ``block``: drop the previous block's prompt outputs, append this block's prompts."""
        last = self.sizes[block - 1] if block > 0 else 0
        kept = x[:, : x.shape[1] - last] if last else x
        return torch.cat([kept, self._tokens(block, x)], dim=1)

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.shape[1] - self.extra]


class NOAH(Method):
    name = "noah"
    display_name = "NOAH"
    summary = "NOAH: searched per-block mix of LoRA (qkv), Adapter (MLP) and VPT prompts; published VTAB subnets."
    paper = "Zhang et al., Neural Prompt Search, arXiv 2206.04673"
    published = {"vtab": "NOAH"}
    families = frozenset({"vit"})
    hparams = {
        "lora_dims": HParam("5", "LoRA rank per block: one size or one per block, comma-separated (0 = none)"),
        "adapter_dims": HParam("5", "adapter width per block: one size or one per block (0 = none)"),
        "prompt_dims": HParam("5", "prompt tokens per block: one size or one per block (0 = none)"),
        "lora_dropout": HParam(0.1, "dropout on the LoRA input (--drop_rate_LoRA)", low=0.0, high=0.99),
        "adapter_dropout": HParam(0.1, "dropout after QuickGELU (--drop_rate_adapter)", low=0.0, high=0.99),
        "prompt_dropout": HParam(0.1, "dropout on the prompt tokens (--drop_rate_prompt)", low=0.0, high=0.99),
        "init_width": HParam(100, "width of the supernet whose xavier bounds the sub-network inherits", low=1),
    }
    train_presets = {
        "vtab": {"*": {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100, "warmup_epochs": 10,
                       "warmup_lr": 1e-6, "min_lr": 1e-5, "drop_path_rate": 0.1, "label_smoothing": 0.0}},
    }

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: dict[str, Any]) -> dict[str, Any]:
        out = super().preset(suite, task, current)
        if suite == "vtab" and task in _VTAB:
            prompts, lora, adapter = _VTAB[task]
            out.update(prompt_dims=prompts, lora_dims=lora, adapter_dims=adapter)
        return out

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        blocks = backbone.blocks
        n = len(blocks)
        lora = parse_sizes(self.hp.lora_dims, "lora_dims", n)
        adapter = parse_sizes(self.hp.adapter_dims, "adapter_dims", n)
        prompt = parse_sizes(self.hp.prompt_dims, "prompt_dims", n)
        dim = blocks[0].dim
        for key, sizes in (("lora_dims", lora), ("adapter_dims", adapter)):
            if max(sizes) > dim:
                raise PetlbenchError(
                    f"method 'noah': {key} has a size {max(sizes)} larger than the width {dim}. Fix: e.g. --set {key}=5."
                )
        loras, adapters = nn.ModuleDict(), nn.ModuleDict()
        for blk in blocks:
            i = blk.index
            if lora[i]:
                loras[str(i)] = NOAHLoRA(blk.dim, lora[i], self.hp.lora_dropout)
                backbone.add_parallel(blk.qkv, loras[str(i)])
            if adapter[i]:
                adapters[str(i)] = NOAHAdapter(blk.dim, adapter[i], self.hp.init_width, self.hp.adapter_dropout)
                backbone.transform_output(blk.mlp, adapters[str(i)])
        petl["lora"], petl["adapter"] = loras, adapters
        if any(prompt):
            prompts = NOAHPrompts(dim, prompt, self.hp.init_width, self.hp.prompt_dropout)
            petl["prompts"] = prompts
            for blk in blocks:
                if prompt[blk.index]:
                    site = backbone.token_site if blk.index == 0 else blk.block
                    hook = functools.partial(prompts.enter, blk.index)
                    if blk.index == 0:
                        backbone.transform_output(site, hook)
                    else:
                        backbone.transform_input(site, hook)
            backbone.transform_input(backbone.final_norm, prompts.strip)
