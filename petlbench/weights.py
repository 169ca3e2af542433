"""Loading backbone weights from local files, safely and verifiably.

Sources: the original Google ``.npz`` (e.g. ``ViT-B_16.npz``), timm/PyTorch ``.pth``/``.pt``/``.bin``
(read with ``torch.load(weights_only=True)``: never arbitrary unpickling), ``.safetensors``, or a
timm pretrained tag that is already in the local Hugging Face cache (nothing is downloaded).

timm only logs missing keys at INFO level; here every backbone tensor must come from the file
or loading fails naming the tensors. The head is always re-initialised for the new task. The
SHA-256 of the file is returned so results can say exactly which weights they used.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlbench.backbone import Backbone
from petlbench.errors import PetlbenchError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUFFIXES = (".npz", ".safetensors", *TORCH_SUFFIXES)
_NESTED_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "params")
#: Checkpoint tensors that are never part of the backbone body: a classifier for another task
#: (the model's own head modules are found by role, see :func:`_head_prefixes`), a removed
#: pre-logits layer, and buffers timm recomputes.
_IGNORED_KEYS = re.compile(r"^(head\.|head_dist\.|pre_logits\.)|(relative_position_index|attn_mask)$")
_RECOMPUTED_KEYS = re.compile(r"(relative_position_index|attn_mask)$")
#: Options timm passes to a module's filter when it builds that module's models with weights
#: (``deit._create_deit``: DeiT-III's original ``gamma_1``/``gamma_2`` become ``ls1``/``ls2``).
_FILTER_OPTIONS = {"timm.models.deit": {"adapt_layer_scale": True}}
#: Key prefixes of a Hugging Face *transformers* checkpoint (not timm's layout; refused with a hint).
_TRANSFORMERS_KEYS = re.compile(r"^(embeddings\.|encoder\.layer\.|vision_model\.|dinov2\.|vit\.)")


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a model was built from (stored in every result)."""

    source: str
    format: str
    sha256: str
    tensors: int
    head: str = "reinitialised"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fix_hint() -> str:
    return f"Fix: pass a local checkpoint ({', '.join(SUFFIXES)}) that matches --backbone, or omit it for random init."


def resolve_source(pretrained: str | os.PathLike | bool, arch: str) -> tuple[Path, str]:
    """Turn ``pretrained`` into (local file, description): a path, or a timm tag found in the cache."""
    if pretrained is True:
        name = arch
    else:
        name = os.fspath(pretrained)
        path = Path(name).expanduser()
        if path.is_file():
            return path, str(path)
        if path.suffix in SUFFIXES or os.sep in name or path.exists():
            why = "is a directory" if path.is_dir() else "does not exist"
            raise PetlbenchError(f"weights file {name} {why}. {_fix_hint()}")
    return _from_timm_cache(name), f"timm:{name}"


