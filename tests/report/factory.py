"""Hand-written run records in the schema of petlbench.records, for the reporter's tests.

Values follow simple formulas (no randomness), so golden files and hand-computed means are
stable. :func:`golden_records` is the fixed set the golden files were rendered from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from petlbench.records import SCHEMA_VERSION

HOSTILE = "my_m&th%d#1"
#: Every character LaTeX treats specially, in one method name.
TEX_HOSTILE = "a_b&c%d#e$f{g}h~i^j\\k"
HTML_HOSTILE = "x<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">"

VTAB = {
    "Natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "Specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "Structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"],
}
VTAB_TASKS = [t for tasks in VTAB.values() for t in tasks]
CLASSES = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
           "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
           "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
           "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9}
BODY = {"linear": 0, "lora": 294_912, "arc": 129_024, HOSTILE: 100_000}
WEIGHTS_SHA = "3f8a1b2c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"

PROTOCOL_TEXT = {
    "vtab1k": "train on train800val200; test accuracy after the final epoch (no selection on test)",
    "legacy-best-test": "best test accuracy over epochs (the official scripts' selection on the TEST set; "
                        "not comparable with honest protocols)",
}


def fingerprint(task: str, split: str, variant: str = "") -> str:
    return hashlib.sha256(f"{task}/{split}{variant}".encode()).hexdigest()


def make_record(method: str, task: str, seed: int, top1: float | None, *, suite: str = "vtab",
                protocol: str = "vtab1k", status: str = "ok", classes: int | None = None,
                body: int | None = None, hparams: dict[str, Any] | None = None, train_time: float = 60.0,
                fingerprint_variant: str = "", latency_ratio: float | None = None,
                gpu_mem: int | None = 2_000_000_000, **overrides: Any) -> dict[str, Any]:
    """One record; failed records look like the ones the engine writes (error, empty metrics)."""
    classes = classes if classes is not None else CLASSES.get(task, 10)
    body = body if body is not None else BODY.get(method, 50_000)
    head = 768 * classes + classes
    trainable = head + body
    run_id = hashlib.sha256(f"{suite}/{task}/{method}/{seed}/{protocol}/{hparams}".encode()).hexdigest()[:16]
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "label": f"{suite}/{task}/{method}/seed{seed}",
        "suite": suite,
        "task": task,
        "method": method,
        "seed": seed,
        "protocol": protocol,
        "protocol_description": PROTOCOL_TEXT.get(protocol, protocol),
        "status": status,
        "error": None,
        "metrics": {},
        "params": {},
        "config": {
            "method_hparams": hparams if hparams is not None else {"rank": 8} if method == "lora" else {},
            "train": {"epochs": 100, "batch_size": 64, "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 10,
                      "limit_train": None, "limit_eval": None},
            "protocol": protocol,
            "backbone": "vit_base_patch16_224",
            "backbone_kwargs": {},
            "pretrained": "vit_base_patch16_224.orig_in21k",
            "normalization": {"name": "inception", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "splits": {"train": "train800val200", "eval": ["test"], "sizes": {"train800val200": 1000}},
        },
        "efficiency": {},
        "provenance": {
            "petlbench_version": "0.1.0", "git_commit": "0" * 40, "git_dirty": False, "python": "3.11.7",
            "torch": "2.4.0", "timm": "1.0.15", "device": "NVIDIA H100 80GB HBM3", "hostname": "node1",
            "weights_sha256": WEIGHTS_SHA, "weights_source": "/data/weights/ViT-B_16.npz",
            "data_root": "/data/vtab-1k",
            "data_fingerprint": {"train800val200": fingerprint(task, "train800val200"),
                                 "test": fingerprint(task, "test", fingerprint_variant)},
            "start_time": f"2025-01-01T00:{seed:02d}:00+00:00", "end_time": f"2025-01-01T01:{seed:02d}:00+00:00",
        },
    }
    if status == "ok":
        record["metrics"] = {"top1": top1, "top1_final": top1, "selected_epoch": 100,
                             "curve": [{"epoch": 100, "split": "test", "top1": top1}], "train_loss": [1.0, 0.5]}
        record["params"] = {"trainable": trainable, "head": head, "trainable_without_head": body,
                            "extra_after_merge": 0 if method != HOSTILE else 4096, "backbone": 85_798_656,
                            "total": 85_798_656 + trainable, "trainable_bytes": 4 * trainable}
        record["efficiency"] = {"train_time_s": train_time, "train_images_per_s": 1000.0 * 100 / train_time,
                                "eval_time_s": 5.0, "peak_gpu_mem_allocated": gpu_mem,
                                "peak_gpu_mem_reserved": gpu_mem, "trainable_state_bytes": 4 * trainable}
        if latency_ratio is not None:
            record["efficiency"]["latency_ratio"] = latency_ratio
    else:
        record["error"] = {"type": "RuntimeError", "message": "CUDA out of memory: tried to allocate 2 GiB",
                           "traceback": "..."}
    record.update(overrides)
    return record


def acc(method: str, task: str, seed: int) -> float:
    """A made-up accuracy: a per-method level plus a per-task offset plus a small seed offset."""
    level = {"linear": 60.0, "lora": 66.0, "arc": 68.0, HOSTILE: 64.0}.get(method, 55.0)
    offset = (sum(ord(c) for c in task) % 23) - 11  # -11 .. +11, fixed per task
    mix = (sum(ord(c) for c in task + method) % 9) - 4  # -4 .. +4: which method wins depends on the task
    return round(min(99.0, max(1.0, level + offset + mix + (seed - 1) * 0.4 + (0.3 if seed == 2 else 0.0))), 2)


def golden_records() -> list[dict[str, Any]]:
    """linear and lora on all 19 VTAB tasks (3 seeds; one lora run failed), the hostile method on
    Natural (7/7) and two Specialized tasks (2 seeds; its dtd test data differ), and arc under
    legacy-best-test on three tasks (2 seeds)."""
    out = []
    for method in ("linear", "lora"):
        for task in VTAB_TASKS:
            for seed in (0, 1, 2):
                out.append(make_record(method, task, seed, acc(method, task, seed), train_time=30.0 + 10 * len(method),
                                       latency_ratio=1.0 if method == "lora" else None))
    out.append(make_record("lora", "cifar", 3, None, status="failed"))
    for task in VTAB["Natural"] + ["patch_camelyon", "eurosat"]:
        for seed in (0, 1):
            out.append(make_record(HOSTILE, task, seed, acc(HOSTILE, task, seed), hparams={"k": 4},
                                   fingerprint_variant="-other" if task == "dtd" else "", train_time=45.0))
    for task in ("cifar", "dtd", "kitti"):
        for seed in (0, 1):
            out.append(make_record("arc", task, seed, acc("arc", task, seed), protocol="legacy-best-test",
                                   hparams={"dim": 50}, train_time=50.0, gpu_mem=None))
    return out


def published_records(method: str, values: dict[str, float], seeds: Sequence[int] = (0, 1, 2),
                      spread: float = 0.5, hparams: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Records whose seed mean per task is exactly ``values[task]`` (seeds at v - s, v, v + s)."""
    out = []
    offsets = [(-spread, 0.0, spread)[i % 3] for i in range(len(seeds))] if len(seeds) == 3 else [0.0] * len(seeds)
    for task, v in values.items():
        for seed, off in zip(seeds, offsets, strict=True):
            out.append(make_record(method, task, seed, round(v + off, 4), hparams=hparams))
    return out


def write_records(folder: Path, records: Iterable[dict[str, Any]]) -> list[Path]:
    """Lay records out like `petlbench run` does: <suite>/<task>/<method>/<run_id>.json."""
    paths = []
    for r in records:
        safe = hashlib.sha256(r["method"].encode()).hexdigest()[:8] if not r["method"].isidentifier() else r["method"]
        path = folder / r["suite"] / r["task"] / safe / f"{r['run_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2))
        paths.append(path)
    return paths
