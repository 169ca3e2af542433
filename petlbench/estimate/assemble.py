"""The estimate put together: count on ``meta``, measure on this machine, model per GPU
(:func:`estimate`); or model a saved estimate again under today's model (:func:`remodel`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch

from petlbench.estimate.counting import OpCounts, _linear_weights, _step_fn, count
from petlbench.estimate.gpumodel import (
    ASSUMPTIONS,
    GPU_LATENCY_TIMING_S,
    H2D_BYTES_S,
    PACKS,
    _sweep,
    model_gpus,
)
from petlbench.estimate.measure import (
    _median_time,
    host_cost_per_op,
    measure_fixed,
    measure_per_run,
    packed_host_ratio,
)
from petlbench.estimate.workload import VTAB_NATIVE_SIZES, _setup, cache_bytes


def _count(method: str, backbone: str, setup: Mapping[str, Any]) -> tuple[dict[str, OpCounts], dict[str, Any], int]:
    """Counted train step and eval batch (merged when the method merges, as the engine evaluates)."""
    import petlbench
    from petlbench.model import merge

    with torch.device("meta"):
        meta_model = petlbench.create_model(backbone, method, setup["classes"], backbone_kwargs=setup["kwargs"])
    merged = merge(meta_model) if meta_model.method.mergeable else None
    counted = count(meta_model, setup["batch"], setup["eval_batch"], setup["classes"], setup["size"],
                    setup["grad_clip"], eval_model=merged)
    n_linear, linear_params = _linear_weights(meta_model)
    extra = {"autocast_casts": n_linear, "autocast_cast_bytes": linear_params * 6,  # read fp32, write bf16
             "eval_merged": merged is not None}
    return counted, extra, len(getattr(meta_model.net, "blocks", [])) or 12


def estimate(method: str, backbone: str = "vit_base_patch16_224", suite: str = "vtab",
             overrides: Mapping[str, Any] | None = None, backbone_kwargs: Mapping[str, Any] | None = None,
             timing: bool = True, warmup: int = 1, iters: int = 2,
             log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The sweep's modelled time per GPU and its breakdown, with every input labelled."""
    import petlbench
    from petlbench.bench import device_peak

    setup = _setup(method, backbone, suite, overrides, backbone_kwargs)
    loads, batch, eval_batch, classes, size, kwargs = (setup[k] for k in ("loads", "batch", "eval_batch", "classes",
                                                                          "size", "kwargs"))
    log(f"sweep-estimate: counting one {method} train step at batch {batch} and one eval batch of {eval_batch} (meta)")
    counted, extra, depth = _count(method, backbone, setup)
    log("sweep-estimate: measuring the host's cost per dispatched op, one run and packed")
    host = host_cost_per_op(backbone, kwargs, method, depth)
    packs = {r: packed_host_ratio(backbone, kwargs, method, depth, r) for r in PACKS}

    measured: dict[str, Any] = {"host": host, "packed_host": {str(r): v for r, v in packs.items()},
                                "device": device_peak(torch.device("cpu"))[0]}
    fixed: dict[str, float] = {}
    if timing:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = petlbench.create_model(backbone, method, classes, backbone_kwargs=kwargs)
        build_s = time.perf_counter() - t0
        log(f"sweep-estimate: timing the train step at batch {batch} on the CPU ({iters} samples)")
        step, _ = _step_fn(model, batch, classes, size, torch.device("cpu"), setup["grad_clip"])
        train_s = _median_time(step, warmup, iters)
        eval_at = min(eval_batch, batch)
        _, forward = _step_fn(model, eval_at, classes, size, torch.device("cpu"), setup["grad_clip"])
        log(f"sweep-estimate: timing an eval batch of {eval_at} on the CPU")
        eval_s = _median_time(forward, warmup, iters) * eval_batch / eval_at
        fixed = {**measure_fixed(model, size), "build_model_s": build_s,
                 **measure_per_run(backbone, kwargs, method, classes)}
        measured.update(train_step_s=train_s, eval_batch_s=eval_s, eval_measured_at_batch=eval_at, fixed=fixed)
        per_run_cpu = fixed["model_from_cache_s"] + fixed["deployed_latency_s"]
        measured["sweep_on_this_cpu"] = _sweep(loads, train_s, eval_s, build_s + fixed["hash_weights_s"], per_run_cpu)

    return {
        "method": method, "backbone": backbone, "backbone_kwargs": kwargs, "suite": suite, "image_size": size,
        "tasks": [asdict(t) | {"train_steps": t.train_steps, "eval_batches": t.eval_batches} for t in loads],
        "batch_size": batch, "eval_batch_size": eval_batch, "epochs": sorted({t.epochs for t in loads}),
        "train_steps": sum(t.train_steps for t in loads), "eval_batches": sum(t.eval_batches for t in loads),
        "test_images": sum(t.test_images for t in loads),
        "counted": {k: v.summary() for k, v in counted.items()} | extra,
        "measured": measured, "assumptions": dict(ASSUMPTIONS) | {"gpu_latency_timing_s": GPU_LATENCY_TIMING_S,
                                                                  "h2d_bytes_s": H2D_BYTES_S},
        "modelled": model_gpus(loads, counted, extra, host["per_op_s"],
                               {r: v["ratio"] for r, v in packs.items()}, fixed),
        "cache": cache_bytes(loads, size, VTAB_NATIVE_SIZES if suite == "vtab" else {}),
        "torch": torch.__version__, "petlbench": petlbench.__version__, "date": time.strftime("%Y-%m-%d"),
    }


