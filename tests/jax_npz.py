"""Write a timm ViT in the layout of Google's original ``ViT-B_16.npz`` (in21k), for tests.

The inverse of the published JAX -> PyTorch mapping, so the real .npz loading path is exercised
without the 394 MB file. Includes the 21843-way ``head`` and ``pre_logits`` arrays the original
checkpoint carries, which loading must ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


def write_google_npz(model: nn.Module, path: Path, drop: tuple[str, ...] = (), in21k_head: bool = True) -> Path:
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    w: dict[str, np.ndarray] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i, blk in enumerate(model.blocks):
        heads = blk.attn.num_heads
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            rows = qkv_w[j * dim:(j + 1) * dim]  # (out, in)
            w[mha + f"{name}/kernel"] = rows.T.reshape(dim, heads, dim // heads)
            w[mha + f"{name}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, dim // heads)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    if in21k_head:
        w["pre_logits/kernel"] = np.zeros((dim, dim), np.float32)
        w["pre_logits/bias"] = np.zeros((dim,), np.float32)
        w["head/kernel"] = np.zeros((dim, 21843), np.float32)
        w["head/bias"] = np.zeros((21843,), np.float32)
    for key in drop:
        w.pop(key)
    np.savez(path, **w)
    return path
