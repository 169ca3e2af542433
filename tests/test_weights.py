"""Loading backbone weights: every format, verification, provenance, and every bad file."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import petlbench
from petlbench import PetlbenchError
from petlbench.weights import save_backbone
from tests.conftest import TINY_SWIN, TINY_VIT
from tests.jax_npz import write_google_npz

ARCH, KW = TINY_VIT


def source_model(arch: str = ARCH, kw: dict = KW, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(123)
    return timm.create_model(arch, num_classes=num_classes, **kw)


def assert_body_equal(model: petlbench.PETLModel, src: torch.nn.Module) -> None:
    ref = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    got = model.net.state_dict()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_state_dict_files_load_exactly(tmp_path, suffix: str) -> None:
    src = source_model()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)
    assert_body_equal(model, src)
    assert model.weights.sha256 == sha(path)
    assert model.weights.format == suffix.lstrip(".")
    assert model.num_classes == 3  # the 10-class head of the checkpoint is not used


def test_google_npz_loads_exactly(tmp_path) -> None:
    src = source_model()
    path = write_google_npz(src, tmp_path / "ViT-tiny.npz")
    model = petlbench.create_model(ARCH, "lora", 7, pretrained=path, backbone_kwargs=KW)
    assert_body_equal(model, src)
    assert model.weights.format == "npz" and model.weights.sha256 == sha(path)


def test_npz_with_a_missing_tensor_names_it(tmp_path) -> None:
    path = write_google_npz(source_model(), tmp_path / "broken.npz",
                            drop=("Transformer/encoderblock_1/LayerNorm_2/scale",))
    with pytest.raises(PetlbenchError, match="broken.npz"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)


def test_npz_of_another_depth_is_refused(tmp_path) -> None:
    deeper = source_model(kw={**KW, "depth": 3})
    path = write_google_npz(deeper, tmp_path / "deep.npz")
    with pytest.raises(PetlbenchError, match="3 transformer blocks but backbone"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)


def test_swin_checkpoint_loads(tmp_path) -> None:
    arch, kw = TINY_SWIN
    src = source_model(arch, kw)
    path = save_backbone(src, tmp_path / "swin.safetensors")
    model = petlbench.create_model(arch, "repadapter", 4, pretrained=path, backbone_kwargs=kw)
    assert_body_equal(model, src)


def test_missing_backbone_tensors_are_named(tmp_path) -> None:
    state = source_model().state_dict()
    del state["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(PetlbenchError, match=r"missing from checkpoint: blocks\.1\.mlp\.fc2\.weight"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)


def test_wrong_architecture_is_named(tmp_path) -> None:
    path = save_backbone(source_model(kw={**KW, "embed_dim": 48, "num_heads": 3}), tmp_path / "wide.safetensors")
    with pytest.raises(PetlbenchError, match=r"shape mismatch.*does not match backbone|does not match backbone"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)


def test_unexpected_tensors_are_named(tmp_path) -> None:
    state = dict(source_model().state_dict())
    state["blocks.2.norm1.weight"] = torch.ones(32)
    path = tmp_path / "extra.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(PetlbenchError, match=r"not in model: blocks\.2\.norm1\.weight"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)


class Payload:
    """Any non-tensor object: torch.load(weights_only=True) must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Payload()}, fh)
    with pytest.raises(PetlbenchError, match="never unpickles"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)
    path2 = tmp_path / "evil2.pth"
    torch.save({"model": source_model().state_dict(), "extra": Payload()}, path2)
    with pytest.raises(PetlbenchError, match="never unpickles"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=path2, backbone_kwargs=KW)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_truncated_files_are_reported(tmp_path, suffix: str) -> None:
    src = source_model()
    full = tmp_path / f"full{suffix}"
    if suffix == ".safetensors":
        save_backbone(src, full)
    elif suffix == ".pth":
        torch.save(src.state_dict(), full)
    else:
        write_google_npz(src, full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(PetlbenchError, match="cut"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=cut, backbone_kwargs=KW)


def test_missing_file_and_unknown_tag(tmp_path) -> None:
    with pytest.raises(PetlbenchError, match="does not exist"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=tmp_path / "nope.npz", backbone_kwargs=KW)
    with pytest.raises(PetlbenchError, match="not in the local Hugging Face cache"):
        petlbench.create_model("vit_base_patch16_224", "arc", 3, pretrained="vit_base_patch16_224.orig_in21k",
                               device=None)
    with pytest.raises(PetlbenchError, match="neither a file nor a timm pretrained tag"):
        petlbench.create_model(ARCH, "arc", 3, pretrained="weights-i-forgot", backbone_kwargs=KW)


def test_timm_tag_from_local_cache(tmp_path, monkeypatch) -> None:
    """A tag resolves to the cached file and goes through the same verified loader."""
    src = source_model()
    cached = save_backbone(src, tmp_path / "model.safetensors")
    import huggingface_hub

    seen = []

    def fake_cache(repo_id: str, filename: str, **_):
        seen.append((repo_id, filename))
        return str(cached) if filename == "model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache)
    model = petlbench.create_model(ARCH, "ssf", 3, pretrained="vit_tiny_patch16_224.augreg_in21k", backbone_kwargs=KW)
    assert seen[0] == ("timm/vit_tiny_patch16_224.augreg_in21k", "model.safetensors")
    assert model.weights.source == "timm:vit_tiny_patch16_224.augreg_in21k"
    assert_body_equal(model, src)
