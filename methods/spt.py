"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023), LoRA and Adapter.

Before training, a calibration pass on the task's training data (petlbench's calibration step)
decides what trains, as ziplab/SPT ``engine.get_sensitivity`` and ``train_spt.py`` do:

1. **Sensitivity**: the squared gradient of the loss, summed over the first ``calib_images``
   training images (official: 16 batches of 32 = 512, in file order), for every entry of each
   block's q, k, v (row blocks of timm's fused ``qkv``), ``proj``, ``fc1``, ``fc2`` weights, their
   biases, ``norm1``/``norm2`` and the final norm (``fc_norm`` on average-pooled ViTs, whose final
   norm is an Identity). Patch embedding, position embedding, class token, a pre-norm (CLIP's
   ``norm_pre``), SigLIP's attention-pool head and the classifier head are not ranked (as in the
   official code, which has none of the last three).
2. **Budget**: the top-``tau`` entries are "sensitive"; for each weight matrix, if it holds at least
   ``cost / alpha`` of them (``cost`` = the structured module's size as the official code counts
   it), the matrix gets a **structured** module (LoRA or adapter, rank ``rank``) instead;
   otherwise exactly its sensitive entries train (**unstructured**, a sparse delta). A bias or
   norm vector with at least ``size / beta`` sensitive entries is tuned whole. ``tau`` is swept
   and the configuration whose count is closest to ``budget`` (M parameters) is kept, as the
   official sweep does (its grid: 0.02 M steps; petlbench: budget/40 steps, so tiny models work).
3. **Training**: structured LoRA ``B A x`` (A kaiming-uniform, B zero, scale 1, no bias) or
   adapter ``W2 GELU(W1 x + b1) + b2`` (W1 kaiming-uniform, W2 and b2 zero) runs in parallel with
   its matrix, with dropout 0.1 on the branch input (not for ``proj``, as the official code) and
   drop-path 0.1 on the branch output; sparse entries are added to the frozen weight as a delta;
   the class token is tuned too (official: ``cls_token`` always trains; here a delta added to the
   token sequence before any pre-norm, the same function, merged into ``cls_token``).

Chosen positions are buffers of ``petl`` (saved with the trainable state; a saved state rebuilds
the model without data); the trainable count is the number of parameters that really train (the
sparse values, the structured modules, the whole vectors, the class token).

Deliberate differences: the sensitivity pass runs in the run's precision instead of fp16 AMP;
sensitive entries of LayerNorm vectors that are not tuned whole are dropped *and not counted*
(the official code counts them but never trains them: only Linear layers get sparse deltas);
q/k/v are row blocks of the fused ``qkv`` (the official model splits them, same function).
SPT-LoRA merges exactly (every change is linear in a frozen weight); SPT-Adapter does not (GELU).
The count depends on the task's gradients: ``petlbench params`` shows the uncalibrated model
(head and class token only); after calibration the count is the budget within the sweep's step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError


@dataclass(frozen=True)
class _Unit:
    """One decision unit: a weight matrix (row block) or a vector, a contiguous slice of a tensor."""

    name: str
    layer_name: str  # the module the unit belongs to ("b3_qkv", "b3_norm1", "final_norm")
    layer: nn.Module
    tensor: str  # "weight" | "bias"
    start: int  # first row (matrices) or element (vectors)
    stop: int
    matrix: bool
    linear: bool  # belongs to an nn.Linear (norm vectors: False)

    @property
    def size(self) -> int:
        t = getattr(self.layer, self.tensor)
        return (self.stop - self.start) * (t.shape[1] if self.matrix else 1)

    def values(self) -> torch.Tensor:
        t = getattr(self.layer, self.tensor)
        return t[self.start:self.stop].reshape(-1)


