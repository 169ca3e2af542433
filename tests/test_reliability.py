"""Hostile files the user hands petlbench (issue 11): weights, YAML, run records. Each ends in one
clear line (or a skipped record), never a traceback, never garbage loaded silently."""

from __future__ import annotations

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import petlbench
from petlbench import PetlbenchError
from petlbench.cli import main
from tests.conftest import TINY_VIT
from tests.jax_npz import write_google_npz

ARCH, KW = TINY_VIT


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {k: v.contiguous() for k, v in timm.create_model(ARCH, num_classes=10, **KW).state_dict().items()}


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ---------------------------------------------------------------------------- weights


def test_zero_byte_pth_is_one_error_line(tmp_path) -> None:
    empty = tmp_path / "vit.pth"
    empty.write_bytes(b"")
    with pytest.raises(PetlbenchError, match=r"vit\.pth is empty \(0 bytes"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=empty, backbone_kwargs=KW)
    line = _one_error_line(CliRunner().invoke(main, ["params", "-m", "linear", "-b", ARCH, "--pretrained", str(empty)]))
    assert "vit.pth" in line and "Fix:" in line


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".bin"])
def test_zero_byte_files_of_every_format_are_one_error_line(tmp_path, suffix: str) -> None:
    empty = tmp_path / f"vit{suffix}"
    empty.write_bytes(b"")
    line = _one_error_line(CliRunner().invoke(main, ["params", "-m", "linear", "-b", ARCH, "--pretrained", str(empty)]))
    assert f"vit{suffix}" in line and "Fix:" in line


def test_checkpoint_without_message_is_still_one_line(tmp_path) -> None:
    """A few bytes that torch cannot read raise an exception without a message."""
    cut = tmp_path / "cut.pth"
    cut.write_bytes(b"\x80")
    with pytest.raises(PetlbenchError, match=r"cut\.pth cannot be read \(\w+"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=cut, backbone_kwargs=KW)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("poison", ["int", "bool", "nan", "inf"])
def test_garbage_values_are_refused(tmp_path, suffix: str, poison: str) -> None:
    state = _state()
    key = "blocks.0.attn.qkv.weight"
    if poison == "int":
        state[key] = (state[key] * 100).to(torch.int32)
    elif poison == "bool":
        state[key] = state[key] > 0
    else:
        state[key] = state[key].clone()
        state[key][0, 0] = float(poison)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    needle = "NaN or infinite" if poison in ("nan", "inf") else "non-floating-point"
    with pytest.raises(PetlbenchError, match=needle) as info:
        petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)
    assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_still_load(tmp_path, dtype: torch.dtype) -> None:
    state = {k: v.to(dtype) for k, v in _state().items()}
    path = tmp_path / "half.safetensors"
    save_file(state, str(path))
    model = petlbench.create_model(ARCH, "arc", 3, pretrained=path, backbone_kwargs=KW)
    got = model.net.state_dict()["blocks.0.attn.qkv.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, state["blocks.0.attn.qkv.weight"].float())


def test_npz_with_infinite_or_integer_values_is_refused(tmp_path) -> None:
    import numpy as np

    torch.manual_seed(5)
    src = timm.create_model(ARCH, num_classes=10, **KW)
    path = write_google_npz(src, tmp_path / "ok.npz")
    arrays = dict(np.load(path))
    key = next(k for k in arrays if k.endswith("MlpBlock_3/Dense_0/kernel"))
    bad = dict(arrays)
    bad[key] = bad[key].copy()
    bad[key].flat[0] = np.inf
    np.savez(tmp_path / "inf.npz", **bad)
    with pytest.raises(PetlbenchError, match="NaN or infinite"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=tmp_path / "inf.npz", backbone_kwargs=KW)
    bad[key] = (arrays[key] * 100).astype(np.int64)
    np.savez(tmp_path / "int.npz", **bad)
    with pytest.raises(PetlbenchError, match="non-floating-point"):
        petlbench.create_model(ARCH, "arc", 3, pretrained=tmp_path / "int.npz", backbone_kwargs=KW)


# ---------------------------------------------------------------------------- YAML


LATIN1 = "epochs: 2\n# r\xe9sum\xe9 of the settings\n".encode("latin-1")


def test_config_file_not_utf8_is_one_error_line(tmp_path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(LATIN1)
    line = _one_error_line(CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "linear", "--config",
                                                     str(cfg), "--output", str(tmp_path / "out"), "--dry-run"]))
    assert str(cfg) in line and "not UTF-8" in line


@pytest.mark.parametrize("text, needle", [
    ("methods:\n  1: {rank: 4}\n", "key 1 (int)"),
    ("methods:\n  lora:\n    true: 4\n", "key True (bool)"),
    ("null: 3\n", "key None (NoneType)"),
])
def test_config_file_with_non_string_keys_is_one_error_line(tmp_path, text: str, needle: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    line = _one_error_line(CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "linear", "--config",
                                                     str(cfg), "--output", str(tmp_path / "out"), "--dry-run"]))
    assert str(cfg) in line and needle in line


def _suite_bytes() -> bytes:
    from petlbench.data.suites import get_suite

    demo = get_suite("demo")
    text = open(demo.path, encoding="utf-8").read().replace("name: demo", "name: demo_latin1", 1)
    assert "demo_latin1" in text
    return text.encode("utf-8") + "\n# caf\xe9\n".encode("latin-1")


def test_suite_file_not_utf8_is_one_error_line(tmp_path) -> None:
    suite = tmp_path / "mine.yaml"
    suite.write_bytes(_suite_bytes())
    line = _one_error_line(CliRunner().invoke(main, ["run", "--suite", str(suite), "--method", "linear",
                                                     "--output", str(tmp_path / "out"), "--dry-run"]))
    assert str(suite) in line and "not UTF-8" in line


def test_suite_on_the_search_path_not_utf8_is_one_error_line(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "mine.yaml").write_bytes(_suite_bytes())
    monkeypatch.setenv("PETLBENCH_SUITE_PATH", str(folder))
    line = _one_error_line(CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "linear",
                                                     "--output", str(tmp_path / "out"), "--dry-run"]))
    assert str(folder / "mine.yaml") in line and "not UTF-8" in line


def test_deeply_nested_yaml_is_one_error_line(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("[" * 100_000)
    line = _one_error_line(CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "linear", "--config",
                                                     str(cfg), "--output", str(tmp_path / "out"), "--dry-run"]))
    assert str(cfg) in line and "nested too deeply" in line
    folder = tmp_path / "suites"
    folder.mkdir()
    (folder / "deep.yaml").write_text("[" * 100_000)
    monkeypatch.setenv("PETLBENCH_SUITE_PATH", str(folder))
    line = _one_error_line(CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "linear",
                                                     "--output", str(tmp_path / "out"), "--dry-run"]))
    assert str(folder / "deep.yaml") in line and "nested too deeply" in line
