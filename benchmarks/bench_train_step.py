"""Train-step throughput and model-FLOP utilisation of PETL methods (synthetic inputs, real shapes).

Measures, for each method, side by side in one process: the time of one optimizer step
(forward + backward + AdamW) at the given batch size, images/s, the FLOPs of that step counted
by ``torch.utils.flop_counter`` and, on a GPU, the fraction of the device's bf16 peak those FLOPs
reach. Also estimates the wall time of a VTAB-1k sweep of one method at one seed (100 epochs of
1000 images + one pass over the 19 test sets). Results go to stdout and, with --out, to JSON.

    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --batch-size 64
    python benchmarks/bench_train_step.py --quick          # CPU smoke run, tiny ViT
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import petlbench
from petlbench.engine import autocast

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; used only for the ratio.
BF16_PEAK = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12, "RTX 4090": 165e12}
VTAB_TEST_IMAGES = 10000 + 6084 + 1880 + 6149 + 3669 + 26032 + 21750 + 32768 + 5400 + 6300 + 42670 + 15000 \
    + 15000 + 22735 + 711 + 73728 + 73728 + 12150 + 12150


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK.items():
        if all(part in name for part in key.split()):
            return name, value
    return name, None


def step_fn(model, x, y, opt, device, precision):
    def step():
        with autocast(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_it(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="linear,full,bitfit,lora,ssf,adapter,vpt_deep,repadapter,arc,arc_att")
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny ViT on CPU, a few iterations (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    kwargs = {}
    size = 224
    if args.quick:
        args.backbone, size, args.batch_size, args.warmup, args.iters = "vit_tiny_patch16_224", 32, 8, 1, 2
        kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    device = torch.device(args.device)
    precision = args.dtype
    name, peak = peak_flops(device)
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    rows = []
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = petlbench.create_model(args.backbone, method, 100, backbone_kwargs=kwargs).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        step = step_fn(model, x, y, opt, device, precision)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        times = time_it(step, device, args.warmup, args.iters)
        med = statistics.median(times)
        row = {
            "method": method, "step_s_median": med, "step_s_min": min(times), "step_s_max": max(times),
            "images_per_s": args.batch_size / med, "step_flops": flops, "achieved_flops": flops / med,
            "mfu": (flops / med / peak) if peak else None,
            "vtab_sweep_minutes_estimate": (100 * 1000 / (args.batch_size / med)
                                            + VTAB_TEST_IMAGES / (3 * args.batch_size / med)) / 60,
        }
        rows.append(row)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = f"device: {name}; torch {torch.__version__}; {args.backbone} {size}px; batch {args.batch_size}; {precision}"
    print(header)
    print(f"{'method':<12} {'step ms':>9} {'img/s':>9} {'TFLOP/step':>11} {'MFU':>6}  {'VTAB sweep (est.)':>18}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "n/a"
        verdict = "" if r["mfu"] is None else ("  ok (>=50%)" if r["mfu"] >= 0.5 else "  below 50% target")
        print(f"{r['method']:<12} {1e3 * r['step_s_median']:>9.1f} {r['images_per_s']:>9.1f} "
              f"{r['step_flops'] / 1e12:>11.3f} {mfu:>6}  {r['vtab_sweep_minutes_estimate']:>15.1f} min{verdict}")
    if peak is None:
        print("MFU target (>=50% of bf16 peak) not measurable here: no known GPU peak for this device.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "backbone": args.backbone,
                                        "batch_size": args.batch_size, "precision": precision,
                                        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
