"""The offline demo: materialised in the VTAB-1k layout, deterministic, and a backbone that learned
something, shipped as package data that the repository's recipe makes again bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from petlbench.data import demo as demo_mod
from petlbench.data.cache import load_images
from petlbench.data.demo import demo_backbone, demo_weights, digits_partition, materialize_demo
from petlbench.data.fingerprint import fingerprint_task
from petlbench.data.loader import DeviceLoader
from petlbench.data.readers import read_split
from petlbench.data.suites import get_suite
from petlbench.data.transforms import transform_spec


def test_layout_and_sizes_match_the_yaml(demo_root: Path) -> None:
    suite = get_suite("demo")
    manifest = json.loads((demo_root / "MANIFEST.json").read_text())
    for task in suite.tasks:
        folder = demo_root / task.name
        assert sorted(p.name for p in folder.glob("*.txt")) == ["test.txt", "train800.txt", "train800val200.txt", "val200.txt"]
        for split in suite.splits:
            index = read_split(suite, task, split, demo_root)
            assert len(index) == task.expected_size(split) == manifest["tasks"][task.name][split]
            assert index.extensions == {".png": len(index)}
            assert set(index.labels) == set(range(task.classes)), (task.name, split)
        trainval = read_split(suite, task, "train800val200", demo_root).relpaths
        assert trainval == (read_split(suite, task, "train800", demo_root).relpaths
                            + read_split(suite, task, "val200", demo_root).relpaths)
        assert not set(trainval) & set(read_split(suite, task, "test", demo_root).relpaths)
    assert not list(demo_root.parent.glob(".building-*"))


def test_idempotent(demo_root: Path) -> None:
    probe = demo_root / "digits" / "train800.txt"
    stamp = probe.stat().st_mtime_ns
    assert materialize_demo(demo_root.parent) == demo_root
    assert probe.stat().st_mtime_ns == stamp


def test_fingerprint_stable_across_two_materialisations(demo_root: Path, tmp_path: Path) -> None:
    other = materialize_demo(tmp_path / "elsewhere")
    assert other != demo_root
    for task in ("digits", "faces", "textures"):
        assert fingerprint_task("demo", task, other) == fingerprint_task("demo", task, demo_root)


def test_upstream_pool_is_disjoint_from_demo_tasks() -> None:
    down, up = digits_partition()
    assert len(down) == 900 and len(up) == 897
    assert not set(down.tolist()) & set(up.tolist()) and len(set(down.tolist()) | set(up.tolist())) == 1797


def test_demo_backbone_config() -> None:
    arch, kwargs = demo_backbone()
    assert arch == "vit_tiny_patch16_224"
    assert kwargs == {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}


@pytest.fixture(scope="session")
def weights() -> Path:
    return demo_weights()


def _features(model: torch.nn.Module, root: Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    cached = load_images(read_split("demo", task, split, root), transform_spec("vtab_resize", 32), persist=False)
    model.eval()
    with torch.no_grad():
        feats = [model.forward_head(model.forward_features(x), pre_logits=True)
                 for x, _ in DeviceLoader.for_split(cached, train=False, batch_size=300, normalization="inception")]
    return torch.cat(feats).numpy(), cached.labels.numpy()


def test_pretrained_backbone_learned_something(weights: Path, demo_root: Path) -> None:
    """Frozen pretrained features + logistic regression must beat the same on a random-init micro-ViT."""
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression

    assert weights.suffix == ".safetensors" and weights.parent == Path(demo_mod.__file__).parent
    state = load_file(str(weights))
    assert not any(k.startswith("head") for k in state)
    with safe_open(str(weights), "pt") as f:
        assert json.loads(f.metadata()["petlbench_demo"])["arch"] == "vit_tiny_patch16_224"
    arch, kwargs = demo_backbone()
    scores = {}
    for name in ("pretrained", "random"):
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=0, **kwargs)
        if name == "pretrained":
            model.load_state_dict(state, strict=True)
        x_tr, y_tr = _features(model, demo_root, "digits", "train800val200")
        x_te, y_te = _features(model, demo_root, "digits", "test")
        scores[name] = LogisticRegression(max_iter=1000).fit(x_tr, y_tr).score(x_te, y_te)
    assert scores["pretrained"] > scores["random"] + 0.15, scores


def test_shipped_weights_have_the_recorded_sha_and_were_made_by_the_recipe_in_the_code(weights: Path) -> None:
    import hashlib

    from safetensors import safe_open

    from petlbench.data.demo_pretrain import DEMO_PRETRAIN

    assert hashlib.sha256(weights.read_bytes()).hexdigest() == demo_mod.DEMO_WEIGHTS_SHA256
    with safe_open(str(weights), "pt") as f:
        meta = json.loads(f.metadata()["petlbench_demo"])
    assert json.loads(meta["pretrain"]) == DEMO_PRETRAIN and meta["torch_threads"] == "1"
    assert json.loads(meta["backbone_kwargs"]) == demo_backbone()[1] and meta["version"] == demo_mod.DEMO_WEIGHTS_VERSION


def test_damaged_weights_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from petlbench.errors import PetlbenchError

    monkeypatch.setattr(demo_mod, "DEMO_WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(PetlbenchError, match="not the recorded 000000000000") as err:
        demo_weights()
    assert "\n" not in str(err.value) and "Fix: reinstall petlbench" in str(err.value)


def test_pretraining_gives_the_same_bytes_whatever_the_thread_count(tmp_path: Path) -> None:
    """A tiny rebuild (1 epoch, 128 images) on a 2-thread and a 1-thread caller: the same bytes,
    because pretraining pins one thread (unpinned, these two builds differ); the caller's thread
    count is restored."""
    from petlbench.data.demo_pretrain import DEMO_PRETRAIN, save_demo_weights

    tiny = dict(DEMO_PRETRAIN, epochs=1)
    before = torch.get_num_threads()
    shas = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            shas.append(save_demo_weights(tmp_path / f"w{threads}.safetensors", tiny, images=128))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert shas[0] == shas[1]
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_data_do_not_depend_on_the_thread_count(demo_root: Path, tmp_path: Path) -> None:
    """Built in a fresh process with two threads for every pool: the same files as this session's
    demo data (the manifest and every task's fingerprint)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    code = "import sys; from petlbench.data.demo import materialize_demo; print(materialize_demo(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    other = Path(out.stdout.strip())
    assert (other / "MANIFEST.json").read_bytes() == (demo_root / "MANIFEST.json").read_bytes()
    for task in get_suite("demo").task_names:
        assert fingerprint_task("demo", task, other) == fingerprint_task("demo", task, demo_root)
