"""Measured on this machine: the host's cost per dispatched op, the host cost of a packed step
relative to one run's (what ``--pack R`` saves), and the fixed costs outside training and
evaluation (model from the backbone cache, hashing weights, deployed-latency timing).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from petlbench.estimate.counting import OpCounts, _Recorder, _step_fn


def _median_time(fn: Callable[[], Any], warmup: int, iters: int, best: bool = False) -> float:
    """Median (or, ``best``, the minimum: the intrinsic cost on a shared machine) seconds per call on
    the CPU, timed by :func:`petlbench.bench.interleaved` (sub-millisecond calls repeated per sample)."""
    from petlbench.bench import interleaved

    t = interleaved({"fn": fn}, torch.device("cpu"), warmup, iters)["fn"]
    return t["min_s"] if best else t["median_s"]


def host_cost_per_op(backbone: str, backbone_kwargs: Mapping[str, Any], method: str, depth: int, iters: int = 15
                     ) -> dict[str, float]:
    """Seconds of host work per dispatched op: the method's train step on a ViT of the same depth
    with tiny tensors (dim 16, 4 tokens, batch 2), whose compute is negligible, divided by its ops."""
    import petlbench

    kwargs = {**backbone_kwargs, "img_size": 32, "patch_size": 16, "embed_dim": 16, "num_heads": 1, "depth": depth}
    torch.manual_seed(0)
    tiny = petlbench.create_model(backbone, method, 10, backbone_kwargs=kwargs)
    step, _ = _step_fn(tiny, 2, 10, 32, torch.device("cpu"), 1.0)
    step()
    counts = OpCounts()
    with _Recorder(counts):
        step()
    t = _median_time(step, 3, iters, best=True)
    return {"per_op_s": t / counts.n_ops, "tiny_step_s": t, "tiny_step_ops": counts.n_ops}


def packed_host_ratio(backbone: str, backbone_kwargs: Mapping[str, Any], method: str, depth: int, pack: int,
                      iters: int = 15) -> dict[str, Any]:
    """Host seconds of one packed step of ``pack`` runs over one run's step, measured with the same
    tiny-tensor ViT as :func:`host_cost_per_op` (compute negligible: what is left is host work)
    through the packed engine's own step (:func:`petlbench.packing.packed_step`)."""
    import petlbench
    from petlbench.packing import PackedForward, pack_problem, packed_step, share_frozen
    from petlbench.precision import resolve_precision

    kwargs = {**backbone_kwargs, "img_size": 32, "patch_size": 16, "embed_dim": 16, "num_heads": 1, "depth": depth}
    cpu = torch.device("cpu")
    models = []
    for seed in range(pack):
        torch.manual_seed(seed)
        models.append(petlbench.create_model(backbone, method, 10, backbone_kwargs=kwargs, reuse_backbone=True))
    cfgs = [{"label_smoothing": 0.0, "grad_clip": 1.0, "compile": False, "precision": "fp32", "epochs": 1,
             "batch_size": 2}] * pack
    problem = pack_problem(models, cfgs, [range(1)] * pack, cpu)  # equal-size stand-ins for loaders
    if problem:
        return {"pack": pack, "ratio": None, "cannot_pack": problem}
    share_frozen(models)
    params = [[q for q in m.parameters() if q.requires_grad] for m in models]
    opts = [torch.optim.AdamW(ps, lr=1e-3) for ps in params]
    forward = PackedForward(models)
    xs, ys = torch.randn(pack, 2, 3, 32, 32), torch.randint(0, 10, (pack, 2))
    plan = resolve_precision("fp32", cpu)
    for m in models:
        m.train()
    packed_s = _median_time(lambda: packed_step(forward, params, opts, xs, ys, cfgs, plan, cpu), 3, iters, best=True)
    single = host_cost_per_op(backbone, backbone_kwargs, method, depth, iters)
    return {"pack": pack, "ratio": packed_s / single["tiny_step_s"], "tiny_packed_step_s": packed_s,
            "tiny_step_s": single["tiny_step_s"]}


def measure_per_run(backbone: str, backbone_kwargs: Mapping[str, Any], method: str, classes: int) -> dict[str, float]:
    """Per-run host costs left once the backbone is cached, measured: a model from the cache (a deep
    copy with a new head, the method applied) and the copy of the backbone the latency timing makes."""
    import copy

    import petlbench

    petlbench.create_model(backbone, method, classes, backbone_kwargs=backbone_kwargs, reuse_backbone=True)  # warm
    t0 = time.perf_counter()
    model = petlbench.create_model(backbone, method, classes, backbone_kwargs=backbone_kwargs, reuse_backbone=True)
    reset_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    copy.deepcopy(model.net)
    return {"model_from_cache_s": reset_s, "latency_copy_s": time.perf_counter() - t0}


def measure_fixed(model: nn.Module, size: int) -> dict[str, float]:
    """Costs outside training and evaluation, measured: hashing the backbone's weight file (SHA-256
    at this machine's speed over the fp32 parameter bytes; once per process) and the deployed-latency
    timing each record carries (per run)."""
    from petlbench.bench import deployed_latency

    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buf = bytes(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(buf).digest()
    hash_s = (time.perf_counter() - t0) * nbytes / len(buf)
    t0 = time.perf_counter()
    deployed_latency(model, torch.device("cpu"), size, "fp32", iters=11)
    return {"hash_weights_s": hash_s, "deployed_latency_s": time.perf_counter() - t0, "weight_bytes": nbytes}
