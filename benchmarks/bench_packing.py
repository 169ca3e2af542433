"""Throughput of packed runs: R runs of one method in one vmapped step against the same R runs one by one.

Both sides run the real training code: :func:`petlbench.engine.train_step` per run alone, and
:func:`petlbench.packing.packed_step` for the pack (the step ``petlbench.runner.execute_packed``
trains with). Timed interleaved (each contender once per round, in a new seeded order), median
of the rounds. The figure is the throughput ratio: R x (one run's step) / (the packed step).
Writes ``benchmarks/results/<device>-packing-<method>-r<R>-<date>.json``.

    python benchmarks/bench_packing.py                        # ViT-S/16 geometry at 224 px on the GPU
    python benchmarks/bench_packing.py --quick                # CPU: a small ViT, a few rounds
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import timm
import torch

from petlbench.bench import interleaved
from petlbench.engine import train_step
from petlbench.model import create_model
from petlbench.packing import PackedForward, packed_step, share_frozen
from petlbench.precision import resolve_precision
from petlbench.runner import seed_everything

CFG = {"label_smoothing": 0.0, "grad_clip": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small ViT on the CPU")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--runs", type=int, default=4, help="R, the runs per pack")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true", help="compile both sides (once per structure, as training does)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.quick:
        arch, kw, batch, rounds = "vit_small_patch16_224", {"img_size": 64, "depth": 4}, args.batch_size or 16, \
            args.rounds or 5
    else:
        arch, kw, batch, rounds = "vit_small_patch16_224", {}, args.batch_size or 32, args.rounds or 10
    size = kw.get("img_size", 224)
    plan = resolve_precision(args.precision, device)
    models = []
    for seed in range(args.runs):
        seed_everything(seed)
        models.append(create_model(arch, args.method, 100, backbone_kwargs=kw, reuse_backbone=True).to(device).train())
    share_frozen(models)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(args.runs, batch, 3, size, size, generator=gen).to(device)
    ys = torch.randint(0, 100, (args.runs, batch), generator=gen).to(device)
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    alone_opt = torch.optim.AdamW(params[0], lr=1e-4)
    opts = [torch.optim.AdamW(ps, lr=1e-4) for ps in params]
    forward = PackedForward(models, compile=args.compile, batch_shape=(batch, 3, size, size))
    cfgs = [CFG] * args.runs
    one = models[0]
    if args.compile:
        from petlbench.engine import compiled_features

        features, head = compiled_features(one, (batch, 3, size, size), True, True), one.backbone.head

        def one(x: torch.Tensor) -> torch.Tensor:
            return head(features(x))
    fns = {
        "one_run": lambda: train_step(one, alone_opt, params[0], xs[0], ys[0], device, plan),
        "packed": lambda: packed_step(forward, params, opts, xs, ys, cfgs, plan, device),
    }
    t = interleaved(fns, device, warmup=2, iters=rounds, min_sample_s=0.05)
    ratio = args.runs * t["one_run"]["median_s"] / t["packed"]["median_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    result = {
        "device": name, "torch": torch.__version__, "timm": timm.__version__, "date": time.strftime("%Y-%m-%d"),
        "backbone": arch, "backbone_kwargs": kw, "image_size": size, "method": args.method, "runs": args.runs,
        "batch_size_per_run": batch, "precision": plan.as_dict(), "rounds": rounds, "compiled": args.compile,
        "one_run_step_s": t["one_run"], "packed_step_s": t["packed"],
        "throughput_ratio": ratio,
        "note": "throughput_ratio = R x one run's step time / packed step time (> 1: packing trains more runs per "
                "second); medians of interleaved rounds",
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "-".join(
        [re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower(), "packing", args.method, f"r{args.runs}",
         "quick" if args.quick else "vit_small", *(["compiled"] if args.compile else []), time.strftime("%Y%m%d")])
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.method}, R={args.runs}, batch {batch}/run on {name}: one run {t['one_run']['median_s'] * 1e3:.1f} ms/step, "
          f"packed {t['packed']['median_s'] * 1e3:.1f} ms/step -> throughput x{ratio:.2f}  ({out.with_suffix('.json')})")


if __name__ == "__main__":
    main()
