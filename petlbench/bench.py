"""Speed and cost of methods, measured side by side in one process on synthetic inputs of the
real shapes.

Every contender (each method's training model, each deployed model, the plain backbone) is
timed **interleaved**: one repetition of each in turn, repeated, so machine drift hits all of
them alike; medians and spreads are reported. CUDA timings use CUDA events after warm-up.

Targets (each printed as a ratio with a verdict):
- deployed (merged) latency / plain backbone latency <= 1.01 for every mergeable method;
- petlbench LoRA train step / peft LoRA train step <= 1.0 on the same weights (peft optional);
- PETL train step >= 50% of the GPU's bf16 peak by model FLOPs (GPU only);
- PETL peak training memory <= 0.6x full fine-tuning at the same batch: on GPU the caching
  allocator's peak; on CPU (which keeps no such counter) the peak of live tensor bytes counted
  at the dispatcher (petlbench/memory.py), the same figure without the allocator's overheads.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (FLOP/s), vendors' data sheets; used only for the utilisation ratio.
BF16_PEAK = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}
# VTAB-1k: 100 epochs over 1000 training images, then one pass over the 19 test sets.
VTAB_TRAIN_IMAGES = 100 * 1000
VTAB_TEST_IMAGES = 10000 + 6084 + 1880 + 6149 + 3669 + 26032 + 21750 + 32768 + 5400 + 6300 + 42670 + 15000 \
    + 15000 + 22735 + 711 + 73728 + 73728 + 12150 + 12150
TARGETS = {"latency_ratio": 1.01, "peft_ratio": 1.0, "mfu": 0.5, "memory_ratio": 0.6}


@dataclass
class BenchConfig:
    methods: Sequence[str]
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "fp32"
    num_classes: int = 100
    warmup: int = 3
    iters: int = 10
    compile: bool = False
    peft: bool = True
    timing: bool = True  # False: counts, FLOPs and memory only (a big model on CPU)


def device_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        n = torch.get_num_threads()
        return f"cpu: {platform.processor() or platform.machine()} ({n} thread{'' if n == 1 else 's'})", None
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK.items():
        if all(part in name for part in key.split()):
            return name, value
    return name, None


def _autocast(device: torch.device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current for CUDA calls that default to the current device (events, streams,
    empty_cache): on ``cuda:1`` they would otherwise time device 0 and create a context there."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            with on_device(device):
                stream = torch.cuda.current_stream(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                fn()
                end.record(stream)
                end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, iters: int,
                min_sample_s: float = 0.02) -> dict[str, dict]:
    """Median/min/max seconds per call of every fn, timed in rounds (each fn once per round, in a
    new seeded order every round).

    Each sample repeats a call enough times to last ``min_sample_s``, so sub-millisecond calls
    are not drowned in timer noise.
    """
    timer = _timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    reps = {k: max(1, math.ceil(min_sample_s / max(timer(fn), 1e-6))) for k, fn in fns.items()}

    def repeated(fn: Callable[[], Any], n: int) -> Callable[[], None]:
        def call() -> None:
            for _ in range(n):
                fn()
        return call

    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys, order = list(fns), random.Random(0)
    for _ in range(iters):
        # A fresh order every round: whoever runs right after a large step (full fine-tuning) pays
        # for its cache and page-fault aftermath, so no contender may always follow the same one.
        order.shuffle(keys)
        for key in keys:
            samples[key].append(timer(repeated(fns[key], reps[key])) / reps[key])
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "spread": (max(v) - min(v)) / statistics.median(v)} for k, v in samples.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _train_step(model: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], x, y, device, dtype
                ) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """The engine's own step (same order, same autocast), so the benchmark measures what training runs."""
    from petlbench.engine import train_step

    opt = torch.optim.AdamW(params, lr=1e-4)
    precision = "bf16" if dtype == "bf16" else "fp32"
    return (lambda: train_step(model, opt, params, x, y, device, precision)), opt


def _forward(model: nn.Module, x, device, dtype) -> Callable[[], None]:
    @torch.no_grad()
    def fwd() -> None:
        with _autocast(device, dtype):
            model(x)
    return fwd


