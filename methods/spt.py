"""SPT: Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., ICCV 2023), LoRA and Adapter.

Before training, a calibration pass on the task's training data (petlbench's calibration step)
decides what trains, as ziplab/SPT ``engine.get_sensitivity`` and ``train_spt.py`` do:

1. **Sensitivity**: the squared gradient of the cross-entropy, one gradient per batch of
   ``calib_batch`` (32) images, summed over the first ``calib_images`` training images (official:
   16 batches of 32 = 512), for every entry of each block's q, k, v (row blocks of timm's fused
   ``qkv``), ``proj``, ``fc1``, ``fc2`` weights, their biases, ``norm1``/``norm2`` and the final
   norm. Patch embedding, position embedding, class token and head are not ranked (as in the
   official code). The model runs in train mode, as the official ``model.train()``: the run's
   ``drop_path_rate`` (official 0.1) and dropouts act during the pass. fp32, as the official
   scripts (``--amp`` is off by default).
2. **Budget sweep**, the official rule: step k = 1..79 marks the top ``ceil(k * 0.02e6)`` entries
   sensitive (``sweep_step`` = 0.02 M). A weight matrix with >= ``cost / alpha`` sensitive
   entries (``cost`` = its structured module's size) gets a **structured** module (LoRA or
   adapter, rank ``rank``); otherwise exactly its sensitive entries train (**unstructured**, a
   sparse delta). A bias or norm vector with >= ``size / beta`` sensitive entries is tuned whole.
   Each step's total counts structured modules and whole vectors at their size, every other
   sensitive entry once (LayerNorm entries included, although only Linear entries ever train),
   plus 768 for the class token; the step closest to ``budget`` (M parameters) wins, later steps
   on ties. A tiny model needs a smaller ``sweep_step`` (e.g. budget/40).
3. **Training** (``train_spt.py --block BlockSPTParallel`` for LoRA, ``BlockSPTSeq`` for the
   adapter): structured LoRA ``B A dropout(x)`` runs in parallel with its matrix (no bias, scale
   1). The structured **adapter** ``W2 GELU(W1 y + b1) + b2`` is *sequential* on the output
   ``y = Wx + b`` of q, k, v, fc1 and fc2: ``y + adapter(dropout(y))``, the adapter mapping that
   output's width to r and back (fc1's: hidden -> r -> hidden), before fc1's activation and fc2's
   dropout; on ``proj`` it runs in parallel with the layer, on its input (as the official
   ``AttentionSPTSeq``). Dropout 0.1 on every structured module's input except proj's, drop-path
   0.1 on its output. Every structured Linear starts trunc-normal std 0.02 with zero bias: the
   official ``VisionTransformerSPT`` builds the modules, then its ``init_weights('')`` (timm's
   ``_init_vit_weights`` over the whole model) redraws them, so LoRA's B is not zero at step 0.
   Sparse entries are added to the frozen weight as a delta; the class token is tuned too
   (official: ``cls_token`` always trains; here a delta added to the token sequence before any
   pre-norm, the same function, merged into ``cls_token``).

Chosen positions are buffers of ``petl`` (saved with the trainable state; a saved state rebuilds
the model without data); the trainable count is the number of parameters that really train (the
sparse values, the structured modules, the whole vectors, the class token).

Deliberate differences: the pass reads the run's training loader in its (seeded, shuffled) order,
not the official file order; q/k/v are row blocks of the fused ``qkv`` (the official model splits
them, same function); ties between equal sensitivities go to the earlier entry (the official
``topk`` leaves them unspecified). SPT-LoRA merges exactly (every change is linear in a frozen
weight); SPT-Adapter does not (GELU). The count depends on the task's gradients: ``petlbench
params`` shows the uncalibrated model (head and class token only); after calibration the count
is near the budget (the sweep's total includes LayerNorm entries that never train and counts the
class token as 768).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import init_vit_linear

from ._recipes import NOAH_VTAB


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


def _rebatch(loader: Iterable, size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's (images, labels) in order, re-cut into batches of ``size`` (the last may be
    shorter): the squared gradients SPT sums depend on the batch size, so the sensitivity pass
    uses the official one whatever the run trains with. A loader batch is pulled only when needed."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        held += int(y.shape[0])
        while held >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, held = [x_all[size:]], [y_all[size:]], held - size
    if held:
        yield torch.cat(xs), torch.cat(ys)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a branch: drop the whole branch per sample (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Structured(nn.Module):
    """SPT's structured module on one matrix: LoRA (B A x) or adapter (W2 GELU(W1 x + b1) + b2).

    Initialised as the official model leaves it: ``StructuredTuningModule`` writes kaiming/zero,
    but ``VisionTransformerSPT.__init__`` then runs ``init_weights('')`` (timm's
    ``_init_vit_weights`` over the whole model, structured modules included), which redraws every
    Linear trunc-normal std 0.02 with zero bias: LoRA's B is not zero at step 0.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.down = nn.Linear(in_dim, rank, bias=kind == "adapter")
        self.up = nn.Linear(rank, out_dim, bias=kind == "adapter")
        init_vit_linear(self.down)
        init_vit_linear(self.up)

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


