"""A third-party petlbench method with a calibration step (GPS-style selection, in one file).

Each block's MLP output gets a learnable shift, but only on the ``k`` channels whose shift had the
largest accumulated |gradient| on the task's training data; the chosen channels are a buffer, so
they are saved with the trainable state, and the honest count is the number of chosen channels.
"""

import torch
from torch import nn

from petlbench import Backbone, HParam, Method


class MaskedShift(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))
        self.register_buffer("mask", torch.zeros(width, dtype=torch.bool))  # chosen by calibrate()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + (self.shift * self.mask).to(y.dtype)  # unchosen channels get no gradient


class GradShift(Method):
    name = "gradshift"
    display_name = "GradShift"
    summary = "Shift on the k MLP-output channels per block with the largest gradient on the task."
    paper = "example plugin (selection in the spirit of GPS, Zhang et al., CVPR 2024)"
    mergeable = True
    needs_calibration = True
    published = {}  # {"vtab": "<method column of the reference CSV>"} when published rows exist
    bounded_by_width = frozenset({"k"})  # k > the block width is refused with one clear line
    hparams = {
        "k": HParam(4, "channels per block that train", low=1),
        "batches": HParam(2, "training batches the calibration reads", low=1),
    }

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        petl["shifts"] = nn.ModuleList(MaskedShift(blk.dim) for blk in backbone.blocks)
        for blk, shift in zip(backbone.blocks, petl["shifts"], strict=True):
            backbone.transform_output(blk.mlp, shift)

    def calibrate(self, backbone: Backbone, petl: nn.ModuleDict, loader, device: torch.device) -> None:
        shifts = list(petl["shifts"])
        for s in shifts:
            s.mask.fill_(True)  # open every channel while measuring
            s.shift.requires_grad_(True)
        score = [torch.zeros_like(s.shift) for s in shifts]
        for i, (x, y) in enumerate(loader):
            if i == self.hp.batches:
                break
            loss = nn.functional.cross_entropy(backbone.model(x), y)
            grads = torch.autograd.grad(loss, [s.shift for s in shifts])
            for acc, g in zip(score, grads, strict=True):
                acc += g.abs()
        for s, acc in zip(shifts, score, strict=True):
            s.mask.zero_()
            s.mask[acc.topk(self.hp.k).indices] = True

    def trainable_count(self, backbone: Backbone, petl: nn.ModuleDict) -> int:
        return int(sum(s.mask.sum() for s in petl["shifts"]))

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for blk, s in zip(backbone.blocks, petl["shifts"], strict=True):
            blk.fc2.bias += s.shift * s.mask