def _maybe_compile(model: nn.Module, enabled: bool, wrappers: dict[str, Any], name: str
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's compile-with-fallback, so the benchmark measures what training would run."""
    from petlbench.engine import MaybeCompiled

    if not enabled:
        return model
    wrappers[name] = MaybeCompiled(model, True)
    return wrappers[name]


def _measure_step(model: nn.Module, step: Callable[[], None], opt: torch.optim.Optimizer,
                  eager_step: Callable[[], None], eager_opt: torch.optim.Optimizer, inputs: Sequence[torch.Tensor],
                  device: torch.device) -> tuple[int, dict[str, int]]:
    """FLOPs and peak memory of one training step in its steady state (optimiser state exists).

    Memory ``tensors``: peak live tensor bytes counted at the dispatcher (any device, eager step);
    on CUDA also the caching allocator's ``allocated`` and ``reserved`` peaks of the step as
    trained (compiled when asked).
    """
    from petlbench.memory import TensorMemory, storage_bytes, training_state

    eager_step()  # AdamW creates its state on the first step
    with FlopCounterMode(display=False) as flops, TensorMemory(training_state(model, eager_opt, *inputs)) as mem:
        eager_step()
    memory = {"tensors": mem.peak}
    if device.type == "cuda":
        step()
        _sync(device)
        torch.cuda.empty_cache()
        # Other contenders' models stay allocated beside this one: their bytes are not this method's.
        others = torch.cuda.memory_allocated(device) - storage_bytes(training_state(model, opt, *inputs))
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        memory.update(allocated=torch.cuda.max_memory_allocated(device) - others,
                      reserved=torch.cuda.max_memory_reserved(device) - others)
    return int(flops.get_total_flops()), memory


def _peft_lora(cfg: BenchConfig, device: torch.device, rank: int) -> nn.Module | None:
    try:
        import peft
    except ImportError:
        return None
    import timm

    base = timm.create_model(cfg.backbone, num_classes=cfg.num_classes, **cfg.backbone_kwargs)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=r".*\.attn\.qkv", lora_dropout=0.0,
                             modules_to_save=None)
    model = peft.get_peft_model(base, config)
    for p in base.get_classifier().parameters():
        p.requires_grad_(True)
    return model.to(device)


