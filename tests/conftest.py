"""Shared fixtures: tiny timm backbones (random init) so the suite runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the test suite may download

import pytest
import torch

TINY_VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
TINY_SWIN = (
    "swin_tiny_patch4_window7_224",
    {"img_size": 32, "patch_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4},
)
#: Distilled DeiT: class + distillation token, two heads averaged.
TINY_DEIT_DISTILLED = ("deit_tiny_distilled_patch16_224",
                       {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
#: EVA-02 as Base/Large are built (split q/k/v with q/v biases, SwiGLU with its inner norm, RoPE,
#: average pool + fc_norm), with LayerScale switched on so its role is exercised too. The head is
#: drawn as the runner draws it (std 0.02; timm's EVA default scales it by 0.001, which leaves a
#: random tiny model's body gradients below what one fp32 step can move).
TINY_EVA = ("eva02_base_patch14_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                       "ref_feat_shape": (4, 4), "init_values": 0.1, "head_init_scale": 1.0})
#: ConvNeXt with linear MLPs (as ConvNeXt-T/S/B/L are built), LayerScale, four one-block stages.
TINY_CONVNEXT = ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 8, 16, 16), "conv_mlp": False,
                                   "ls_init_value": 0.5})
BACKBONES = {"vit": TINY_VIT, "swin": TINY_SWIN, "deit_distilled": TINY_DEIT_DISTILLED, "eva": TINY_EVA,
             "convnext": TINY_CONVNEXT}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def images() -> torch.Tensor:
    """A small batch built from a real photograph (skimage's astronaut), resized to 32x32."""
    from skimage import data

    img = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1).float() / 255.0
    crops = [img[:, 0:256, 0:256], img[:, 100:356, 150:406], img[:, 256:512, 256:512]]
    batch = torch.stack([torch.nn.functional.interpolate(c[None], size=(32, 32), mode="bilinear")[0] for c in crops])
    return (batch - 0.5) / 0.5


@pytest.fixture(scope="module")
def demo_cache():
    """``PETLBENCH_CACHE`` at one cache per test process (the demo data are built once)."""
    from tests.shared_cache import demo_cache_env

    with demo_cache_env() as cache:
        yield cache
