"""How the demo's micro-ViT weights were made: pretraining on the upstream digits.

petlbench does not run this at run time. The result ships inside the package
(``petlbench/data/demo_vit_v3.safetensors``, its SHA-256 recorded in
:data:`petlbench.data.demo.DEMO_WEIGHTS_SHA256`), so every machine uses the same bytes, gets the
same run ids and the same demo numbers, and the first demo run does not spend a quarter of a
minute pretraining. ``scripts/make_demo_weights.py`` calls :func:`save_demo_weights` to make
the file again.

Deterministic by construction: a fixed seed, a seeded loader, and **one torch thread** for the
whole pretraining (set here and restored afterwards). With two threads, matmul reductions are
split differently and the weights differ in the last bits, which is how two machines used to
get two different demo backbones. Bit-identical output also needs the same torch build and CPU
instruction set (torch's CPU kernels are chosen per instruction set); the pinned versions are
in ``constraints.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from petlbench.data.demo import (
    DEMO_ARCH,
    DEMO_BACKBONE_KWARGS,
    DEMO_SEED,
    DEMO_WEIGHTS_VERSION,
    upstream_images,
)

#: The pretraining recipe of the shipped weights; it is written into the file's metadata, and a
#: test checks that the shipped file says exactly this (the recipe in the code made the file).
DEMO_PRETRAIN: dict[str, Any] = {
    "source": "sklearn digits, 897-image upstream pool, 10-way",
    "epochs": 12, "batch_size": 32, "lr": 1.5e-3, "weight_decay": 0.05, "warmup_epochs": 1,
    "seed": 0, "normalization": "inception", "shift": 0,  # random shift by up to `shift` px (pad + crop)
}
# Frozen features + logistic regression on the demo tasks (test split), weights v2 (same recipe):
# digits 0.87 vs 0.44 from a random-init micro-ViT, digits_rotation 0.67 vs 0.51, faces 0.97 vs 0.84.


def pretrain_demo_backbone(recipe: Mapping[str, Any] = DEMO_PRETRAIN, *, images: int | None = None,
                           log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Train the micro-ViT on the upstream digits; return (backbone state_dict without head, metadata).

    ``images``: use only the first N upstream images (tests rebuild a tiny version this way).
    Runs on one torch thread whatever the caller set (see the module docstring); restores it after.
    """
    import timm
    import torch

    from petlbench.data.loader import DeviceLoader
    from petlbench.data.transforms import NORMALIZATIONS

    cfg = dict(recipe)
    pool, labels = upstream_images()
    if images is not None:
        pool, labels = pool[:images], labels[:images]
    norm = NORMALIZATIONS[cfg["normalization"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            model = timm.create_model(DEMO_ARCH, num_classes=10, **DEMO_BACKBONE_KWARGS)
            k = int(cfg["shift"])  # pad so that the loader's random crop acts as a small random shift
            padded = np.pad(pool, ((0, 0), (k, k), (k, k), (0, 0)))
            loader = DeviceLoader(
                torch.from_numpy(padded), torch.from_numpy(labels), batch_size=cfg["batch_size"],
                normalization=norm, crop=32, random_crop=k > 0, shuffle=True, drop_last=True, seed=cfg["seed"],
            )
            opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
            total = cfg["epochs"] * len(loader)
            warm = cfg["warmup_epochs"] * len(loader)

            def lr_factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                return 0.5 * (1 + np.cos(np.pi * (step - warm) / max(total - warm, 1)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
            model.train()
            correct = seen = 0
            for epoch in range(cfg["epochs"]):
                correct = seen = 0
                for x, y in loader:
                    logits = model(x)
                    loss = torch.nn.functional.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
                if log is not None:
                    log(f"epoch {epoch + 1}/{cfg['epochs']}: loss {loss.item():.3f}, train acc {correct / max(seen, 1):.3f}")
            model.reset_classifier(0)
            state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    meta = {
        "arch": DEMO_ARCH, "backbone_kwargs": json.dumps(DEMO_BACKBONE_KWARGS, sort_keys=True),
        "pretrain": json.dumps(cfg, sort_keys=True), "version": DEMO_WEIGHTS_VERSION, "data_seed": str(DEMO_SEED),
        "mean": json.dumps(norm.mean), "std": json.dumps(norm.std),
        "train_accuracy_last_epoch": f"{correct / max(seen, 1):.4f}", "torch_threads": "1",
    }
    return state, meta


def save_demo_weights(path: str | Path, recipe: Mapping[str, Any] = DEMO_PRETRAIN, *, images: int | None = None,
                      log: Callable[[str], None] | None = None) -> str:
    """Pretrain (:func:`pretrain_demo_backbone`) and write ``path`` atomically; return its SHA-256."""
    from safetensors.torch import save_file

    state, meta = pretrain_demo_backbone(recipe, images=images, log=log)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # A single metadata key: safetensors orders a multi-key map arbitrarily, and the file
        # must have the same bytes every time it is made.
        save_file(state, str(tmp), metadata={"petlbench_demo": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return hashlib.sha256(path.read_bytes()).hexdigest()
