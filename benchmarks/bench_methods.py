"""Speed and cost of every built-in method against the plain backbone and full fine-tuning.

A thin wrapper around ``petlbench bench`` (see petlbench/bench.py for what is measured and how)
that writes ``benchmarks/results/<device>-<date>.{json,md}``.

    python benchmarks/bench_methods.py                      # GPU if present: ViT-B/16, bf16, batch 64
    python benchmarks/bench_methods.py --quick              # CPU smoke run on a tiny ViT
    python benchmarks/bench_methods.py --memory-only        # ViT-B/16, batch 64: counts, FLOPs, peak memory
    python benchmarks/bench_methods.py --out DIR/methods    # write DIR/methods.{json,md} instead
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from petlbench.cli import main as cli

METHODS = "linear,bitfit,lora,ssf,adapter,vpt_shallow,vpt_deep,repadapter,arc,arc_att"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--memory-only", action="store_true", help="no timing (ViT-B at batch 64 on a CPU)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    ap.add_argument("--out", default=None, help="output path without suffix [default: results/<device>-...-<date>]")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    parts = [re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower(), "vit_tiny-quick" if args.quick else "vit_base-b64",
             dtype, *(["memory"] if args.memory_only else []), time.strftime("%Y%m%d")]
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "-".join(parts)
    argv = ["bench", "--method", args.methods, "--device", device, "--dtype", dtype, "--out", str(out)]
    argv += ["--no-timing"] if args.memory_only else []
    if args.quick:
        argv += ["--backbone", "vit_tiny_patch16_224", "--batch-size", "8", "--iters", "3", "--warmup", "1",
                 "--no-peft"] + [x for kv in ("img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2")
                                 for x in ("--backbone-arg", kv)]
    sys.exit(cli.main(argv, standalone_mode=False) or 0)


if __name__ == "__main__":
    main()