def check_outputs(out: str | os.PathLike) -> tuple[Path, Path]:
    """The ``<out>.json`` and ``<out>.md`` that ``bench --out`` writes, checked writable (their
    folder created) before the benchmark runs: an output below a file or in a read-only folder is
    one line up front, not a traceback that loses an hour of timing."""
    from petlbench.safeio import check_output_file

    target = Path(out)
    return (check_output_file(target.with_suffix(".json"), "--out"),
            check_output_file(target.with_suffix(".md"), "--out"))


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure every method of ``cfg``; returns a JSON-serialisable summary. ``log`` hears what is
    being measured (a ViT-B at batch 64 on a CPU takes minutes per method)."""
    import petlbench

    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise petlbench.PetlbenchError("--device cuda asked for, but no CUDA device is visible. Fix: --device cpu.")
    with on_device(device):  # every CUDA call of the benchmark on its device
        return _run_bench(cfg, device, log)


def _run_bench(cfg: BenchConfig, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    import timm

    import petlbench

    name, peak = device_peak(device)
    notes: list[str] = []
    compiled: dict[str, Any] = {}
    torch.manual_seed(0)
    petlbench.model.resolve_arch(cfg.backbone)  # an unknown name is one clear line, not timm's traceback
    plain = timm.create_model(cfg.backbone, num_classes=cfg.num_classes, **cfg.backbone_kwargs).to(device).eval()
    size = plain.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if not cfg.backbone_kwargs.get("img_size") \
        else cfg.backbone_kwargs["img_size"]
    xb = torch.randn(cfg.batch_size, 3, size, size, device=device)
    x1 = xb[:1].clone()
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)

    methods = list(dict.fromkeys([*cfg.methods, "full"]))  # full fine-tuning is the memory reference
    train_fns: dict[str, Callable] = {}
    lat_fns: dict[str, Callable] = {"plain": _forward(_maybe_compile(plain, cfg.compile, compiled, "plain"), x1,
                                                      device, cfg.dtype)}
    thr_fns: dict[str, Callable] = {"plain": _forward(plain, xb, device, cfg.dtype)}
    rows: dict[str, dict[str, Any]] = {}
    plain_flops = count_flops(_forward(plain, x1, device, cfg.dtype))
    plain_params = sum(p.numel() for p in plain.parameters())
    for method in methods:
        log(f"bench: {method}: parameters, FLOPs and peak memory")
        torch.manual_seed(0)
        model = petlbench.create_model(cfg.backbone, method, cfg.num_classes,
                                       backbone_kwargs=cfg.backbone_kwargs).to(device)
        if model.method.needs_calibration:  # what trains comes from gradients: calibrate on the benchmark batch
            petlbench.calibrate(model, [(xb, y)], device)
        with torch.no_grad():  # non-zero adapters, so merged and unmerged compute the real thing
            for p in model.petl.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        params = [p for p in model.parameters() if p.requires_grad]
        trained = _maybe_compile(model.train(), cfg.compile, compiled, method)
        step, opt = _train_step(trained, params, xb, y, device, cfg.dtype)
        eager_step, eager_opt = (step, opt) if trained is model else _train_step(model, params, xb, y, device,
                                                                                 cfg.dtype)
        step_flops, peak_memory = _measure_step(model, step, opt, eager_step, eager_opt, (xb, y), device)
        counts = petlbench.count_params(model)
        if model.method.mergeable:
            deployed, kind = petlbench.merge(model.eval()).to(device).eval(), "merged"
            # A merge that leaves modules or parameters behind is not zero-overhead, whatever the timing says.
            # (A merge into a bias-less layer adds a bias: compare with the timm model built that way.)
            extra = petlbench.model.merged_backbone_kwargs(deployed)
            reference = timm.create_model(cfg.backbone, num_classes=cfg.num_classes,
                                          **{**cfg.backbone_kwargs, **extra}) if extra else plain
            same = [type(m) for m in deployed.modules()] == [type(m) for m in reference.modules()] \
                and sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in reference.parameters())
        else:
            deployed, kind, same = model.eval(), "unmerged", None
        row = {
            "method": method, "deployed": kind, "same_structure_as_plain": same, "trainable": counts.trainable,
            "trainable_without_head": counts.trainable_without_head, "extra_after_merge": counts.extra_after_merge,
            "trainable_state_bytes": counts.trainable_bytes, "train_step_flops": step_flops,
            "flops_unmerged": count_flops(_forward(model.eval(), x1, device, cfg.dtype)),
            "flops_deployed": count_flops(_forward(deployed, x1, device, cfg.dtype)),
            "peak_memory": peak_memory,
        }
        model.train()
        rows[method] = row
        if not cfg.timing:  # nothing to time: let this method's models and optimiser state go
            continue
        train_fns[method] = step
        if method in cfg.methods:
            lat_fns[method] = _forward(_maybe_compile(deployed, cfg.compile, compiled, f"{method} deployed"), x1,
                                       device, cfg.dtype)
            thr_fns[method] = _forward(deployed, xb, device, cfg.dtype)
    peft_model = None
    if cfg.peft and cfg.timing and "lora" in cfg.methods:
        peft_model = _peft_lora(cfg, device, petlbench.get_method("lora").hparams["rank"].default)
        if peft_model is None:
            notes.append("peft is not installed: petlbench-vs-peft LoRA ratio not measured (pip install peft)")
        else:
            torch.manual_seed(0)
            ours = petlbench.create_model(cfg.backbone, "lora", cfg.num_classes, backbone_kwargs=cfg.backbone_kwargs,
                                          targets="qkv").to(device).train()
            train_fns["lora[qkv]"] = _train_step(ours, [p for p in ours.parameters() if p.requires_grad], xb, y,
                                                 device, cfg.dtype)[0]
            train_fns["peft lora[qkv]"] = _train_step(peft_model.train(),
                                                      [p for p in peft_model.parameters() if p.requires_grad],
                                                      xb, y, device, cfg.dtype)[0]
    empty: dict[str, dict] = {}
    if cfg.timing:
        log(f"bench: timing {len(train_fns)} train steps, {len(lat_fns)} deployed models, interleaved")
    train_t = interleaved(train_fns, device, cfg.warmup, cfg.iters) if cfg.timing else empty
    # Batch-1 forwards are cheap and their noise is what the 1% latency target must resolve:
    # three times the rounds, each sample at least 0.1 s.
    lat_t = interleaved(lat_fns, device, cfg.warmup, 3 * cfg.iters, min_sample_s=0.1) if cfg.timing else empty
    thr_t = interleaved(thr_fns, device, cfg.warmup, max(2, cfg.iters // 2)) if cfg.timing else empty
    if not cfg.timing:
        notes.append("--no-timing: counts, FLOPs and memory only")

    notes += [f"torch.compile failed for {k} ({w.error}); measured eagerly" for k, w in compiled.items()
              if w.compiled is False]
    memory_source = "allocated" if device.type == "cuda" else "tensors"
    full_step = train_t.get("full", {}).get("median_s")
    full_mem = rows["full"]["peak_memory"][memory_source]
    for method in cfg.methods:
        row = rows[method]
        row.update(flops_ratio_deployed=row["flops_deployed"] / plain_flops,
                   memory_vs_full=row["peak_memory"][memory_source] / full_mem)
        if not cfg.timing:
            row.update(train_step_s=None, train_images_per_s=None, train_step_vs_full=None, latency_b1=None,
                       latency_ratio=None, latency_ratio_spread=None, mfu_spread=None, throughput=None, throughput_ratio=None, mfu=None, vtab_sweep_minutes=None)
            continue
        t = train_t[method]["median_s"]
        row.update(
            train_step_s=train_t[method], train_images_per_s=cfg.batch_size / t,
            train_step_vs_full=(t / full_step) if full_step else None,
            latency_b1=lat_t[method], latency_ratio=lat_t[method]["median_s"] / lat_t["plain"]["median_s"],
            latency_ratio_spread=ratio_spread(lat_t[method], lat_t["plain"]),
            mfu_spread=train_t[method]["spread"] / 2,
            throughput=cfg.batch_size / thr_t[method]["median_s"],
            throughput_ratio=thr_t["plain"]["median_s"] / thr_t[method]["median_s"],
            mfu=(row["train_step_flops"] / t / peak) if peak else None,
            vtab_sweep_minutes=(19 * VTAB_TRAIN_IMAGES * t / cfg.batch_size
                                + VTAB_TEST_IMAGES * thr_t[method]["median_s"] / cfg.batch_size) / 60,
        )
    peft_ratio = peft_spread = None
    if "peft lora[qkv]" in train_t:
        peft_ratio = train_t["lora[qkv]"]["median_s"] / train_t["peft lora[qkv]"]["median_s"]
        peft_spread = ratio_spread(train_t["lora[qkv]"], train_t["peft lora[qkv]"])
    plain_row: dict[str, Any] = {"flops": plain_flops, "params": plain_params}
    if cfg.timing:
        plain_row.update(latency_b1=lat_t["plain"], throughput=cfg.batch_size / thr_t["plain"]["median_s"])
    return {
        "device": name, "torch": torch.__version__, "timm": timm.__version__, "petlbench": petlbench.__version__,
        "date": time.strftime("%Y-%m-%d"), "backbone": cfg.backbone, "backbone_kwargs": cfg.backbone_kwargs,
        "image_size": size, "batch_size": cfg.batch_size, "dtype": cfg.dtype, "compile": cfg.compile,
        "iters": cfg.iters if cfg.timing else 0, "memory_source": memory_source, "plain": plain_row,
        "full_peak_memory": rows["full"]["peak_memory"],
        "methods": [rows[m] for m in cfg.methods], "peft_ratio": peft_ratio,
        "peft_train_step_s": train_t.get("peft lora[qkv]"), "peft_ratio_spread": peft_spread, "notes": notes,
        "verdicts": verdicts([rows[m] for m in cfg.methods], peft_ratio, peak is not None, cfg.timing,
                             memory_source, peft_spread=peft_spread),
    }


def deployed_latency(model, device: torch.device, size: int, dtype: str = "fp32", iters: int = 11) -> dict[str, Any]:
    """Batch-1 latency of ``model`` as deployed (merged when it merges) against the same backbone
    without the method, timed interleaved; cheap enough to record with every run."""
    import copy

    from petlbench.backbone import remove_petl_hooks
    from petlbench.model import merge, merged_backbone_kwargs

    was_training = model.training
    model.eval()
    plain = copy.deepcopy(model.net)
    remove_petl_hooks(plain)
    deployed = merge(model) if model.method.mergeable else model
    with on_device(device):
        x = torch.randn(1, 3, size, size, device=device)
        t = interleaved({"plain": _forward(plain, x, device, dtype), "deployed": _forward(deployed, x, device, dtype)},
                        device, warmup=2, iters=iters, min_sample_s=0.02)
    model.train(was_training)
    return {"deployed": "merged" if model.method.mergeable else "unmerged",
            # timm arguments the merged model needs beyond the run's backbone arguments ({"qkv_bias": True}
            # when a shift went into a qkv built without a bias), so the deployed architecture is on record
            "merged_backbone_kwargs": merged_backbone_kwargs(deployed),
            "latency_b1_s": t["deployed"]["median_s"], "plain_latency_b1_s": t["plain"]["median_s"],
            "latency_ratio": t["deployed"]["median_s"] / t["plain"]["median_s"],
            "latency_ratio_spread": ratio_spread(t["deployed"], t["plain"])}


def ratio_spread(a: dict[str, float], b: dict[str, float]) -> float:
    """Relative half-spread of median(a) / median(b): the half-ranges of the two timings add up."""
    return (a["spread"] + b["spread"]) / 2


def judge(value: float, spread: float | None, target: float, at_most: bool = True) -> str:
    """``pass``/``fail`` when the whole interval value x (1 ± spread) is on one side of ``target``,
    else ``inconclusive``: a ratio whose spread exceeds its margin to the target proves nothing."""
    lo, hi = (value * (1 - spread), value * (1 + spread)) if spread else (value, value)
    if at_most:
        return "pass" if hi <= target else ("fail" if lo > target else "inconclusive")
    return "pass" if lo >= target else ("fail" if hi < target else "inconclusive")


def _timed(target: str, value: float, spread: float | None, limit: float, at_most: bool = True,
           **extra: Any) -> dict[str, Any]:
    status = judge(value, spread, limit, at_most)
    return {"target": target, "value": value, "spread": spread, "status": status,
            "ok": None if status == "inconclusive" else status == "pass", **extra}


def verdicts(rows: list[dict[str, Any]], peft_ratio: float | None, has_peak: bool, timing: bool,
             memory_source: str, peft_spread: float | None = None) -> list[dict]:
    """One line per target: the measured ratio (± its spread), the target and pass, fail or
    inconclusive (the spread straddles the target), or why not measured.

    For a merged method the primary verdict is structural: a merged model with exactly the plain
    backbone's modules and parameter count runs the plain backbone's code, so its latency ratio is
    only a check of the timer and is marked secondary.
    """
    out = []
    mem = "live tensors" if memory_source == "tensors" else "CUDA allocated"
    for r in rows:
        if r["method"] == "full":
            continue
        same = r["deployed"] == "merged" and r["same_structure_as_plain"] is True
        if r["deployed"] == "merged":
            ok = r["same_structure_as_plain"]
            out.append({"target": f"{r['method']}: merged model is structurally the plain backbone (same modules and "
                                  "parameter count): zero inference overhead by construction",
                        "value": None, "ok": ok, "status": "pass" if ok else "fail", "primary": True})
        if r["deployed"] == "merged" and r["latency_ratio"] is not None:
            note = " (secondary: timer check, the merged model IS the plain backbone)" if same else ""
            out.append(_timed(f"{r['method']}: deployed latency / plain <= {TARGETS['latency_ratio']}{note}",
                              r["latency_ratio"], r.get("latency_ratio_spread"), TARGETS["latency_ratio"],
                              primary=not same))
        if r["mfu"] is not None:
            out.append(_timed(f"{r['method']}: train step >= 50% of bf16 peak", r["mfu"], r.get("mfu_spread"),
                              TARGETS["mfu"], at_most=False))
        out.append({"target": f"{r['method']}: peak train memory ({mem}) / full FT <= {TARGETS['memory_ratio']}",
                    "value": r["memory_vs_full"], "ok": r["memory_vs_full"] <= TARGETS["memory_ratio"],
                    "status": "pass" if r["memory_vs_full"] <= TARGETS["memory_ratio"] else "fail"})
    if peft_ratio is not None:
        out.append(_timed("LoRA train step / peft LoRA (same qkv weights, same rank) <= 1.0", peft_ratio, peft_spread,
                          TARGETS["peft_ratio"]))
    missing = []
    if not timing:
        missing.append("latency, throughput, MFU and LoRA vs peft (--no-timing)")
    else:
        if not has_peak:
            missing.append("MFU >= 50% of bf16 peak (needs a GPU with a known peak)")
        if peft_ratio is None:
            missing.append("LoRA vs peft (needs `pip install peft` and lora among the methods)")
    if memory_source == "tensors":
        missing.append("CUDA allocator peaks (allocated, reserved; needs a GPU): memory is live tensor bytes here")
    for m in missing:
        out.append({"target": m, "value": None, "ok": None, "status": "not measured"})
    return out


def _ms(t: dict[str, float] | None) -> str:
    return "–" if t is None else f"{1e3 * t['median_s']:.2f} ms (±{100 * t['spread'] / 2:.0f}%)"


def to_markdown(result: dict[str, Any]) -> str:
    """A summary table (and verdicts) for the terminal and benchmarks/results/*.md."""
    timing = (f"{result['iters']} interleaved rounds ({3 * result['iters']} for batch-1 latency), median ± half "
              "spread" if result["iters"] else "no timing")
    mem = "live tensor bytes" if result["memory_source"] == "tensors" else "CUDA max allocated"
    head = (f"**{result['backbone']}** {result['image_size']}px, batch {result['batch_size']}, {result['dtype']}"
            f"{', torch.compile' if result['compile'] else ''} on **{result['device']}** (torch {result['torch']}, "
            f"timm {result['timm']}, {result['date']}, {timing}; peak memory: {mem}, full fine-tuning "
            f"{result['full_peak_memory'][result['memory_source']] / 2**20:,.0f} MiB)")
    lines = [head, "",
             "| method | deployed | trainable w/o head | extra after merge | state KiB | train step | img/s | "
             "vs full FT | latency b1 | latency / plain | throughput / plain | FLOPs deployed / plain | "
             "peak mem MiB | peak mem / full | MFU | VTAB-1k images x step/img (naive) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v: float | None, fmt: str = "{:.3f}") -> str:
        return "–" if v is None else fmt.format(v)

    for r in result["methods"]:
        lines.append(
            f"| {r['method']} | {r['deployed']} | {r['trainable_without_head']:,} | {r['extra_after_merge']:,} | "
            f"{r['trainable_state_bytes'] / 1024:.1f} | {_ms(r['train_step_s'])} | "
            f"{f(r['train_images_per_s'], '{:.1f}')} | {f(r['train_step_vs_full'], '{:.2f}x')} | "
            f"{_ms(r['latency_b1'])} | {f(r['latency_ratio'])} | {f(r['throughput_ratio'])} | "
            f"{r['flops_ratio_deployed']:.3f} | {r['peak_memory'][result['memory_source']] / 2**20:,.0f} | "
            f"{r['memory_vs_full']:.2f} | {f(r['mfu'], '{:.0%}')} | {f(r['vtab_sweep_minutes'], '{:.0f} min')} |")
    lines += ["", "Targets:"]
    for v in result["verdicts"]:
        status = v.get("status") or ("not measured" if v["ok"] is None else "pass" if v["ok"] else "fail")
        if status == "not measured":
            lines.append(f"- not measured here: {v['target']}")
            continue
        value = "" if v["value"] is None else f": {v['value']:.3f}"
        if v["value"] is not None and v.get("spread"):
            value += f" ± {v['value'] * v['spread']:.3f}"
        word = "INCONCLUSIVE (spread straddles the target)" if status == "inconclusive" else status.upper()
        lines.append(f"- {word} {v['target']}{value}")
    lines += [f"- note: {n}" for n in result["notes"]]
    lines.append("- note: the naive VTAB-1k column is images x per-image time at this batch size; "
                 "`petlbench bench --sweep-estimate` models the sweep with each method's own batch size, "
                 "eval and fixed costs")
    return "\n".join(lines)
