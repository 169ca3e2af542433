"""The method plugin API.

A PETL method is a subclass of :class:`Method` in one file. It declares its name, its
hyperparameters (:class:`HParam`), optional per-suite/per-task presets, the training recipe of its
official script (``recipes``, used by the paper protocols only), the backbone families it
supports and whether it merges; it implements :meth:`Method.apply` (add modules to ``petl`` and
attach hooks through the :class:`~petlbench.backbone.Backbone` roles), optionally
:meth:`Method.trainable` and, for linear methods, :meth:`Method.merge`.

Methods that choose what trains from the task's data (SPT, GPS) set ``needs_calibration`` and
implement :meth:`Method.calibrate`; the runner calls it after ``apply`` and before the optimiser
is built, with the training loader. Its results live as buffers (and parameters) in ``petl``, so
they are saved, loaded and counted with the trainable state.

Methods register through the entry-point group ``petlbench.methods`` (built-ins do too) or, in
a script or notebook, with :func:`petlbench.register_method`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from petlbench.backbone import FAMILY_SUMMARY, Backbone
from petlbench.errors import NotMergeableError, PetlbenchError, did_you_mean

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}
_TYPE_WORDS = {bool: "true or false", int: "an int", float: "a number", str: "a string"}


@dataclass(frozen=True)
class HParam:
    """A declared hyperparameter. The type is the default's type (bool, int, float or str).

    ``low``/``high`` bound numbers (inclusive unless ``low_exclusive``); ``choices`` lists the
    allowed values. Strings from the command line (``--set rank=8``) are coerced.
    """

    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False

    @property
    def type(self) -> type:
        return type(self.default)

    def coerce(self, method: str, name: str, value: Any, where: str | None = None) -> Any:
        """Return ``value`` as this parameter's type, or raise a one-line PetlbenchError.

        ``where`` names the value in that message (default: method ``method``'s hyperparameter)."""
        where = where or f"method {method!r}: hyperparameter {name!r}"
        kind = self.type
        try:
            if kind is bool:
                if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                    value = value.strip().lower() in _TRUE
                elif not isinstance(value, bool):
                    raise ValueError
            elif kind is int:
                if isinstance(value, bool):
                    raise ValueError
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                value = int(value, 10) if isinstance(value, str) else value
                if not isinstance(value, int):
                    raise ValueError
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            elif kind is str:
                if not isinstance(value, str):
                    raise ValueError
        except (TypeError, ValueError):
            raise PetlbenchError(
                f"{where} must be {_TYPE_WORDS.get(kind, kind.__name__)}, got {value!r}. "
                f"Fix: e.g. --set {name}={self.default}"
            ) from None
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise PetlbenchError(f"{where} must be one of {allowed}, got {value!r}.")
        if self.low is not None and (value < self.low or (self.low_exclusive and value == self.low)):
            op = ">" if self.low_exclusive else ">="
            raise PetlbenchError(f"{where} must be {op} {self.low}, got {value!r}. Fix: e.g. --set {name}={self.default}")
        if self.high is not None and value > self.high:
            raise PetlbenchError(f"{where} must be <= {self.high}, got {value!r}. Fix: e.g. --set {name}={self.default}")
        return value


def canonical_task(suite: str, task: str | None) -> tuple[str, str | None]:
    """(suite, task) by their canonical names when ``suite`` is a known suite, so presets keyed by
    canonical names apply to aliases too; an unknown task of a known suite is a one-line error.
    Unknown suites (a plugin's own presets) pass through unchanged."""
    from petlbench.data import get_suite

    try:
        found = get_suite(suite)
    except PetlbenchError:
        return suite, task
    if task is None:
        return found.name, None
    try:
        return found.name, found.resolve_task(task).name
    except PetlbenchError as exc:
        raise PetlbenchError(f"presets for suite {found.name!r}: {exc}") from None


class Method:
    """Base class of every PETL method (built-in or plugin).

    Class attributes a subclass sets:

    - ``name``: registry name (``[a-z0-9_]+``).
    - ``display_name``: how tables and plots name the method ("LoRA", "RepAdapter"); default:
      the registry name (a subclass that sets another ``name`` does not inherit its parent's).
    - ``summary`` and ``paper``: one line each, shown by ``petlbench list methods``.
    - ``hparams``: ``{name: HParam}``; the method reads resolved values from ``self.hp``.
    - ``presets``: ``{suite: {task or "*": {hparam: value}}}`` for values the paper publishes
      per suite/task; applied under user overrides. Override :meth:`preset` when a preset depends
      on another hyperparameter.
    - ``recipes``: ``{suite: {task or "*": {training setting: value}}}``, the training recipe of
      the official script behind the published numbers (optimiser, lr, parameter groups, schedule
      stepping, augmentation, selection, ...; keys of :data:`petlbench.config.TRAIN_HPARAMS`, plus
      the recipe-only ``published_runs``: how many runs the published number averages). Applied
      only under ``--protocol paper`` / ``paper-best-test``: the harmonised protocols train every
      method with one recipe, so a comparison measures the methods, not their recipes. Override
      :meth:`recipe` when a value depends on something else.
    - ``recipe_source``: ``{suite: "owner/repo: script(s) read, what they set"}``, shown by
      ``petlbench run --dry-run`` and recorded with every paper-protocol run.
    - ``recipe_differences``: ``{suite: "items of the official recipe petlbench deliberately does not
      reproduce, and why"}``, shown and recorded likewise.
    - ``train_presets``: the old name of ``recipes``. A plugin that still declares it gets it read
      as its paper recipe (``--dry-run`` says so); new code declares ``recipes``.
    - :meth:`no_weight_decay` (a method, not an attribute): the parameters the official optimiser
      exempts from weight decay, used when the recipe says ``decay_groups: method`` (or
      ``no_1d+method``); the default exempts nothing.
    - ``families``: backbone families the method runs on (``petlbench.backbone.FAMILIES``: ``"vit"``,
      ``"deit_distilled"``, ``"eva"``, ``"swin"``, ``"convnext"``); on any other the run is refused
      when it is planned, before data or training.
    - ``family_refusals``: ``{family: why}``, one line for each family the method does not run on,
      shown in that refusal (and by ``petlbench backbone describe``).
    - ``mergeable``: True when :meth:`merge` folds the method into the plain backbone exactly.
      A mergeable method that cannot fold into a particular backbone sets ``self.mergeable =
      False`` and ``self.unmerged_reason`` (one line) in :meth:`check_backbone` or :meth:`apply`:
      the run is then evaluated and deployed unmerged, and counts say so (never a failure after
      training, never a merged model that differs from the trained one).
    - ``frozen_features``: True when only the head trains and the backbone's features never
      change (linear probing), so the engine may extract features once and train on them.
    - ``needs_calibration``: True when :meth:`calibrate` must run on the task's training data
      before training (gradient-based selection of what trains).
    - ``bounded_by_width``: names of integer hyperparameters (a rank, a bottleneck) that must not
      exceed the narrowest block width of the backbone; checked before ``apply``.
    - ``published``: ``{suite: method name in the reference CSV}``, the published rows this method
      reproduces (``petlbench report --reference paper --delta``); override :meth:`published_as`
      when the row depends on hyperparameters.
    - ``pooling``: None when the classifier sees the backbone's own pooled features
      (:attr:`Backbone.pooling`); otherwise a short name of the pooling the method installs
      (DTL on ViT: ``"mean_patch_tokens_then_norm"``); ``apply`` may set it on the instance when it
      depends on the backbone. It is recorded with every run, because pooling is a protocol
      variable that changes accuracy.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    hparams: ClassVar[Mapping[str, HParam]] = {}
    presets: ClassVar[Mapping[str, Mapping[str, Mapping[str, Any]]]] = {}
    recipes: ClassVar[Mapping[str, Mapping[str, Mapping[str, Any]]]] = {}
    recipe_source: ClassVar[Mapping[str, str]] = {}
    recipe_differences: ClassVar[Mapping[str, str]] = {}
    train_presets: ClassVar[Mapping[str, Mapping[str, Mapping[str, Any]]]] = {}  # old name of ``recipes``
    families: ClassVar[frozenset[str]] = frozenset({"vit", "swin"})
    family_refusals: ClassVar[Mapping[str, str]] = {}
    mergeable: bool = False  # a class attribute; an instance may turn it off for one backbone (unmerged_reason)
    unmerged_reason: str | None = None
    frozen_features: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    published: ClassVar[Mapping[str, str]] = {}
    bounded_by_width: ClassVar[frozenset[str]] = frozenset()
    pooling: str | None = None  # a class attribute; apply() may set it when it depends on the backbone

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Default ``display_name``: the class's own registry name, never a parent's display name."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("display_name")
        if not own and ("name" in cls.__dict__ or not cls.display_name):
            cls.display_name = cls.name

    def __init__(self, **hparams: Any) -> None:
        self.config: dict[str, Any] = self.validate(hparams, complete=True)
        self.hp = types.SimpleNamespace(**self.config)

    # ------------------------------------------------------------ hyperparameters
    @classmethod
    def validate(cls, values: Mapping[str, Any], complete: bool = False) -> dict[str, Any]:
        """Check names and coerce values; with ``complete`` fill in the defaults."""
        unknown = [k for k in values if k not in cls.hparams]
        if unknown:
            raise PetlbenchError(did_you_mean(unknown[0], cls.hparams, f"hyperparameter of method {cls.name!r}:",
                                              label="Known"))
        out = {k: h.default for k, h in cls.hparams.items()} if complete else {}
        out.update({k: cls.hparams[k].coerce(cls.name, k, v) for k, v in values.items()})
        return out

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: Mapping[str, Any]) -> dict[str, Any]:
        """Published values for ``suite``/``task`` (``"*"`` is the suite-wide entry).

        ``current`` holds defaults merged with user overrides, for presets that depend on
        another hyperparameter (e.g. RepAdapter's scale depends on its variant).
        """
        if suite is None:
            return {}
        table = cls.presets.get(suite, {})
        out = dict(table.get("*", {}))
        if task is not None:
            out.update(table.get(task, {}))
        return out

    @classmethod
    def resolve(
        cls, overrides: Mapping[str, Any] | None = None, suite: str | None = None, task: str | None = None
    ) -> dict[str, Any]:
        """defaults < suite/task presets < user overrides, validated."""
        if suite is not None:
            suite, task = canonical_task(suite, task)
        user = cls.validate(overrides or {})
        current = {**{k: h.default for k, h in cls.hparams.items()}, **user}
        preset = cls.validate(cls.preset(suite, task, current))
        return {**current, **{k: v for k, v in preset.items() if k not in user}}

    @classmethod
    def recipe_origin(cls, suite: str) -> str | None:
        """Which attribute declares the paper recipe for ``suite``: ``"recipes"``, ``"train_presets"``
        (the old name, still read for plugins written before ``recipes`` existed) or None."""
        if suite in cls.recipes:
            return "recipes"
        if suite in cls.train_presets:
            return "train_presets"
        return None

    @classmethod
    def recipe(cls, suite: str, task: str | None) -> dict[str, Any]:
        """The official training recipe for ``suite``/``task`` (canonical names): the suite-wide
        ``"*"`` entry updated by the task's, from ``recipes`` (or, for an older plugin, from
        ``train_presets``). Empty when the method declares none for ``suite``; then the paper
        protocols train it with the harmonised settings. Values are checked by the caller."""
        origin = cls.recipe_origin(suite)
        if origin is None:
            return {}
        table = getattr(cls, origin)[suite]
        out = dict(table.get("*", {}))
        if task is not None:
            out.update(table.get(task, {}))
        return out

    # ------------------------------------------------------------------ behaviour
    @classmethod
    def refusal(cls, family: str) -> str | None:
        """Why this method does not run on ``family`` (one line), or None when it does."""
        if family in cls.families:
            return None
        return cls.family_refusals.get(family) or (
            f"its placement is written against the roles of {', '.join(sorted(cls.families))} backbones, and a "
            f"{family} backbone differs from those ({FAMILY_SUMMARY.get(family, family)})")

    def check_backbone(self, backbone: Backbone) -> None:
        """Raise a PetlbenchError when this method is not defined on ``backbone``."""
        why = self.refusal(backbone.family)
        if why is not None:
            raise PetlbenchError(
                f"method {self.name!r} is not defined on {backbone.family} backbones ({backbone.arch}): {why}. It runs "
                f"on {', '.join(sorted(self.families))}. Fix: choose another --backbone or method."
            )
        narrowest = min((b.dim for b in backbone.blocks), default=None)
        for key in sorted(self.bounded_by_width):
            value = self.config[key]
            if narrowest is not None and value > narrowest:
                raise PetlbenchError(
                    f"method {self.name!r}: hyperparameter {key!r}={value} is larger than the width of "
                    f"{backbone.arch or backbone.family} ({narrowest}), so it adds no capacity. "
                    f"Fix: --set {key}=<a value <= {narrowest}>"
                )

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Add the method's modules to ``petl`` and attach them to ``backbone`` through hooks."""

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        """Parameters that train: by default the method's own modules plus the classifier head."""
        yield from petl.parameters()
        yield from backbone.head_parameters()

    def calibrate(self, backbone: Backbone, petl: nn.ModuleDict, loader: Iterable, device: torch.device) -> None:
        """Decide what trains from the task's training data (only when ``needs_calibration``).

        Called once per trained model, after :meth:`apply` and before the optimiser is built, with
        the run's training loader (batches ``(images, labels)`` already on ``device``) and the model
        on ``device``. Store every result as a buffer (a mask, chosen indices) or as new modules in
        ``petl``; add hooks through ``backbone`` as in ``apply``. Afterwards the model is frozen
        again from :meth:`trainable`, so parameters created here train if ``trainable`` yields them.
        Buffers of ``petl`` are saved with the trainable state; see :meth:`restore_calibration`.
        """

    def restore_calibration(self, backbone: Backbone, petl: nn.ModuleDict, buffers: Mapping[str, torch.Tensor]) -> None:
        """Rebuild a calibrated model from saved buffers (``{name in petl: tensor}``), without data.

        Called when a saved trainable state is loaded into a model that was not calibrated. The
        default copies each tensor into the existing buffer of that name (enough when ``apply``
        creates the buffers and ``calibrate`` only fills them); override it when ``calibrate``
        creates modules whose shapes depend on its results.
        """
        current = dict(petl.named_buffers())
        for key, value in buffers.items():
            if key not in current or tuple(current[key].shape) != tuple(value.shape):
                raise PetlbenchError(
                    f"method {self.name!r}: saved calibration buffer {key!r} {tuple(value.shape)} has no buffer of that "
                    "shape to go into. Fix: load it into a model built with the same method, hyperparameters and "
                    "backbone."
                )
            with torch.no_grad():
                current[key].copy_(value)

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        """Parameters the official optimiser exempts from weight decay, read when the training setting
        ``decay_groups`` is ``"method"`` or ``"no_1d+method"`` (e.g. SSF's scales and shifts, DTL's
        head bias). Default: none. Yield the parameter objects themselves (from ``petl`` or
        ``backbone``), never names: the engine builds its optimiser groups by identity."""
        return ()

    def trainable_count(self, backbone: Backbone, petl: nn.ModuleDict) -> int | None:
        """Scalars that really train, head excluded, when that is not every scalar of the parameters
        :meth:`trainable` yields (e.g. a sparse gradient mask: the number of True entries).
        ``None`` (the default) counts the trainable parameters' elements."""
        return None

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """The reference-CSV method name of the published rows this configuration reproduces on
        ``suite`` (``"vtab"``, ``"fgvc"``, ...), or None. ``config`` holds resolved hyperparameters;
        the default looks ``suite`` up in :attr:`published` whatever the configuration."""
        return cls.published.get(suite)

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        """Fold ``petl`` into the backbone's existing weights (hooks are removed by the caller)."""
        raise NotMergeableError(
            f"method {self.name!r} is not linear in the backbone's weights and cannot be merged; deploy the unmerged "
            "model (its extra parameters and compute stay at inference)."
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"
