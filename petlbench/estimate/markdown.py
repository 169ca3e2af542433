"""The estimate as text (terminal and ``benchmarks/results/*.md``), every figure labelled as
counted, measured or modelled, and the verdict: which GPU, mode and pack size meet the target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


#: The product's target: one VTAB-1k sweep of one method (one seed) on one H100/H200.
TARGET_MIN = 7.0


def verdict(r: Mapping[str, Any], target_min: float = TARGET_MIN) -> list[tuple[str, str, int, float]]:
    """(GPU, mode, runs per step, modelled minutes per seed's sweep) of every mode that meets the target."""
    met = []
    for key, g in r["modelled"].items():
        rows = [("eager", 1, g["eager"]), ("compiled", 1, g["compiled"])]
        rows += [(mode, int(R), pk[mode]) for R, pk in g.get("packs", {}).items() for mode in ("eager", "compiled")]
        met += [(key, mode, R, sw["per_run_s"] / 60) for mode, R, sw in rows if sw["per_run_s"] / 60 <= target_min]
    return met


def to_markdown(r: dict[str, Any]) -> str:
    """The estimate for the terminal and benchmarks/results/*.md, each figure labelled by its kind."""
    c, m = r["counted"], r["measured"]
    lines = [
        f"**Sweep estimate: {r['suite']} ({len(r['tasks'])} tasks) x {r['method']} x 1 seed, {r['backbone']} "
        f"{r['image_size']}px** (petlbench {r['petlbench']}, torch {r['torch']}, {r['date']})",
        "",
        f"Workload (from the suite and the method's paper recipe): batch {r['batch_size']}, epochs {r['epochs']}, "
        f"{r['train_steps']:,} train steps, {r['test_images']:,} test images in {r['eval_batches']:,} eval batches "
        f"of {r['eval_batch_size']}.",
        "",
        f"Counted (exact, meta device): train step {c['train_step']['ops']:,} aten ops "
        f"({c['train_step']['kernels']:,} that move data), "
        f"{c['train_step']['flops'] / 1e12:.3f} TFLOP ({c['train_step']['matmul_ops']} matmul-class ops), "
        f"{c['train_step']['bytes'] / 1e9:.2f} GB of fp32 operands (unfused; attention as flash kernels); eval batch "
        f"({'merged, as the engine evaluates a mergeable method' if c.get('eval_merged') else 'unmerged'}) "
        f"{c['eval_batch']['ops']:,} ops, {c['eval_batch']['flops'] / 1e12:.3f} TFLOP; autocast casts "
        f"{c['autocast_casts']} Linear weights per forward ({c['autocast_cast_bytes'] / 1e6:.0f} MB moved).",
        "",
        f"Measured on {m['device']}: host cost {1e6 * m['host']['per_op_s']:.1f} us per dispatched op "
        f"(fastest of 15 tiny-tensor steps of the same depth, {m['host']['tiny_step_ops']} ops).",
    ]
    for R, ph in (m.get("packed_host") or {}).items():
        lines.append(f"Measured host cost of a packed step of {R} runs (the packed engine, same tiny ViT): "
                     + (f"{ph['ratio']:.2f} x one run's step." if ph.get("ratio") is not None
                        else f"not packable ({ph.get('cannot_pack')})."))
    if "train_step_s" in m:
        f = m["fixed"]
        s = m["sweep_on_this_cpu"]
        lines += [
            f"Measured train step {m['train_step_s']:.2f} s, eval batch {m['eval_batch_s']:.2f} s (timed at batch "
            f"{m['eval_measured_at_batch']}, scaled per image); once per process: build {f['build_model_s']:.2f} s, "
            f"hash weights {f['hash_weights_s']:.2f} s; per run: model from the backbone cache "
            f"{f.get('model_from_cache_s', float('nan')):.2f} s, deployed-latency timing "
            f"{f['deployed_latency_s']:.2f} s on this CPU (its backbone copy {f.get('latency_copy_s', float('nan')):.2f} s). "
            f"This sweep on this CPU: {_min(s['total_s'])} (train {_min(s['train_s'])}, eval {_min(s['eval_s'])}, "
            f"fixed {_min(s['fixed_s'])}).",
        ]
    if "remodelled" in m:
        rm = m["remodelled"]
        lines.append(f"Re-modelled on {rm['date']} from the estimate of {rm['saved_date']}: kept as measured then: "
                     f"{', '.join(rm['kept_from_saved'])}; counted again: {', '.join(rm['counted_again'])}; "
                     f"measured now: {', '.join(rm['measured_now'])}.")
    a = r["assumptions"]
    g0 = next(iter(r["modelled"].values()))
    lines += [
        "",
        f"Modelled per GPU (data-sheet bf16 peak and HBM bandwidth; assumed: matmul at "
        f"{a['matmul_efficiency']:.0%} of peak, memory-bound kernels at {a['bandwidth_efficiency']:.0%} of bandwidth, "
        f"{1e6 * a['kernel_floor_s']:.1f} us kernel floor in eager mode, bf16 activations; host cost per op as "
        f"measured here). Fixed costs: {g0['fixed_per_process_s']:.1f} s once per process (build + hash, measured "
        f"here) and {g0['fixed_per_run_s']:.2f} s per run (model from the cache and the latency timing's copy, "
        f"measured here; the latency timing itself modelled at {a.get('gpu_latency_timing_s', 0.52):.2f} s; "
        "the host-to-device copy modelled). A pack of R runs (`petlbench run --pack R`, e.g. three seeds) is one "
        "step on R x the rows (FLOPs and bytes x R: an upper bound, the shared frozen weights are read once), its "
        "casts and launch floors once, its host work the measured packed ratio; each run still evaluates its own "
        "model and carries its own latency timing. \"compiled\": the step's GPU work issued as a whole, bounded "
        "below by the host work of the AdamW phase, which stays eager (counted ops x host cost per op, x R in a "
        "pack). **per seed** = the whole pack's time / R.",
        "",
        "| GPU | mode | runs per step | train step (whole step) | eval batch | train | eval | fixed | **sweep per seed** |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, g in r["modelled"].items():
        rows = []
        for mode, step_key, label in (("eager", "eager_s", "eager (default)"),
                                      ("compiled", "compiled_s", "compiled / graphed")):
            rows.append((label, 1, g["train_step"][step_key], g["eval_batch"][step_key], g[mode]))
            for R, pk in g.get("packs", {}).items():
                rows.append((label, int(R), pk["train_step"][step_key], g["eval_batch"][step_key], pk[mode]))
        rows.append(("matmul floor", 1, g["train_step"]["matmul_floor_s"], g["eval_batch"]["matmul_floor_s"],
                     {**g["matmul_floor"], "per_run_s": g["matmul_floor"].get("per_run_s", g["matmul_floor"]["total_s"])}))
        for label, R, step_s, eval_s, sw in rows:
            lines.append(f"| {key} | {label} | {R} | {1e3 * step_s:.2f} ms | {1e3 * eval_s:.2f} ms | "
                         f"{_min(sw['train_s'])} | {_min(sw['eval_s'])} | {_min(sw['fixed_s'])} | "
                         f"**{_min(sw['per_run_s'])}** |")
        t = g["train_step"]
        lines.append(f"| {key} | eager: GPU vs host | 1 | {1e3 * t['eager_gpu_s']:.2f} ms GPU | "
                     f"{1e3 * t['eager_host_s']:.2f} ms host | | | | bound: "
                     f"{'host' if t['eager_host_s'] > t['eager_gpu_s'] else 'GPU'} |")
        lines.append(f"| {key} | compiled: GPU vs eager AdamW host | 1 | {1e3 * t['compiled_gpu_s']:.2f} ms GPU | "
                     f"{1e3 * t['compiled_host_s']:.2f} ms host | | | | bound: "
                     f"{'host' if t['compiled_host_s'] > t['compiled_gpu_s'] else 'GPU'} |")
    met = verdict(r)
    lines += ["", f"Target (one VTAB-1k sweep of one method, one seed, <= {TARGET_MIN:.0f} min on one H100/H200), "
              "in this model: " + ("met by " + "; ".join(f"{k} {mode} with {R} run(s) per step ({t:.2f} min)"
                                                       for k, mode, R, t in met) + "." if met else "not met in any mode.")
              + " Modelled, not measured on a GPU."]
    cache = r["cache"]
    lines += [
        "",
        f"Decode cache written by the first sweep (train + test splits): {cache['at_input_size_bytes'] / 1e9:.1f} GB "
        f"at {r['image_size']}x{r['image_size']}, {cache['native_bytes'] / 1e9:.1f} GB with native-resolution "
        "storage (TFDS native sizes of the 8 tasks whose images are smaller; modelled from the image counts).",
    ]
    if not math.isfinite(r["modelled"]["H100"]["eager"]["total_s"]):  # pragma: no cover - defensive
        lines.append("- note: the model produced a non-finite time")
    return "\n".join(lines)