class OutputAdapters(nn.Module):
    """SPT-Adapter's sequential modules on one frozen nn.Linear's output (official ``BlockSPTSeq``).

    For each adapted row block ``y`` of the layer's output (q, k or v of the fused qkv; the whole
    of fc1 or fc2, its sparse delta included), ``y <- y + drop_path(adapter(dropout(y)))``: the
    adapter maps the block's width to ``rank`` and back (fc1's: hidden -> r -> hidden), applied
    before the activation (fc1) or the MLP's dropout (fc2), as ``AttentionSPTSeq``/``MlpSPTSeq`` do.
    """

    def __init__(self, out_dim: int, structured: Iterable[tuple[int, nn.Module]], dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.out_dim = out_dim
        pairs = list(structured)
        self.row_starts = [r for r, _ in pairs]  # host ints, as LinearDelta's
        self.branches = nn.ModuleList(m for _, m in pairs)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = drop_path

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        parts = []
        for row, branch in zip(self.row_starts, self.branches, strict=True):
            block = y[..., row:row + branch.up.out_features]
            delta = _drop_path(branch(self.dropout(block)), self.drop_path, self.training)
            parts.append(F.pad(delta, (row, self.out_dim - row - delta.shape[-1])))
        return y + sum(parts)


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
    families = frozenset({"vit", "deit_distilled", "swin"})
    family_refusals = {"eva": EVA_NO_QKV, "convnext": CONVNEXT_NO_ATTENTION}
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
        "calib_batch": HParam(32, "batch size of the sensitivity pass: the run's training batches are re-cut to it "
                              "(official --batch-size 32 of the sensitivity scripts)", low=1),
        "sweep_step": HParam(0.02, "step of the budget sweep, in millions of sensitive entries (official 0.02, 79 "
                             "steps; a tiny model needs a smaller one, e.g. budget/40)", low=0.0, low_exclusive=True),
        "dropout": HParam(0.1, "dropout on the structured modules' input (not for proj)", low=0.0, high=0.99),
        "drop_path": HParam(0.1, "drop-path on the structured modules' output", low=0.0, high=0.99),
    }
    # ziplab/SPT configs/vtab_supervised_spt_{lora,adapter}.sh + train_spt.py (see recipe_source).
    recipes = {"vtab": {"*": {**NOAH_VTAB, "drop_last": False}}}
    recipe_source = {
        "vtab": "ziplab/SPT: configs/vtab_supervised_spt_lora.sh / _adapter.sh (--batch-size=64 --lr=0.001 "
                "--epochs=100 --weight-decay=0.0001 --no_aug --mixup=0 --cutmix=0 --direct_resize --smoothing=0 "
                "--val_interval=10 --opt=adamw --low_rank_dim=8 --test, sensitivity files for param_req 0.2..1.0), "
                "train_spt.py (defaults --drop-path 0.1, --warmup-epochs 10, --warmup-lr 1e-6, --min-lr 1e-5; timm "
                "0.5.4 create_scheduler stepped lr_scheduler.step(epoch) after every epoch; train loader "
                "drop_last=False; test evaluated when epoch % 10 == 0 and at each of the last 10 epochs, the maximum "
                "reported; no --amp), lib/utils.py build_optimizer (AdamW; 1-D tensors, *.bias and cls_token "
                "without decay), lib/datasets.py (Resize((224, 224)) bicubic, ImageNet mean/std without "
                "--inception), reset_classifier (trunc-normal 0.02, zero bias); seed 0, one run.",
    }
    recipe_differences = {
        "vtab": "The official script evaluates the test set after epochs 0, 10, ..., 80 and each of epochs 90..99 "
                "(19 evaluations); petlbench's eval_every 10 evaluates after epochs 10, ..., 100 (10), so "
                "--protocol paper-best-test takes the best of fewer evaluations; fp32 officially (petlbench's "
                "precision setting here); the budget (param_req) is the hyperparameter preset.",
        "fgvc": "no recipe: the SPT repository has VTAB-1k scripts only.",
    }

    # ------------------------------------------------------------------ structure
    #: The official sweep's steps: ``for param_num in range(1, 80): param_num * 0.02`` (M entries).
    SWEEP_STEPS = 79
    #: What every official sweep total adds for the class token: 768 (ViT-B's), whatever the backbone.
    CLS_COUNT = 768

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        units = _units(backbone)
        petl["plan"] = Plan(units)
        petl["linear"], petl["seq"], petl["norms"] = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        if backbone.cls_token is not None:
            petl["cls"] = ClsDelta(backbone.cls_token.shape[-1])
            # At the token site's input: before a pre-norm (CLIP's norm_pre), where a delta on the
            # class token is the same as a delta on ``cls_token`` itself (what the official code
            # tunes) and merges into it exactly.
            backbone.transform_input(backbone.token_site, petl["cls"])

    def _cost(self, unit: _Unit) -> int:
        """Structured module size as the official ``get_structured_param_num`` counts it, which is
        also what trains: LoRA in->r->out without biases; the adapter out->r->out with biases (it
        sits on the layer's output, or in parallel with proj, whose input width equals its output's)."""
        out_dim, in_dim, r = unit.stop - unit.start, unit.layer.weight.shape[1], self.hp.rank
        if self.structured_type == "lora":
            return in_dim * r + r * out_dim
        return out_dim * r + r * out_dim + r + out_dim

    def _build(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Create the modules the plan asks for and hook them (after calibrate or restore)."""
        units = _units(backbone)
        plan: Plan = petl["plan"]
        whole = plan.whole.tolist()
        by_layer: dict[str, list[tuple[_Unit, bool, torch.Tensor]]] = {}
        for u, w in zip(units, whole, strict=True):
            by_layer.setdefault(u.layer_name, []).append((u, w, getattr(plan.sparse, u.name)))
        deltas, seq, norms = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for name, entries in by_layer.items():
            layer = entries[0][0].layer
            if isinstance(layer, nn.Linear):
                is_proj = name.endswith("_proj")  # the official code feeds proj's branch without dropout
                # SPT-Adapter (official --block BlockSPTSeq): sequential on q/k/v/fc1/fc2 outputs, parallel on proj
                sequential = self.structured_type == "adapter" and not is_proj
                w_idx, b_idx, structured, outputs = [], [], [], []
                for u, w, idx in entries:
                    rows = u.stop - u.start
                    if u.matrix and w and sequential:
                        outputs.append((u.start, Structured(rows, rows, self.hp.rank, self.structured_type)))
                    elif u.matrix and w:
                        structured.append((u.start, Structured(layer.in_features, rows, self.hp.rank,
                                                               self.structured_type)))
                    elif u.matrix:
                        w_idx.append(idx.to(layer.weight.device) + u.start * layer.in_features)
                    elif w:
                        b_idx.append(torch.arange(u.start, u.stop, device=layer.weight.device))
                    else:
                        b_idx.append(idx.to(layer.weight.device) + u.start)
                w_index = torch.cat(w_idx) if w_idx else torch.zeros(0, dtype=torch.long)
                b_index = torch.cat(b_idx) if b_idx else torch.zeros(0, dtype=torch.long)
                if len(w_index) or len(b_index) or structured:
                    module = LinearDelta(layer.out_features, layer.in_features, w_index, b_index, structured,
                                         0.0 if is_proj else self.hp.dropout, self.hp.drop_path)
                    deltas[name] = module
                    backbone.add_parallel(layer, module)
                if outputs:  # hooked after the parallel delta: the adapters see the layer's whole output
                    seq[name] = OutputAdapters(layer.out_features, outputs, self.hp.dropout, self.hp.drop_path)
                    backbone.transform_output(layer, seq[name])
            else:  # a LayerNorm: only vectors tuned whole train (sparse norm entries are dropped, see docstring)
                gamma = any(w for u, w, _ in entries if u.tensor == "weight")
                beta = any(w for u, w, _ in entries if u.tensor == "bias")
                if gamma or beta:
                    norms[name] = NormDelta(layer.normalized_shape[0], layer.eps, gamma, beta)
                    backbone.add_parallel(layer, norms[name])
        petl["linear"] = deltas
        petl["seq"] = seq
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
        model, was_training = backbone.model, backbone.model.training
        model.train()  # official get_sensitivity: model.train(), so the run's drop path (and dropout) act
        try:
            for x, y in _rebatch(loader, self.hp.calib_batch):
                loss = F.cross_entropy(model(x).float(), y)
                for t, g in zip(tensors, torch.autograd.grad(loss, tensors), strict=True):
                    grad_sq[id(t)] += g.float() ** 2
                seen += int(y.shape[0])
                if seen >= self.hp.calib_images:
                    break
        finally:
            model.train(was_training)
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
        """The official budget sweep (ziplab/SPT ``engine.get_sensitivity``).

        Step k = 1..79 marks the top ``tau = ceil(k * sweep_step * 1e6)`` entries sensitive (ties:
        earlier entries first). A unit with >= cost/alpha (matrix) or >= size/beta (vector)
        sensitive entries is structured / tuned whole and counts its size; any other unit counts its
        sensitive entries -- LayerNorm entries too, although they never train -- and every total adds
        768 for the class token. The step whose total, in millions and in float32 (the official
        counts are float32 tensors), is closest to ``budget`` wins; ties go to the later step, and a
        step must beat the official starting point ``|0 - budget|``. A step beyond the number of
        ranked entries ends the sweep (the official ``topk`` would fail there).
        """
        dev = scores.device
        sizes = torch.tensor([u.size for u in units], device=dev)
        ends = torch.cumsum(sizes, 0)
        order = torch.argsort(scores, descending=True, stable=True)
        costs = torch.tensor([self._cost(u) if u.matrix else u.size for u in units], device=dev, dtype=torch.float64)
        is_matrix = torch.tensor([u.matrix for u in units], device=dev)
        thresholds = torch.where(is_matrix, costs / self.hp.alpha, sizes.double() / self.hp.beta)
        target = torch.tensor(self.hp.budget, dtype=torch.float32)
        best_distance, best = target.abs(), None  # the official starts from a total of 0
        for k in range(1, self.SWEEP_STEPS + 1):
            tau = math.ceil(k * self.hp.sweep_step * 1e6)  # the official float arithmetic, step by step
            if tau > len(scores):
                break
            owner = torch.searchsorted(ends, order[:tau], right=True)  # the unit of each sensitive entry
            counts = torch.bincount(owner, minlength=len(units)).double()
            whole = counts >= thresholds
            total = float(torch.where(whole, costs, counts).sum()) + self.CLS_COUNT
            distance = (torch.tensor(total, dtype=torch.float32) / 1e6 - target).abs()
            if distance <= best_distance:
                best_distance, best = distance, (tau, whole)
        if best is None:
            raise PetlbenchError(
                f"method {self.name!r}: no step of the sensitivity sweep (steps of {self.hp.sweep_step:g} M entries, "
                f"{self.SWEEP_STEPS} of them, at most {len(scores)} entries) gives a count within twice the budget "
                f"{self.hp.budget:g} M. Fix: --set sweep_step=<a smaller step, e.g. budget/40>."
            )
        tau, whole = best
        chosen = torch.zeros(len(scores), dtype=torch.bool, device=dev)
        chosen[order[:tau]] = True
        offsets = ends - sizes
        sparse = []
        for i, u in enumerate(units):
            if whole[i] or not u.linear:
                sparse.append(torch.zeros(0, dtype=torch.long))
            else:
                piece = chosen[int(offsets[i]):int(offsets[i]) + u.size]
                sparse.append(torch.nonzero(piece).reshape(-1).cpu())
        return whole.tolist(), sparse

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
