"""GLoRA (Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning", 2023).

Every linear of every block (qkv, proj, fc1, fc2; the official ``set_glora`` wraps every
``nn.Linear`` except the head, which on a timm ViT is exactly these) computes

    W' = W + W * A + B,        b' = b + b * D + E + W C

(``*`` elementwise) as in ``Arnav0400/ViT-Slim`` ``GLoRA/layer.py``. Each of A..E has a form
chosen per layer: A, B in {low-rank, vector, constant, none}; C in {low-rank, vector, none};
D, E in {vector, constant, none}. Shapes and init follow the official module: low-rank A and B
are ``Ad @ Au`` (out x r @ r x in), C is ``Cd @ Cu`` (in x r @ r x 1); the ``*d`` factors and every
vector/constant start at zero, ``Au``, ``Bu``, ``Cu`` are xavier-uniform, so the model starts as
the pre-trained one. A "vector" A or B is one value per output row (``Ad[:, 0]``), a "constant"
one scalar. Only the tensors the chosen form uses are allocated, so the count is the one the
official search counts (``evolution_utils.get_param``).

``config`` gives the forms as five letters for A, B, C, D, E (L = low-rank, V = vector,
C = constant, N = none): one code for every linear (default ``LLLVV``, the largest sub-network),
or one code per linear, comma-separated, in the order qkv, proj, fc1, fc2 of block 0, 1, ...

Everything is linear in the input, so GLoRA merges exactly (the formula above, in float64).

Not implemented (documented, not hidden): the official pipeline trains a supernet that samples a
random form per linear at every step (500 epochs) and then runs an evolutionary search under a
parameter budget, reporting the searched sub-network with the supernet's weights. The official
repository publishes no searched per-layer configurations, so there are no per-task presets;
petlbench trains one fixed configuration. On Swin the patch-merging reductions (linears that are
no block role) are left out.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError

_FORMS = {"L": "lora", "V": "vector", "C": "constant", "N": "none"}
_ALLOWED = {"A": "LVCN", "B": "LVCN", "C": "LVN", "D": "VCN", "E": "VCN"}
_SITES = ("qkv", "proj", "fc1", "fc2")


def parse_config(text: str, linears: int) -> list[dict[str, str]]:
    """One {A..E: form} per linear from ``config`` (a single code, or one per linear)."""
    codes = [c.strip().upper() for c in str(text).split(",")]
    if len(codes) == 1:
        codes = codes * linears
    if len(codes) != linears:
        raise PetlbenchError(
            f"method 'glora': config has {len(codes)} codes but this backbone has {linears} adapted linears "
            f"(qkv, proj, fc1, fc2 per block). Fix: give one code (e.g. --set config=LLLVV) or {linears}."
        )
    out = []
    for i, code in enumerate(codes):
        bad = len(code) != 5 or any(ch not in _ALLOWED[k] for k, ch in zip("ABCDE", code, strict=False))
        if bad:
            raise PetlbenchError(
                f"method 'glora': config code {code!r} (linear {i}) is not five letters for A,B,C,D,E with "
                "A,B in L/V/C/N, C in L/V/N, D,E in V/C/N (L=low-rank, V=vector, C=constant, N=none). "
                "Fix: e.g. --set config=LLLVV."
            )
        out.append({k: _FORMS[ch] for k, ch in zip("ABCDE", code, strict=True)})
    return out


class GLoRALinear(nn.Module):
    """The A..E tensors of one linear; ``forward(linear, x)`` is the branch added to ``linear(x)``."""

    def __init__(self, out_features: int, in_features: int, rank: int, forms: dict[str, str]) -> None:
        super().__init__()
        self.forms = dict(forms)
        for key in "AB":
            self._make(key, forms[key], (out_features, in_features), rank)
        self._make("C", forms["C"], (in_features, 1), rank)
        for key in "DE":
            self._make(key, forms[key], (out_features,), rank)

    def _make(self, key: str, form: str, shape: tuple[int, ...], rank: int) -> None:
        if form == "lora":
            setattr(self, f"{key}d", nn.Parameter(torch.zeros(shape[0], rank)))
            up = nn.Parameter(torch.empty(rank, shape[1]))
            nn.init.xavier_uniform_(up)
            setattr(self, f"{key}u", up)
        elif form == "vector":
            setattr(self, key, nn.Parameter(torch.zeros(shape[0])))
        elif form == "constant":
            setattr(self, key, nn.Parameter(torch.zeros(())))

    def _tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The tensor in a shape that broadcasts against W (A, B), W's input (C) or b (D, E)."""
        form = self.forms[key]
        if form == "none":
            return None
        if form == "lora":
            return getattr(self, f"{key}d").to(dtype) @ getattr(self, f"{key}u").to(dtype)
        t = getattr(self, key).to(dtype)
        return t[:, None] if form == "vector" and key in "AB" else t

    def weight_delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        a, b = self._tensor("A", weight.dtype), self._tensor("B", weight.dtype)
        out = None if a is None else weight * a
        if b is not None:
            out = b.expand_as(weight) if out is None else out + b
        return out

    def bias_delta(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        terms = []
        d = self._tensor("D", weight.dtype)
        if d is not None and bias is not None:
            terms.append(bias * d)
        e = self._tensor("E", weight.dtype)
        if e is not None:
            terms.append(e.expand(weight.shape[0]))
        c = self._tensor("C", weight.dtype)
        if c is not None:  # the official "prompt" W C: (in, 1) low-rank or (in,) vector
            terms.append((weight @ c.reshape(-1, 1))[:, 0])
        return sum(terms[1:], terms[0]) if terms else None

    def forward(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        w = linear.weight.to(x.dtype)
        b = None if linear.bias is None else linear.bias.to(x.dtype)
        dw, db = self.weight_delta(w), self.bias_delta(w, b)
        if dw is None:
            return (db if db is not None else x.new_zeros(w.shape[0])).expand(*x.shape[:-1], w.shape[0])
        return F.linear(x, dw, db)


class GLoRA(Method):
    name = "glora"
    display_name = "GLoRA"
    summary = "GLoRA: W' = W + W*A + B, b' = b + b*D + E + W C on every linear (fixed per-layer forms)."
    paper = "Chavan et al., One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning, arXiv 2306.07967"
    published = {"vtab": "GLoRA"}
    mergeable = True
    hparams = {
        "rank": HParam(4, "rank of the low-rank forms (the official --rank, default 4)", low=1),
        "config": HParam("LLLVV", "forms of A,B,C,D,E: L/V/C/N letters; one code, or one per linear (comma-separated)"),
    }
    # The official supernet settings (GLoRA/supernet.py); its 500 epochs train the supernet.
    train_presets = {
        "vtab": {"*": {"lr": 1e-4, "weight_decay": 1e-4, "batch_size": 64, "warmup_epochs": 10, "warmup_lr": 1e-6,
                       "min_lr": 1e-5, "drop_path_rate": 0.1}},
    }

    def _linears(self, backbone: Backbone) -> list[nn.Linear]:
        return [getattr(blk, site) for blk in backbone.blocks for site in _SITES]

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        linears = self._linears(backbone)
        configs = parse_config(self.hp.config, len(linears))
        if any("lora" in forms.values() for forms in configs):
            narrow = min(min(lin.in_features, lin.out_features) for lin in linears)
            if self.hp.rank > narrow:
                raise PetlbenchError(
                    f"method 'glora': rank={self.hp.rank} is larger than the narrowest adapted linear ({narrow}). "
                    "Fix: e.g. --set rank=4."
                )
        modules = nn.ModuleList(
            GLoRALinear(lin.out_features, lin.in_features, self.hp.rank, forms)
            for lin, forms in zip(linears, configs, strict=True)
        )
        petl["glora"] = modules
        for lin, module in zip(linears, modules, strict=True):
            backbone.add_parallel(lin, functools.partial(module.forward, lin))

    @torch.no_grad()
    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for lin, module in zip(self._linears(backbone), petl["glora"], strict=True):
            w = lin.weight.double()
            b = None if lin.bias is None else lin.bias.double()
            dw, db = module.weight_delta(w), module.bias_delta(w, b)
            if db is not None:
                if lin.bias is None:
                    raise PetlbenchError("method 'glora' cannot merge into a linear without a bias; deploy unmerged.")
                lin.bias.copy_((b + db).to(lin.bias.dtype))
            if dw is not None:
                lin.weight.copy_((w + dw).to(lin.weight.dtype))