def _units(backbone: Backbone) -> list[_Unit]:
    units: list[_Unit] = []
    for b in backbone.blocks:
        d = b.dim
        for j, part in enumerate("qkv"):
            units.append(_Unit(f"b{b.index}_{part}", f"b{b.index}_qkv", b.qkv, "weight", j * d, (j + 1) * d, True,
                               True))
        for role in ("proj", "fc1", "fc2"):
            layer = getattr(b, role)
            units.append(_Unit(f"b{b.index}_{role}", f"b{b.index}_{role}", layer, "weight", 0, layer.out_features,
                               True, True))
        if b.qkv.bias is not None:
            for j, part in enumerate("qkv"):
                units.append(_Unit(f"b{b.index}_{part}_bias", f"b{b.index}_qkv", b.qkv, "bias", j * d, (j + 1) * d,
                                   False, True))
        for role in ("proj", "fc1", "fc2"):
            layer = getattr(b, role)
            if layer.bias is not None:
                units.append(_Unit(f"b{b.index}_{role}_bias", f"b{b.index}_{role}", layer, "bias", 0,
                                   layer.out_features, False, True))
        for role in ("norm1", "norm2"):
            norm = getattr(b, role)
            for tensor in ("weight", "bias"):
                if isinstance(getattr(norm, tensor, None), nn.Parameter):
                    units.append(_Unit(f"b{b.index}_{role}_{tensor}", f"b{b.index}_{role}", norm, tensor, 0, b.dim,
                                       False, False))
    final = backbone.last_norm  # the final norm, or fc_norm after an average pool (MAE)
    for tensor in ("weight", "bias"):
        if final is not None and isinstance(getattr(final, tensor, None), nn.Parameter):
            units.append(_Unit(f"final_norm_{tensor}", "final_norm", final, tensor, 0, final.normalized_shape[0],
                               False, False))
    return units


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a branch: drop the whole branch per sample (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Structured(nn.Module):
    """SPT's structured module in parallel with one matrix: LoRA (B A x) or adapter (W2 GELU(W1 x + b1) + b2)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.down = nn.Linear(in_dim, rank, bias=kind == "adapter")
        self.up = nn.Linear(rank, out_dim, bias=kind == "adapter")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        if kind == "adapter":
            nn.init.zeros_(self.up.bias)  # the down bias keeps nn.Linear's default, as the official code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        return self.up(F.gelu(h) if self.kind == "adapter" else h)

    def delta(self) -> torch.Tensor:
        return self.up.weight.double() @ self.down.weight.double()


class LinearDelta(nn.Module):
    """Everything SPT trains on one frozen nn.Linear, as a branch in parallel with it.

    Sparse weight entries (``w_index`` into the flattened weight, ``w_values``), bias entries
    (``b_index``/``b_values``; a bias tuned whole is all of its indices), and structured modules on
    row blocks (``row_starts`` holds each module's first row). The indices are rebuilt from the
    saved :class:`Plan`, so they are not saved (nor counted in the state's bytes) a second time.
    """

    def __init__(self, out_dim: int, in_dim: int, w_index: torch.Tensor, b_index: torch.Tensor,
                 structured: Iterable[tuple[int, nn.Module]], dropout: float, drop_path: float) -> None:
        super().__init__()
        self.out_dim, self.in_dim = out_dim, in_dim
        # derived from the plan (which is what is saved): not part of the per-task state
        self.register_buffer("w_index", w_index.long(), persistent=False)
        self.register_buffer("b_index", b_index.long(), persistent=False)
        # no empty parameters: a tensor that trains nothing is not a trainable tensor
        self.w_values = nn.Parameter(torch.zeros(len(w_index))) if len(w_index) else None
        self.b_values = nn.Parameter(torch.zeros(len(b_index))) if len(b_index) else None
        pairs = list(structured)
        self.row_starts = [r for r, _ in pairs]  # host ints: a device tensor would sync the GPU every step
        self.branches = nn.ModuleList(m for _, m in pairs)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = drop_path

    def weight_delta(self) -> torch.Tensor:
        flat = self.w_values.new_zeros(self.out_dim * self.in_dim)
        return flat.index_put((self.w_index,), self.w_values).view(self.out_dim, self.in_dim)

    def bias_delta(self) -> torch.Tensor:
        return self.b_values.new_zeros(self.out_dim).index_put((self.b_index,), self.b_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.out_dim)
        if len(self.w_index):
            out = out + F.linear(x, self.weight_delta().to(x.dtype))
        if len(self.b_index):
            out = out + self.bias_delta().to(x.dtype)
        if len(self.branches):
            xin = self.dropout(x)
            parts = []
            for row, branch in zip(self.row_starts, self.branches, strict=True):
                y = _drop_path(branch(xin), self.drop_path, self.training)
                parts.append(F.pad(y, (row, self.out_dim - row - y.shape[-1])))
            out = out + sum(parts)
        return out


class NormDelta(nn.Module):
    """A LayerNorm's weight and/or bias tuned whole: adds ``dgamma * LN(x) + dbeta`` in parallel."""

    def __init__(self, dim: int, eps: float, gamma: bool, beta: bool) -> None:
        super().__init__()
        self.eps = eps
        self.dgamma = nn.Parameter(torch.zeros(dim)) if gamma else None
        self.dbeta = nn.Parameter(torch.zeros(dim)) if beta else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        if self.dgamma is not None:
            out = out + F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.dgamma.to(x.dtype)
        if self.dbeta is not None:
            out = out + self.dbeta.to(x.dtype)
        return out


class ClsDelta(nn.Module):
    """A delta on the class token (position 0 of the token sequence)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, :1] + self.delta.to(tokens.dtype), tokens[:, 1:]], dim=1)


class Plan(nn.Module):
    """What calibration chose, as buffers: per unit, structured (matrices) / tuned whole (vectors),
    and the flat indices of the sparse entries (into the unit's slice)."""

    def __init__(self, units: list[_Unit]) -> None:
        super().__init__()
        self.register_buffer("whole", torch.zeros(len(units), dtype=torch.bool))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.sparse = nn.Module()
        for u in units:
            self.sparse.register_buffer(u.name, torch.zeros(0, dtype=torch.long))


class _SPT(Method):
    families = frozenset({"vit", "swin"})
    needs_calibration = True
    structured_type = "lora"
    bounded_by_width = frozenset({"rank"})
    hparams = {
        "rank": HParam(8, "rank of the structured LoRA / adapter modules (official low_rank_dim)", low=1),
        "budget": HParam(0.4, "trainable parameters to aim for, in millions, head excluded (official "
                         "param_req_0.2 .. 1.0)", low=0.0, low_exclusive=True),
        "alpha": HParam(10.0, "a matrix is tuned structurally with >= cost/alpha sensitive entries", low=0.0,
                        low_exclusive=True),
        "beta": HParam(5.0, "a vector is tuned whole with >= size/beta sensitive entries", low=0.0, low_exclusive=True),
        "calib_images": HParam(512, "training images the sensitivity pass reads (official 16 x 32)", low=1),
        "dropout": HParam(0.1, "dropout on the structured modules' input (not for proj)", low=0.0, high=0.99),
        "drop_path": HParam(0.1, "drop-path on the structured modules' output", low=0.0, high=0.99),
    }
    train_presets = {"vtab": {"*": {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100}}}

    # ------------------------------------------------------------------ structure
    _cls_size = 0

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        units = _units(backbone)
        petl["plan"] = Plan(units)
        petl["linear"], petl["norms"] = nn.ModuleDict(), nn.ModuleDict()
        if backbone.cls_token is not None:
            self._cls_size = backbone.cls_token.numel()
            petl["cls"] = ClsDelta(backbone.cls_token.shape[-1])
            # At the token site's input: before a pre-norm (CLIP's norm_pre), where a delta on the
            # class token is the same as a delta on ``cls_token`` itself (what the official code
            # tunes) and merges into it exactly.
            backbone.transform_input(backbone.token_site, petl["cls"])

    def _cost(self, unit: _Unit) -> int:
        """Structured module size as the official code counts it for the decision."""
        out_dim, in_dim, r = unit.stop - unit.start, unit.layer.weight.shape[1], self.hp.rank
        if self.structured_type == "lora":
            return in_dim * r + r * out_dim
        return out_dim * r + r * out_dim + r + out_dim  # the official formula (uses out_dim twice)

    def _build(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Create the modules the plan asks for and hook them (after calibrate or restore)."""
        units = _units(backbone)
        plan: Plan = petl["plan"]
        whole = plan.whole.tolist()
        by_layer: dict[str, list[tuple[_Unit, bool, torch.Tensor]]] = {}
        for u, w in zip(units, whole, strict=True):
            by_layer.setdefault(u.layer_name, []).append((u, w, getattr(plan.sparse, u.name)))
        deltas, norms = nn.ModuleDict(), nn.ModuleDict()
        for name, entries in by_layer.items():
            layer = entries[0][0].layer
            if isinstance(layer, nn.Linear):
                w_idx, b_idx, structured = [], [], []
                for u, w, idx in entries:
                    if u.matrix and w:
                        structured.append((u.start, Structured(layer.in_features, u.stop - u.start, self.hp.rank,
                                                               self.structured_type)))
                    elif u.matrix:
                        w_idx.append(idx.to(layer.weight.device) + u.start * layer.in_features)
                    elif w:
                        b_idx.append(torch.arange(u.start, u.stop, device=layer.weight.device))
                    else:
                        b_idx.append(idx.to(layer.weight.device) + u.start)
                w_index = torch.cat(w_idx) if w_idx else torch.zeros(0, dtype=torch.long)
                b_index = torch.cat(b_idx) if b_idx else torch.zeros(0, dtype=torch.long)
                if not (len(w_index) or len(b_index) or structured):
                    continue
                is_proj = name.endswith("_proj")  # the official code feeds proj's branch without dropout
                module = LinearDelta(layer.out_features, layer.in_features, w_index, b_index, structured,
                                     0.0 if is_proj else self.hp.dropout, self.hp.drop_path)
                deltas[name] = module
                backbone.add_parallel(layer, module)
            else:  # a LayerNorm: only vectors tuned whole train (sparse norm entries are dropped, see docstring)
                gamma = any(w for u, w, _ in entries if u.tensor == "weight")
                beta = any(w for u, w, _ in entries if u.tensor == "bias")
                if gamma or beta:
                    norms[name] = NormDelta(layer.normalized_shape[0], layer.eps, gamma, beta)
                    backbone.add_parallel(layer, norms[name])
        petl["linear"] = deltas
        petl["norms"] = norms
        plan.calibrated.fill_(True)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, backbone: Backbone, petl: nn.ModuleDict, loader, device: torch.device) -> None:
        units = _units(backbone)
        tensors = list({id(getattr(u.layer, u.tensor)): getattr(u.layer, u.tensor) for u in units}.values())
        grad_sq = {id(t): torch.zeros_like(t, dtype=torch.float32) for t in tensors}
        flags = [t.requires_grad for t in tensors]
        for t in tensors:
            t.requires_grad_(True)
        seen = 0
        try:
            for x, y in loader:
                loss = F.cross_entropy(backbone.model(x).float(), y)
                for t, g in zip(tensors, torch.autograd.grad(loss, tensors), strict=True):
                    grad_sq[id(t)] += g.float() ** 2
                seen += int(y.shape[0])
                if seen >= self.hp.calib_images:
                    break
        finally:
            for t, flag in zip(tensors, flags, strict=True):
                t.requires_grad_(flag)
        if seen == 0:
            raise PetlbenchError(f"method {self.name!r}: the calibration loader yielded no training images. Fix: "
                                 "run it on a task with a non-empty training split.")
        scores = torch.cat([grad_sq[id(getattr(u.layer, u.tensor))][u.start:u.stop].reshape(-1) for u in units])
        whole, sparse = self._choose(units, scores)
        plan: Plan = petl["plan"]
        plan.whole.copy_(torch.tensor(whole, dtype=torch.bool))
        for u, idx in zip(units, sparse, strict=True):
            setattr(plan.sparse, u.name, idx.cpu())
        self._build(backbone, petl)

    def _choose(self, units: list[_Unit], scores: torch.Tensor) -> tuple[list[bool], list[torch.Tensor]]:
        """The official budget sweep: the tau whose resulting count is closest to the budget wins."""
        sizes = torch.tensor([u.size for u in units], device=scores.device)
        owner = torch.repeat_interleave(torch.arange(len(units), device=scores.device), sizes)
        order = torch.argsort(scores, descending=True, stable=True)
        budget = self.hp.budget * 1e6
        costs = torch.tensor([self._cost(u) if u.matrix else u.size for u in units], device=scores.device,
                             dtype=torch.float64)
        is_matrix = torch.tensor([u.matrix for u in units], device=scores.device)
        is_linear = torch.tensor([u.linear for u in units], device=scores.device)
        thresholds = torch.where(is_matrix, costs / self.hp.alpha, sizes.double() / self.hp.beta)
        real_costs = torch.tensor([self._real_cost(u) if u.matrix else u.size for u in units], device=scores.device,
                                  dtype=torch.float64)
        # the official total adds the class token (768); so does ours, where the backbone has one
        cls = float(self._cls_size)
        best = None
        steps = 80
        for k in range(1, steps + 1):
            tau = min(len(scores), max(1, math.ceil(k * budget / (steps / 2))))
            counts = torch.bincount(owner[order[:tau]], minlength=len(units)).double()
            whole = counts >= thresholds
            # what would really train: structured/whole units at their size, sparse linear entries one each
            total = float(torch.where(whole, real_costs, torch.where(is_linear, counts, 0.0)).sum()) + cls
            if best is None or abs(total - budget) <= abs(best[0] - budget):
                best = (total, tau, whole)
            if tau == len(scores):
                break
        assert best is not None
        _, tau, whole = best
        chosen = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
        chosen[order[:tau]] = True
        offsets = torch.cumsum(sizes, 0) - sizes
        sparse = []
        for i, u in enumerate(units):
            if whole[i] or not u.linear:
                sparse.append(torch.zeros(0, dtype=torch.long))
            else:
                piece = chosen[int(offsets[i]):int(offsets[i]) + u.size]
                sparse.append(torch.nonzero(piece).reshape(-1).cpu())
        return whole.tolist(), sparse

    def _real_cost(self, unit: _Unit) -> int:
        in_dim, out_dim, r = unit.layer.weight.shape[1], unit.stop - unit.start, self.hp.rank
        return in_dim * r + r * out_dim + ((r + out_dim) if self.structured_type == "adapter" else 0)

    def restore_calibration(self, backbone: Backbone, petl: nn.ModuleDict, buffers) -> None:
        plan: Plan = petl["plan"]
        for key, value in buffers.items():
            if key == "plan.whole":
                if value.shape != plan.whole.shape:
                    raise PetlbenchError(f"method {self.name!r}: the saved plan has {value.numel()} units, this "
                                         f"backbone {plan.whole.numel()}. Fix: load it into the same backbone.")
                plan.whole.copy_(value)
            elif key.startswith("plan.sparse."):
                setattr(plan.sparse, key[len("plan.sparse."):], value.long().clone())
        self._build(backbone, petl)

    # ------------------------------------------------------------------ merge
    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        if self.structured_type != "lora":
            super().merge(backbone, petl)
        units = _units(backbone)
        layers = {u.layer_name: u.layer for u in units}
        for name, delta in petl["linear"].items():
            layer = layers[name]
            w = layer.weight.double()
            if len(delta.w_index):
                w = w + delta.weight_delta().double()
            for row, branch in zip(delta.row_starts, delta.branches, strict=True):
                w[row:row + branch.up.out_features] += branch.delta()
            layer.weight.copy_(w.to(layer.weight.dtype))
            if len(delta.b_index):
                layer.bias.copy_((layer.bias.double() + delta.bias_delta().double()).to(layer.bias.dtype))
        for name, delta in petl["norms"].items():
            norm = layers[name]
            if delta.dgamma is not None:
                norm.weight.copy_((norm.weight.double() + delta.dgamma.double()).to(norm.weight.dtype))
            if delta.dbeta is not None:
                norm.bias.copy_((norm.bias.double() + delta.dbeta.double()).to(norm.bias.dtype))
        if "cls" in petl:
            token = backbone.cls_token
            token.copy_((token.double() + petl["cls"].delta.double()).to(token.dtype))


class SPTLoRA(_SPT):
    name = "spt_lora"
    display_name = "SPT-LoRA"
    summary = "SPT-LoRA: gradient sensitivity picks sparse weight entries and matrices that get LoRA (calibrated)."
    paper = "He et al., Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning, ICCV 2023"
    mergeable = True
    structured_type = "lora"


class SPTAdapter(_SPT):
    name = "spt_adapter"
    display_name = "SPT-Adapter"
    summary = "SPT-Adapter: gradient sensitivity picks sparse weight entries and matrices that get an adapter."
    paper = "He et al., Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning, ICCV 2023"
    structured_type = "adapter"
