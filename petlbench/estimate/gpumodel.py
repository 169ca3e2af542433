"""Modelled per GPU (from vendor data sheets and stated efficiencies): each counted op's time as
a roofline with a per-kernel floor in eager mode, the host dispatch time eager mode cannot hide,
packs of R runs, and the whole sweep (train, eval, fixed costs) built from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from petlbench.estimate.counting import _MATMUL_OPS, OpCounts
from petlbench.estimate.workload import TaskLoad


@dataclass(frozen=True)
class GpuModel:
    """A GPU as the model sees it: dense bf16 tensor-core peak and HBM bandwidth (data sheets)."""

    name: str
    bf16_flops: float
    hbm_bytes_s: float


GPUS: dict[str, GpuModel] = {
    "H100": GpuModel("H100 SXM 80 GB (HBM3)", 989e12, 3.35e12),
    "H200": GpuModel("H200 SXM 141 GB (HBM3e)", 989e12, 4.8e12),
}
#: Stated assumptions of the GPU model (not measured here: no GPU in this environment).
ASSUMPTIONS: dict[str, float] = {
    "matmul_efficiency": 0.70,  # fraction of the bf16 peak a ViT-B GEMM reaches (cuBLAS, H100 class)
    "bandwidth_efficiency": 0.80,  # fraction of HBM bandwidth a memory-bound kernel reaches
    "kernel_floor_s": 2.5e-6,  # shortest kernel, launch to completion, when issued one by one
    "activation_bytes_factor": 0.5,  # bf16 autocast: float activations counted in fp32, moved as bf16
}
#: Packs the model reports besides one run at a time: three seeds of one method in one step.
PACKS = (3,)
#: Latency timing per record on a GPU, modelled: (2 warm-up + 11 rounds) x 2 models x the 20 ms
#: minimum sample of :func:`petlbench.bench.deployed_latency` (batch-1 forwards take less).
GPU_LATENCY_TIMING_S = 13 * 2 * 0.02
#: Host-to-device copy of a run's model (pageable memory), modelled.
H2D_BYTES_S = 12e9


def gpu_time(counts: OpCounts, gpu: GpuModel, host_per_op_s: float, autocast_cast_bytes: int = 0,
             autocast_casts: int = 0, pack: int = 1, pack_host_ratio: float = 1.0) -> dict[str, float]:
    """Modelled seconds of one counted call on ``gpu``: eager (host-issued ops, launch floor, host
    dispatch that cannot be hidden beyond the GPU's own time) and compiled (the GPU work only).

    ``pack`` R > 1: one packed step of R runs (every op on R x the rows; casts and launch floors
    once; host work ``pack_host_ratio`` x one run's). The times are the whole pack's."""
    a = ASSUMPTIONS
    peak = gpu.bf16_flops * a["matmul_efficiency"]
    bw = gpu.hbm_bytes_s * a["bandwidth_efficiency"]
    eager = compiled = matmul = 0.0
    for name, flops, nbytes, optimizer in counts.ops:
        if name.endswith("(no data)"):
            continue  # host work only (counted in the host time below)
        moved = (nbytes if optimizer else nbytes * a["activation_bytes_factor"]) * pack  # AdamW keeps fp32 state
        flops *= pack
        if name in _MATMUL_OPS:
            t = max(flops / peak, moved / bw)
            matmul += flops / peak
            compiled += max(t, a["kernel_floor_s"])  # stays its own kernel when compiled
        else:
            t = moved / bw
            compiled += t  # fused into a neighbour when compiled: no kernel of its own
        eager += max(t, a["kernel_floor_s"])
    cast_t = autocast_cast_bytes / bw  # autocast re-casts the frozen fp32 weights every forward
    compiled += cast_t
    eager += cast_t + autocast_casts * a["kernel_floor_s"]
    host = (counts.n_ops + autocast_casts) * host_per_op_s * (pack_host_ratio if pack > 1 else 1.0)
    # compile=true compiles the backbone; the AdamW phase stays eager (one optimiser per packed run):
    # its host work must fit under the GPU's time, or it bounds the compiled step.
    tail_host = sum(1 for o in counts.ops if o[3]) * host_per_op_s * pack
    return {"eager_s": max(eager, host), "eager_gpu_s": eager, "eager_host_s": host,
            "compiled_s": max(compiled, tail_host), "compiled_gpu_s": compiled, "compiled_host_s": tail_host,
            "matmul_floor_s": matmul}


def _sweep(loads: list[TaskLoad], step_s: float, eval_s: float, per_process_s: float, per_run_s: float,
           pack: int = 1) -> dict[str, float]:
    """One sweep of ``pack`` seeds (one process, packs of ``pack`` runs): totals, and per run-equivalent
    (what one seed's sweep costs)."""
    train = sum(t.train_steps for t in loads) * step_s  # step_s: the whole pack's step
    evals = pack * sum(t.eval_batches for t in loads) * eval_s  # each run evaluates its own model
    fixed = per_process_s + pack * len(loads) * per_run_s
    total = train + evals + fixed
    return {"pack": pack, "train_s": train, "eval_s": evals, "fixed_s": fixed, "total_s": total,
            "per_run_s": total / pack}


def model_gpus(loads: list[TaskLoad], counted: Mapping[str, OpCounts], extra: Mapping[str, Any],
               host_per_op_s: float, pack_ratios: Mapping[int, float | None], fixed: Mapping[str, float]
               ) -> dict[str, Any]:
    """The modelled sweep per GPU, mode (eager, compiled) and pack size, from counted and measured inputs.

    ``fixed``: ``build_model_s`` and ``hash_weights_s`` (paid once per process: the backbone cache),
    ``model_from_cache_s``, ``latency_copy_s`` and ``weight_bytes`` (per run)."""
    per_process = fixed.get("build_model_s", 0.0) + fixed.get("hash_weights_s", 0.0)
    per_run = fixed.get("model_from_cache_s", 0.0) + fixed.get("latency_copy_s", 0.0) \
        + GPU_LATENCY_TIMING_S + fixed.get("weight_bytes", 0.0) / H2D_BYTES_S
    casts, cast_bytes = extra["autocast_casts"], extra["autocast_cast_bytes"]
    out: dict[str, Any] = {}
    for key, gpu in GPUS.items():
        tr = gpu_time(counted["train_step"], gpu, host_per_op_s, cast_bytes, casts)
        ev = gpu_time(counted["eval_batch"], gpu, host_per_op_s, cast_bytes, casts)
        g: dict[str, Any] = {
            "gpu": asdict(gpu), "train_step": tr, "eval_batch": ev, "fixed_per_process_s": per_process,
            "fixed_per_run_s": per_run,
            "eager": _sweep(loads, tr["eager_s"], ev["eager_s"], per_process, per_run),
            "compiled": _sweep(loads, tr["compiled_s"], ev["compiled_gpu_s"], per_process, per_run),
            "matmul_floor": _sweep(loads, tr["matmul_floor_s"], ev["matmul_floor_s"], 0.0, 0.0),
            "packs": {},
        }
        for pack, ratio in pack_ratios.items():
            if ratio is None:
                continue
            tp = gpu_time(counted["train_step"], gpu, host_per_op_s, cast_bytes, casts, pack=pack, pack_host_ratio=ratio)
            g["packs"][str(pack)] = {
                "train_step": tp,
                "eager": _sweep(loads, tp["eager_s"], ev["eager_s"], per_process, per_run, pack),
                "compiled": _sweep(loads, tp["compiled_s"], ev["compiled_gpu_s"], per_process, per_run, pack),
            }
        out[key] = g
    return out
