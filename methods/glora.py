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
Training cost: ``W * A + B`` is formed densely at every step and applied as a branch in parallel
with the frozen linear (the official module forms W' and runs one matmul); merged, nothing extra.
Run side by side with the official ``SuperScalableLinear`` on the same tensors, every adapted
linear agrees to 8e-7 relative, fixed configuration or supernet.

The search, as an optional stage. The official pipeline (1) trains a supernet whose every
linear draws a random form for each of A..E at every step (``GLoRA/supernet.py``, 500 epochs,
lr 1e-4) and (2) runs an evolutionary search over per-linear forms under a parameter budget,
scoring each candidate with the supernet's weights (``evolution.py``), and reports that
sub-network without retraining. Here (1) is ``--set supernet=true`` (all tensors allocated in
their largest form, sampled per forward in training mode, ``config`` used in eval mode) and (2)
is :func:`search` on the trained supernet model, which returns the best ``config`` code. Both
are Python-level (train the supernet model with ``petlbench.engine.train`` or any loop;
``petlbench run`` keeps no weights), not CLI stages; give the search a validation split (the
official script searches on the test set). The official repository publishes no searched per-layer
configurations, so there are no per-task presets.

Other backbones: on a linear built without a bias (``qkv_bias=False``), D (which scales the bias)
has nothing to act on, so it is neither allocated nor counted; E and C then need a bias, which
the merge adds (the merged model is the timm model built with ``qkv_bias=True``/``proj_bias=True``,
recorded with the run). Only the blocks' linears are adapted: SigLIP's attention-pool head
(linears that are no block role) stays frozen.

Deliberate differences: the head is timm's (the official ``reset_classifier`` of timm 0.4.12
used PyTorch's default Linear init); on Swin the patch-merging reductions (linears that are no
block role) are left out.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import ensure_bias
from petlbench.search import accuracy, evolve

from ._recipes import PETL_VIT_VTAB

_FORMS = {"L": "lora", "V": "vector", "C": "constant", "N": "none"}
_ALLOWED = {"A": "LVCN", "B": "LVCN", "C": "LVN", "D": "VCN", "E": "VCN"}
_SITES = ("qkv", "proj", "fc1", "fc2")
_CHOICES = {k: tuple(_FORMS[ch] for ch in letters) for k, letters in _ALLOWED.items()}


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


_ALL_FORMS = {"lora": "L", "vector": "V", "constant": "C", "none": "N"}


def config_code(forms: dict[str, str]) -> str:
    """The five-letter code of one linear's forms (the inverse of :func:`parse_config`)."""
    return "".join(_ALL_FORMS[forms[k]] for k in "ABCDE")