def remodel(saved: Mapping[str, Any], log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The modelled table of a saved estimate (``--sweep-estimate --json``) under today's model,
    without timing ViT-B on the CPU again (it takes the better part of an hour on one thread).

    Kept from ``saved`` (measured then): the train step and eval batch on the CPU, the host cost per
    op, building and hashing the backbone. Counted again (seconds, ``meta``): the train step, whose
    counts must equal the saved ones, and the eval batch as the engine evaluates it (merged for
    mergeable methods). Measured now (seconds): the packed/single host ratio and the per-run model
    copy. The result says which is which under ``measured["remodelled"]``."""
    import copy

    import petlbench

    method, backbone, suite = saved["method"], saved["backbone"], saved["suite"]
    setup = _setup(method, backbone, suite, None, saved.get("backbone_kwargs"))
    loads = setup["loads"]
    if sum(t.train_steps for t in loads) != saved["train_steps"] or setup["batch"] != saved["batch_size"]:
        raise petlbench.PetlbenchError("the saved estimate was made with training overrides (batch size or epochs "
                                       "differ from the method's presets): run --sweep-estimate again instead.")
    log(f"remodel: counting one {method} train step at batch {setup['batch']} (meta)")
    counted, extra, depth = _count(method, backbone, setup)
    same = counted["train_step"].summary() == saved["counted"]["train_step"]
    if not same:
        raise petlbench.PetlbenchError("the saved estimate's train-step counts differ from today's code: "
                                       "run --sweep-estimate again instead of remodelling it.")
    m = copy.deepcopy(dict(saved["measured"]))
    log("remodel: measuring the packed/single host ratio and the per-run model copy")
    packs = {r: packed_host_ratio(backbone, setup["kwargs"], method, depth, r) for r in PACKS}
    m["packed_host"] = {str(r): v for r, v in packs.items()}
    fixed = dict(m.get("fixed") or {})
    fixed.update(measure_per_run(backbone, setup["kwargs"], method, setup["classes"]))
    if "weight_bytes" not in fixed:
        fixed["weight_bytes"] = saved["counted"].get("autocast_cast_bytes", 0) / 6 * 4
    m["fixed"] = fixed
    if "train_step_s" in m:
        per_run_cpu = fixed["model_from_cache_s"] + fixed.get("deployed_latency_s", 0.0)
        m["sweep_on_this_cpu"] = _sweep(loads, m["train_step_s"], m["eval_batch_s"],
                                        fixed.get("build_model_s", 0.0) + fixed.get("hash_weights_s", 0.0), per_run_cpu)
    m["remodelled"] = {
        "date": time.strftime("%Y-%m-%d"), "saved_date": saved.get("date"),
        "kept_from_saved": ["train_step_s", "eval_batch_s", "host.per_op_s", "fixed.build_model_s",
                            "fixed.hash_weights_s", "fixed.deployed_latency_s"],
        "counted_again": ["train_step (equal to the saved counts)", "eval_batch (as evaluated: "
                          + ("merged" if extra["eval_merged"] else "unmerged") + ")"],
        "measured_now": ["packed_host", "fixed.model_from_cache_s", "fixed.latency_copy_s"],
    }
    out = copy.deepcopy(dict(saved))
    out.update(
        measured=m, counted={k: v.summary() for k, v in counted.items()} | extra,
        assumptions=dict(ASSUMPTIONS) | {"gpu_latency_timing_s": GPU_LATENCY_TIMING_S, "h2d_bytes_s": H2D_BYTES_S},
        modelled=model_gpus(loads, counted, extra, m["host"]["per_op_s"], {r: v["ratio"] for r, v in packs.items()},
                            fixed),
        petlbench=petlbench.__version__, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
    )
    return out
