"""The workload of a sweep as it would run: every task's training-set and test-set size, the
method's paper recipe (``recipes``: epochs, batch sizes) and the size of the decode cache it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Where each VTAB-1k task's images are no larger than 224x224 and of one size (TFDS native sizes,
# kept by NOAH's export): the cache stores them so; every other task at 224x224.
VTAB_NATIVE_SIZES: dict[str, tuple[int, int]] = {
    "cifar": (32, 32), "svhn": (32, 32), "patch_camelyon": (96, 96), "eurosat": (64, 64),
    "dsprites_loc": (64, 64), "dsprites_ori": (64, 64), "smallnorb_azi": (96, 96), "smallnorb_ele": (96, 96),
}


@dataclass(frozen=True)
class TaskLoad:
    name: str
    classes: int
    train_images: int
    test_images: int
    epochs: int
    batch_size: int
    eval_batch_size: int
    drop_last: bool

    @property
    def train_steps(self) -> int:
        per_epoch = self.train_images // self.batch_size if self.drop_last else -(-self.train_images // self.batch_size)
        return self.epochs * per_epoch

    @property
    def eval_batches(self) -> int:
        return -(-self.test_images // self.eval_batch_size)


def workload(suite_name: str, method_name: str, overrides: Mapping[str, Any] | None = None) -> list[TaskLoad]:
    """Every task of the suite as the sweep would run it (default protocol: train on the train
    role's split, evaluate once on the test role's split at the end)."""
    from petlbench.config import resolve_train
    from petlbench.data import get_suite
    from petlbench.registry import get_method

    suite = get_suite(suite_name)
    method = get_method(method_name)
    defaults = dict(getattr(suite, "train_defaults", {}) or {})
    loads = []
    for task in suite.tasks:
        cfg = resolve_train(defaults, method, suite.name, task.name, overrides or {}, protocol="paper")
        loads.append(TaskLoad(
            task.name, task.classes, int(task.sizes[suite.split_for("train")]), int(task.sizes[suite.split_for("test")]),
            int(cfg["epochs"]) + int(cfg["cooldown_epochs"]), int(cfg["batch_size"]), int(cfg["eval_batch_size"]),
            bool(cfg["drop_last"]),
        ))
    return loads


def cache_bytes(loads: list[TaskLoad], size: int, native: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Bytes the decode cache writes for the train and test splits of every task, at ``size`` and native."""
    full = sum((t.train_images + t.test_images) * size * size * 3 for t in loads)
    def pixels(name: str) -> int:  # stored natively only when no larger than the input (load_images' rule)
        h, w = native.get(name, (size, size))
        return min(h * w, size * size)

    nat = sum((t.train_images + t.test_images) * pixels(t.name) * 3 for t in loads)
    return {"at_input_size_bytes": full, "native_bytes": nat}


def _setup(method: str, backbone: str, suite: str, overrides: Mapping[str, Any] | None,
           backbone_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The workload and the step's shapes, as a sweep would run them."""
    import petlbench
    from petlbench.config import resolve_train
    from petlbench.data import get_suite

    loads = workload(suite, method, overrides)
    batches = sorted({t.batch_size for t in loads})
    eval_batches = sorted({t.eval_batch_size for t in loads})
    if len(batches) > 1 or len(eval_batches) > 1:
        raise petlbench.PetlbenchError(f"--sweep-estimate: the tasks of {suite!r} use several batch sizes "
                                       f"({batches}); give one with --batch-size.")
    kwargs = dict(backbone_kwargs or {})
    the_suite = get_suite(suite)
    cfg = resolve_train(dict(getattr(the_suite, "train_defaults", {}) or {}), petlbench.get_method(method), suite,
                        loads[0].name, overrides or {}, protocol="paper")
    return {"loads": loads, "batch": batches[0], "eval_batch": eval_batches[0], "kwargs": kwargs,
            "classes": round(sum(t.classes for t in loads) / len(loads)),
            "size": int(kwargs.get("img_size", the_suite.image_size)), "grad_clip": float(cfg["grad_clip"])}
