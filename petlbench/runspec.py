"""The run spec: everything that defines one run, and the stable id derived from it.

Data flows one way: suite + method + backbone -> :class:`RunSpec` -> engine -> run record. A
spec is plain data (JSON-serialisable), so it crosses process and Slurm boundaries unchanged,
and its :meth:`RunSpec.run_id` names the record file: re-running a sweep skips every spec whose
record already says ``ok``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class RunSpec:
    """One (suite, task, method, resolved configuration, seed)."""

    suite: str
    task: str
    method: str
    seed: int
    protocol: str
    backbone: str
    method_hparams: dict[str, Any]
    train: dict[str, Any]
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    weights_sha256: str | None = None
    data_root: str | None = None
    output: str = "results"
    #: Which code implements the method (:func:`petlbench.registry.method_code`): a plugin's
    #: distribution and version, so a version bump makes a new run instead of "already done".
    method_code: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same experiment (paths and output folder excluded)."""
        return {
            "suite": self.suite,
            "task": self.task,
            "method": self.method,
            "seed": self.seed,
            "protocol": self.protocol,
            "backbone": self.backbone,
            "backbone_kwargs": self.backbone_kwargs,
            "weights_sha256": self.weights_sha256,
            "method_hparams": self.method_hparams,
            "train": self.train,
            "method_code": self.method_code,
        }

    @property
    def run_id(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()[:16]

    @property
    def record_path(self) -> Path:
        return Path(self.output) / self.suite / self.task / self.method / f"{self.run_id}.json"

    @property
    def label(self) -> str:
        return f"{self.suite}/{self.task}/{self.method}/seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        return cls(**data)
