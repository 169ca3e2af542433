"""petlbench: benchmark parameter-efficient transfer learning methods on vision transformers.

Public API::

    model = petlbench.create_model("vit_base_patch16_224", "arc", num_classes=100, pretrained="ViT-B_16.npz")
    petlbench.count_params(model)       # trainable / head / extra after merge / backbone
    plain = petlbench.merge(model)      # a plain timm model, same classes, no extra parameters

Write a method: subclass :class:`petlbench.Method` (see README, "Writing a method plugin").
"""

from petlbench.accounting import ParamCounts, count_params
from petlbench.backbone import Backbone, BlockRoles
from petlbench.errors import NotMergeableError, PetlbenchError
from petlbench.method import HParam, Method
from petlbench.model import (
    PETLModel,
    calibrate,
    create_model,
    load_trainable,
    merge,
    save_trainable,
    supported_backbones,
)
from petlbench.registry import get_method, list_methods, register_method, unregister_method
from petlbench.weights import WeightsInfo

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "BlockRoles",
    "HParam",
    "Method",
    "NotMergeableError",
    "PETLModel",
    "ParamCounts",
    "PetlbenchError",
    "WeightsInfo",
    "calibrate",
    "count_params",
    "create_model",
    "get_method",
    "list_methods",
    "load_trainable",
    "merge",
    "register_method",
    "save_trainable",
    "supported_backbones",
    "unregister_method",
]
