"""Parameter accounting from the module tree (never from parameter-name substrings).

Papers disagree on what they count (head or not, biases or not, averaged over tasks or not), so
every number is reported separately and labelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ParamCounts:
    """All counts are numbers of scalars.

    - ``trainable``: parameters updated during training (head included). A method whose
      gradient is masked (GPS, SPT's sparse part) reports its honest count through
      :meth:`~petlbench.method.Method.trainable_count`; masks are buffers, never counted.
    - ``head``: the classifier head (``feature_dim * C + C``).
    - ``trainable_without_head``: what most PETL papers report as the method's parameters.
    - ``extra_after_merge``: parameters the deployed model has beyond the plain backbone (0 for
      methods that merge).
    - ``backbone``: the backbone without its head (85,798,656 for ViT-B/16).
    - ``total``: everything in the unmerged model.
    - ``trainable_bytes``: bytes of the per-task state as saved (the trainable tensors in their
      dtype, plus the method's calibration buffers and the running statistics of a ``head_norm``).
    """

    trainable: int
    head: int
    trainable_without_head: int
    extra_after_merge: int
    backbone: int
    total: int
    trainable_bytes: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _unique(params) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def count_params(model) -> ParamCounts:
    """Count a :class:`~petlbench.model.PETLModel`."""
    bb = model.backbone
    head = _unique(bb.head_parameters())
    head_ids = {id(p) for p in head}
    everything = _unique(model.parameters())
    trainable = [p for p in everything if p.requires_grad]
    added = _unique(model.petl.parameters())
    head_count = sum(p.numel() for p in head)
    without_head = model.method.trainable_count(bb, model.petl)
    if without_head is None:
        without_head = sum(p.numel() for p in trainable if id(p) not in head_ids)
    buffers = list(model.calibration_buffers().values()) if hasattr(model, "calibration_buffers") else []
    buffers += list(model.head_norm_state().values()) if hasattr(model, "head_norm_state") else []
    return ParamCounts(
        trainable=without_head + sum(p.numel() for p in head if p.requires_grad),
        head=head_count,
        trainable_without_head=without_head,
        extra_after_merge=0 if model.method.mergeable else sum(p.numel() for p in added),
        backbone=sum(p.numel() for p in _unique(bb.body_parameters())),
        total=sum(p.numel() for p in everything),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable)
        + sum(b.numel() * b.element_size() for b in buffers),
    )