def _from_timm_cache(name: str) -> Path:
    import timm
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(name)  # "arch.tag", or "arch" for its default tag
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise PetlbenchError(
            f"--pretrained {name!r} is neither a file nor a timm pretrained tag (e.g. vit_base_patch16_224.orig_in21k). "
            + _fix_hint()
        )
    repo = cfg.hf_hub_id.split("@")[0]
    for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
        found = try_to_load_from_cache(repo_id=repo, filename=filename)
        if isinstance(found, str):
            return Path(found)
    raise PetlbenchError(
        f"timm weights {name!r} ({repo}) are not in the local Hugging Face cache and petlbench never downloads. "
        "Fix: download them once on a machine with internet (or pass a local file with --pretrained)."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor-only state dict from a .safetensors or torch file, refusing pickled objects."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise PetlbenchError(f"weights file {path} is not a readable safetensors file ({exc}); it may be truncated. "
                                 + _fix_hint()) from None
    try:
        if path.stat().st_size == 0:
            raise PetlbenchError(f"weights file {path} is empty (0 bytes; an interrupted download?). "
                                 + _fix_hint())
    except OSError as exc:
        raise PetlbenchError(f"weights file {path} cannot be read ({exc.strerror or exc}). {_fix_hint()}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PetlbenchError(
            f"weights file {path} contains pickled Python objects, not just tensors; petlbench never unpickles "
            "arbitrary code. Fix: re-save it as a state_dict of tensors (torch.save(model.state_dict(), ...)) "
            "or as .safetensors."
        ) from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes raise EOFError, IndexError, KeyError, struct.error...
        detail = type(exc).__name__ + (f": {str(exc).splitlines()[0]}" if str(exc).strip() else "")
        raise PetlbenchError(f"weights file {path} cannot be read ({detail}); "
                             f"it may be truncated or not a PyTorch checkpoint. {_fix_hint()}") from None
    for _ in range(3):  # unwrap {"state_dict": {...}} / {"model": {...}} containers
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        raise PetlbenchError(f"weights file {path} holds no state dict of tensors. {_fix_hint()}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key[7:] if key.startswith("module.") else key] = value
    return out


def checkpoint_filter(bb: Backbone) -> tuple[Any, dict[str, Any]]:
    """timm's own checkpoint conversion for this backbone: the ``checkpoint_filter_fn`` of the timm
    module that registers its architecture (the module whose models load those releases: DINOv2's
    and OpenAI CLIP's in ``vision_transformer``, EVA-02's in ``eva``, the original ConvNeXt's in
    ``convnext``), with the options that module passes to it; (None, {}) when there is none."""
    import importlib

    import timm

    module_name = type(bb.model).__module__
    if bb.arch and timm.models.is_model(bb.arch):
        module_name = timm.models.model_entrypoint(bb.arch).__module__
    module = importlib.import_module(module_name)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None and module_name != type(bb.model).__module__:
        fn = getattr(importlib.import_module(type(bb.model).__module__), "checkpoint_filter_fn", None)
    return fn, dict(_FILTER_OPTIONS.get(module_name, {}))


def _filter(state: dict[str, torch.Tensor], bb: Backbone) -> dict[str, torch.Tensor]:
    """Apply timm's own checkpoint conversion (original layouts, pos-embed resizing)."""
    fn, options = checkpoint_filter(bb)
    if fn is None:
        return state
    try:
        return fn(state, bb.model, **options)
    except Exception as exc:
        raise PetlbenchError(f"checkpoint does not fit backbone {bb.arch!r} ({type(exc).__name__}: {exc}). "
                             + _fix_hint()) from None


def _list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _head_prefixes(bb: Backbone) -> tuple[str, ...]:
    """State-dict prefixes of the classifier heads, by role (``head.`` for ViT, ``head.fc.`` for Swin
    and ConvNeXt, whose ``head.norm`` is the body's final norm, plus ``head_dist.`` for distilled DeiT).
    A model built without a classifier (``num_classes=0``: Identity heads) has none to exclude."""
    if not bb.has("heads"):
        return ()
    heads = {id(h) for h in bb.heads}
    return tuple(f"{name}." for name, module in bb.model.named_modules() if id(module) in heads)


@torch.no_grad()
def load_state(bb: Backbone, state: dict[str, torch.Tensor], source: Path) -> int:
    """Load ``state`` into the backbone (heads excluded); every body tensor must be covered."""
    transformers = sorted(k for k in state if _TRANSFORMERS_KEYS.match(k))
    if transformers and len(transformers) * 2 > len(state):
        raise PetlbenchError(
            f"weights file {source} is a Hugging Face transformers checkpoint ({_list(transformers, 2)}), not a timm "
            f"or original-release layout. Fix: pass the timm release of these weights (hf-hub timm/<arch>, "
            "model.safetensors) or the original .pth, for backbone " + repr(bb.arch) + "."
        )
    state = _filter(state, bb)
    own = bb.model.state_dict()
    head = _head_prefixes(bb)
    wanted = {k for k in own if not k.startswith(head) and not _RECOMPUTED_KEYS.search(k)}
    # A checkpoint's own classifier (any layout) is dropped, but never a body tensor of this model
    # that happens to live under ``head.`` (ConvNeXt's final norm, ``head.norm``).
    given = {k: v for k, v in state.items()
             if k in wanted or not (k.startswith(head) or _IGNORED_KEYS.search(k))}
    unexpected = sorted(set(given) - set(own))
    missing = sorted(wanted - set(given))
    mismatched = sorted(f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
                        for k in wanted & set(given) if given[k].shape != own[k].shape)
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch (checkpoint vs model): {_list(mismatched)}")
        if missing:
            parts.append(f"missing from checkpoint: {_list(missing)}")
        if unexpected:
            parts.append(f"not in model: {_list(unexpected)}")
        raise PetlbenchError(
            f"weights file {source} does not match backbone {bb.arch!r}: {'; '.join(parts)}. "
            "Fix: pass the checkpoint of this exact architecture (or the --backbone it was trained for)."
        )
    check_values({k: given[k] for k in sorted(wanted) if own[k].is_floating_point()}, source)
    for key in wanted:
        own[key].copy_(given[key].to(own[key].dtype))
    return len(wanted)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_values(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse backbone tensors that are not real floating-point numbers, or that hold NaN/inf.

    Casting an integer or boolean tensor to float "works" and trains on garbage under a valid
    SHA-256; fp16/bf16/fp64 checkpoints are fine (cast to the model's dtype on load).
    """
    wrong = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in tensors.items() if v.dtype not in _FLOAT_DTYPES]
    if wrong:
        raise PetlbenchError(
            f"weights file {source} stores backbone tensors as non-floating-point numbers: {_list(wrong)}. "
            "Fix: pass the original floating-point checkpoint (fp32, fp16 or bf16); these are not trained weights."
        )
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise PetlbenchError(
            f"weights file {source} has NaN or infinite values in backbone tensors: {_list(bad)}. "
            "Fix: re-download the checkpoint (its SHA-256 will differ from the published one) or re-export it."
        )


@torch.no_grad()
def load_npz(bb: Backbone, path: Path) -> int:
    """Load an original Google/JAX ViT ``.npz`` through timm's converter, then verify coverage.

    timm's converter silently loads a prefix of the blocks when depths differ and leaves tensors
    it does not know untouched, so every body tensor is first set to NaN and must be overwritten.
    """
    import numpy as np

    if bb.family != "vit":
        raise PetlbenchError(f"weights file {path} is a JAX .npz, which only ViT backbones can load. " + _fix_hint())
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            keys = list(npz.files)
            not_float = [f"{k} ({npz[k].dtype})" for k in keys if npz[k].dtype.kind != "f"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise PetlbenchError(f"weights file {path} is not a readable .npz ({exc}); it may be truncated. "
                             + _fix_hint()) from None
    if not_float:
        raise PetlbenchError(
            f"weights file {path} stores tensors as non-floating-point numbers: {_list(not_float)}. "
            "Fix: pass the original floating-point checkpoint; these are not trained weights."
        )
    blocks = {int(m.group(1)) for k in keys if (m := re.search(r"encoderblock_(\d+)/", k))}
    if blocks and len(blocks) != len(bb.blocks):
        raise PetlbenchError(
            f"weights file {path} has {len(blocks)} transformer blocks but backbone {bb.arch!r} has {len(bb.blocks)}. "
            "Fix: pass the checkpoint of this exact architecture."
        )
    head = {id(p) for p in bb.head_parameters()}
    body = [(n, p) for n, p in bb.model.named_parameters() if id(p) not in head]
    for _, p in body:
        p.fill_(float("nan"))
    try:
        bb.model.load_pretrained(str(path))
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise PetlbenchError(
            f"weights file {path} does not match backbone {bb.arch!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Fix: pass the checkpoint of this exact architecture."
        ) from None
    missing = [n for n, p in body if torch.isnan(p).any()]
    if missing:
        raise PetlbenchError(f"weights file {path} left backbone tensors unset (or NaN): {_list(missing)}. "
                             + _fix_hint())
    check_values(dict(body), path)  # infinities
    return len(body)


def load_weights(bb: Backbone, pretrained: str | os.PathLike | bool) -> WeightsInfo:
    """Load ``pretrained`` into the backbone in place and describe what was loaded."""
    path, source = resolve_source(pretrained, bb.arch)
    suffix = path.suffix.lower()
    if source.startswith("timm:") and suffix not in SUFFIXES:
        suffix = ".safetensors"
    if suffix == ".npz":
        count, fmt = load_npz(bb, path), "npz"
    elif suffix == ".safetensors" or suffix in TORCH_SUFFIXES:
        count = load_state(bb, read_state_dict(path), path)
        fmt = suffix.lstrip(".")
    else:
        raise PetlbenchError(f"weights file {path} has an unknown format {suffix or '(no suffix)'!r}. {_fix_hint()}")
    return WeightsInfo(source=source, format=fmt, sha256=sha256_file(path), tensors=count)


def save_backbone(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a timm model's weights (classifier heads excluded, by role) as .safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    head = _head_prefixes(Backbone(model))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(head)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path