class GLoRALinear(nn.Module):
    """The A..E tensors of one linear; ``forward(linear, x)`` is the branch added to ``linear(x)``.

    ``supernet``: allocate every tensor in its largest form and, in training mode, draw a random
    form for each of A..E at every forward, as the official ``SuperScalableLinear``; a vector A is
    then ``Ad[:, 0]`` and a constant ``Ad[0, 0]`` (slices of the low-rank factor), and eval mode
    uses ``forms``.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, forms: dict[str, str],
                 supernet: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.forms = dict(forms)
        self.supernet = supernet
        self.has_bias = bias  # D scales the bias: a linear without one gets no D (nothing to scale, never trained)
        self.sampled: dict[str, str] | None = None
        allocate = {k: "lora" if k in "ABC" else "vector" for k in "ABCDE"} if supernet else dict(forms)
        if not bias:
            allocate["D"] = "none"
        for key in "AB":
            self._make(key, allocate[key], (out_features, in_features), rank)
        self._make("C", allocate["C"], (in_features, 1), rank)
        for key in "DE":
            self._make(key, allocate[key], (out_features,), rank)

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

    def _tensor(self, key: str, dtype: torch.dtype, sampled: bool = False) -> torch.Tensor | None:
        """The tensor in a shape that broadcasts against W (A, B), W's input (C) or b (D, E)."""
        form = self.sampled[key] if sampled and self.sampled is not None else self.forms[key]
        if form == "none" or (key == "D" and not self.has_bias):
            return None
        if self.supernet and key in "ABC":
            down = getattr(self, f"{key}d").to(dtype)
            if form == "lora":
                return down @ getattr(self, f"{key}u").to(dtype)
            if form == "vector":
                return down[:, 0:1] if key in "AB" else down[:, 0]
            return down[0, 0]
        if form == "lora":
            return getattr(self, f"{key}d").to(dtype) @ getattr(self, f"{key}u").to(dtype)
        t = getattr(self, key).to(dtype)
        if self.supernet and form == "constant":
            return t[0]
        return t[:, None] if form == "vector" and key in "AB" else t

    def weight_delta(self, weight: torch.Tensor, sampled: bool = False) -> torch.Tensor | None:
        a, b = self._tensor("A", weight.dtype, sampled), self._tensor("B", weight.dtype, sampled)
        out = None if a is None else weight * a
        if b is not None:
            out = b.expand_as(weight) if out is None else out + b
        return out

    def bias_delta(self, weight: torch.Tensor, bias: torch.Tensor | None, sampled: bool = False) -> torch.Tensor | None:
        terms = []
        d = self._tensor("D", weight.dtype, sampled)
        if d is not None and bias is not None:
            terms.append(bias * d)
        e = self._tensor("E", weight.dtype, sampled)
        if e is not None:
            terms.append(e.expand(weight.shape[0]))
        c = self._tensor("C", weight.dtype, sampled)
        if c is not None:  # the official "prompt" W C: (in, 1) low-rank or (in,) vector
            terms.append((weight @ c.reshape(-1, 1))[:, 0])
        return sum(terms[1:], terms[0]) if terms else None

    def forward(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        sampled = self.supernet and self.training
        if sampled:  # a uniform random sub-network for this step (random.choice(self.configs) upstream)
            self.sampled = {k: _FORMS[_ALLOWED[k][int(torch.randint(len(_ALLOWED[k]), ()))]] for k in "ABCDE"}
        w = linear.weight.to(x.dtype)
        b = None if linear.bias is None else linear.bias.to(x.dtype)
        dw, db = self.weight_delta(w, sampled), self.bias_delta(w, b, sampled)
        if dw is None:
            return (db if db is not None else x.new_zeros(w.shape[0])).expand(*x.shape[:-1], w.shape[0])
        return F.linear(x, dw, db)


def subnet_params(forms: dict[str, str], out_features: int, in_features: int, rank: int, bias: bool = True) -> int:
    """Parameters of one linear's sub-network, counted as the official search does (``get_param``);
    a linear without a bias has no D (see :class:`GLoRALinear`)."""
    total = 0
    for key, form in forms.items():
        if key == "D" and not bias:
            continue
        o, i = (in_features, 1) if key == "C" else (out_features, in_features)
        total += {"lora": (o + i) * rank, "vector": o, "constant": 1, "none": 0}[form]
    return total


class GLoRA(Method):
    name = "glora"
    families = frozenset({"vit", "deit_distilled", "swin"})
    family_refusals = {
        "eva": EVA_NO_QKV,
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    display_name = "GLoRA"
    summary = "GLoRA: W' = W + W*A + B, b' = b + b*D + E + W C on every linear (fixed per-layer forms)."
    paper = "Chavan et al., One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning, arXiv 2306.07967"
    # The shipped reference table has no per-task GLoRA rows yet (none found with provenance); once it
    # does, declare them here under their agreed name: {"vtab": "GLoRA"}.
    published: dict[str, str] = {}
    mergeable = True
    bounded_by_width = frozenset({"rank"})
    hparams = {
        "rank": HParam(4, "rank of the low-rank forms (the official --rank, default 4)", low=1),
        "config": HParam("LLLVV", "forms of A,B,C,D,E: L/V/C/N letters; one code, or one per linear (comma-separated)"),
        "supernet": HParam(False, "train the supernet (a random form per linear at every step; eval uses config), "
                                  "the first stage of GLoRA's search"),
    }
    # GLoRA/supernet.py: the official pipeline's only training run is the supernet's (500 epochs); the searched
    # sub-network is reported with the supernet's weights, never retrained. So 500 is the run's `epochs` here:
    # a paper run with --set supernet=true is that stage; the search (glora.search) is a separate Python step.
    recipes = {
        "vtab": {"*": {**PETL_VIT_VTAB, "lr": 1e-4, "weight_decay": 1e-4, "epochs": 500, "selection": "final",
                       "eval_every": 100}},
    }
    recipe_source = {
        "vtab": "Arnav0400/ViT-Slim: GLoRA/supernet.py (AdamW(A..E + head tensors, lr 1e-4 (README: 'LR=1e-4 works "
                "very well across datasets'), wd 1e-4), timm CosineLRScheduler(t_initial=500, warmup_t=10, "
                "lr_min=1e-5, warmup_lr_init=1e-6) stepped scheduler.step(ep) after epoch ep, 500 epochs, "
                "create_model(drop_path_rate=0.1), reset_classifier (timm 0.6.5: PyTorch's default nn.Linear "
                "init)), GLoRA/engine.py (test loader evaluated every 100 epochs, the last supernet saved), "
                "GLoRA/data/vtab.py (batch 64, drop_last=True, Resize((224, 224)) bicubic, ImageNet mean/std; "
                "evaluate=True until commit c1429c3 (Sep 2023): train800val200 for training, test.txt for the "
                "evaluations and evolution.py's search), GLoRA/README.md (500 epochs for every dataset).",
    }
    recipe_differences = {
        "vtab": "The official pipeline reports the sub-network its evolutionary search (evolution.py, 20 "
                "generations) picks, scored on the test set with the supernet's weights; here --set supernet=true "
                "trains the supernet with this recipe and glora.search runs the search on a validation split; "
                "with supernet=false the recipe trains one fixed configuration for 500 epochs, which the official "
                "code never does. Since commit c1429c3 the official code trains on train800 and searches on val200; "
                "the published numbers (June 2023) predate it, so the recipe keeps the protocol's train800val200. "
                "fp32 and one seed (42) officially.",
        "fgvc": "no recipe: the GLoRA code reads VTAB-1k and few-shot data only.",
    }

    def _linears(self, backbone: Backbone) -> list[nn.Linear]:
        return [getattr(blk, site) for blk in backbone.blocks for site in _SITES]

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        linears = self._linears(backbone)
        configs = parse_config(self.hp.config, len(linears))
        modules = nn.ModuleList(
            GLoRALinear(lin.out_features, lin.in_features, self.hp.rank, forms, self.hp.supernet,
                        lin.bias is not None)
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
            if db is not None:  # a linear built without a bias gets one (see petlbench.merge)
                bias = ensure_bias(lin, "a linear layer")
                bias.copy_(((b if b is not None else 0.0) + db).to(bias.dtype))
            if dw is not None:
                lin.weight.copy_((w + dw).to(lin.weight.dtype))


# ------------------------------------------------------------------------ evolutionary search
def search(model, loader: Iterable, device: torch.device | str = "cpu", *, param_limit: float = 1e6,
           min_params: float = 0, epochs: int = 20, population: int = 50, select: int = 10, mutation: int = 25,
           crossover: int = 25, m_prob: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """GLoRA's evolutionary search (``GLoRA/evolution_utils.py``) over a trained supernet.

    ``model``: a :func:`petlbench.create_model` GLoRA model built with ``supernet=True`` and its
    supernet weights trained. Each candidate (one form per A..E per linear) is scored by accuracy
    on ``loader`` with the supernet's weights; candidates outside [min_params, param_limit]
    (counted as the official search counts) are skipped. Defaults are the official ones (20
    generations of 50: top 10 kept, 25 by mutation with probability 0.2, 25 by crossover, the rest
    random). Use a validation split: the official script searches on the test set.

    Returns ``{"config", "accuracy", "params", "evaluated"}``; ``config`` is the comma-separated code
    to pass as ``--set config=...`` (with ``supernet=false`` to retrain it, or with ``supernet=true``
    to evaluate the supernet weights as the official pipeline does). The model is left as it was.
    """
    if getattr(model.method, "name", None) != "glora" or not model.method.hp.supernet:
        raise PetlbenchError("GLoRA search needs a GLoRA model built with supernet=True (its trained supernet). "
                             "Fix: petlbench.create_model(..., 'glora', ..., supernet=True) and load its weights.")
    modules = list(model.petl["glora"])
    linears = model.method._linears(model.backbone)
    shapes = [(lin.out_features, lin.in_features, lin.bias is not None) for lin in linears]
    rank = model.method.hp.rank
    rng = random.Random(seed)
    original = [dict(m.forms) for m in modules]
    was_training = model.training

    def params(cand: tuple) -> int:
        return sum(subnet_params(dict(zip("ABCDE", code, strict=True)), o, i, rank, bias)
                   for code, (o, i, bias) in zip(cand, shapes, strict=True))

    def score(cand: tuple) -> tuple[float, int] | None:
        n = params(cand)
        if n > param_limit or n < min_params:
            return None
        for m, code in zip(modules, cand, strict=True):
            m.forms = dict(zip("ABCDE", code, strict=True))
        return accuracy(model, loader, device), n

    def random_cand() -> tuple:
        return tuple(tuple(rng.choice(_CHOICES[k]) for k in "ABCDE") for _ in modules)

    def mutate(top: list[tuple]) -> tuple:
        parent = rng.choice(top)
        return tuple(tuple(rng.choice(_CHOICES[k]) if rng.random() < m_prob else layer[j]
                           for j, k in enumerate("ABCDE")) for layer in parent)

    def cross(top: list[tuple]) -> tuple:
        a, b = rng.choice(top), rng.choice(top)
        return tuple(tuple(rng.choice([x[j], y[j]]) for j in range(5)) for x, y in zip(a, b, strict=True))

    model.eval()
    try:
        best, scores = evolve(score, random_cand, mutate, cross, epochs=epochs, population=population,
                              select=select, mutation=mutation, crossover=crossover,
                              what="GLoRA search", budget=f"{min_params:g}..{param_limit:g} parameters")
    finally:
        for m, forms in zip(modules, original, strict=True):
            m.forms = forms
        model.train(was_training)
    return {"config": ",".join(map(config_code, (dict(zip("ABCDE", c, strict=True)) for c in best))),
            "accuracy": scores[best][0], "params": scores[best][1], "evaluated": len(scores)}
