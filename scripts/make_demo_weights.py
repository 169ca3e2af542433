#!/usr/bin/env python
"""Make the demo micro-ViT's weights that ship in petlbench (petlbench/data/demo_vit_v3.safetensors).

    python scripts/make_demo_weights.py            # rebuild them in place, print the SHA-256
    python scripts/make_demo_weights.py --check    # rebuild in a temporary folder, compare with the shipped file

It pretrains the micro-ViT on the 897 upstream sklearn digits (recipe: DEMO_PRETRAIN in
petlbench/data/demo_pretrain.py; 12 epochs, seed 0) on ONE torch thread, so the bytes do not
depend on how many cores the machine has. About 15 s of CPU time. The same bytes also need the
pinned torch (constraints.txt) and an x86-64 CPU with the same vector instructions (torch picks
its CPU kernels per instruction set). After a deliberate change of the recipe, bump
DEMO_WEIGHTS_VERSION and record the printed SHA-256 as DEMO_WEIGHTS_SHA256 in petlbench/data/demo.py.
"""

from __future__ import annotations

import os

# Before torch is imported: its intra-op pools read these once.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the shipped file)")
    parser.add_argument("--check", action="store_true",
                        help="write to a temporary folder and exit 1 unless the bytes equal the shipped file's")
    args = parser.parse_args(argv)

    import torch

    from petlbench.data import demo
    from petlbench.data.demo_pretrain import save_demo_weights

    torch.set_num_threads(1)
    shipped = Path(demo.__file__).with_name(demo.DEMO_WEIGHTS_FILE)
    started = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / demo.DEMO_WEIGHTS_FILE if args.check else (args.out or shipped)
        sha = save_demo_weights(target, log=lambda line: print(line, file=sys.stderr))
        print(f"{target}: SHA-256 {sha} ({time.process_time() - started:.1f} s CPU, torch {torch.__version__})")
        if sha == demo.DEMO_WEIGHTS_SHA256:
            print("equal to the recorded DEMO_WEIGHTS_SHA256")
            return 0
        print(f"DIFFERS from the recorded DEMO_WEIGHTS_SHA256 {demo.DEMO_WEIGHTS_SHA256}", file=sys.stderr)
        return 1 if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
