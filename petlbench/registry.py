"""The method registry: entry points (group ``petlbench.methods``) plus in-process registration.

Entry points are read lazily and a plugin module is imported only when its method is used, so a
broken third-party plugin cannot break ``petlbench`` for everything else.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from importlib.metadata import (
    EntryPoint,
    PackageNotFoundError,
    distribution,
    entry_points,
    packages_distributions,
)
from typing import Any

from petlbench.errors import PetlbenchError, did_you_mean
from petlbench.method import Method

GROUP = "petlbench.methods"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_registered: dict[str, type[Method]] = {}
_dist_of: dict[str, tuple[str, str]] = {}  # method name -> (distribution, version) of its entry point
_entry_points: dict[str, list[EntryPoint]] | None = None


def _eps() -> dict[str, list[EntryPoint]]:
    global _entry_points
    if _entry_points is None:
        found: dict[str, list[EntryPoint]] = {}
        for ep in entry_points(group=GROUP):
            if ep.value not in [e.value for e in found.get(ep.name, [])]:
                found.setdefault(ep.name, []).append(ep)
        _entry_points = found
    return _entry_points


def register_method(cls: type[Method] | None = None, *, override: bool = False):
    """Register a :class:`Method` subclass under its ``name`` (usable as a decorator)."""

    def add(method_cls: type[Method]) -> type[Method]:
        if not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
            raise TypeError(f"{method_cls!r} is not a petlbench.Method subclass")
        name = method_cls.name
        if not _NAME.match(name or ""):
            raise ValueError(f"method name {name!r} must match {_NAME.pattern}")
        taken = name in _registered or name in _eps()
        if taken and not override and _registered.get(name) is not method_cls:
            raise ValueError(f"method {name!r} is already registered; pass override=True to replace it")
        _registered[name] = method_cls
        return method_cls

    return add(cls) if cls is not None else add


def unregister_method(name: str) -> None:
    """Remove an in-process registration (tests, notebooks)."""
    _registered.pop(name, None)


def list_methods() -> list[str]:
    return sorted(set(_registered) | set(_eps()))


def get_method(name: str) -> type[Method]:
    """The Method class registered as ``name``; unknown names get a "did you mean"."""
    if name in _registered:
        return _registered[name]
    eps = _eps().get(name)
    if not eps:
        raise PetlbenchError(did_you_mean(name, list_methods(), "method") + " Fix: pass one of these to --method.")
    if len(eps) > 1:
        raise PetlbenchError(
            f"method {name!r} is registered by several plugins ({', '.join(e.value for e in eps)}). "
            "Fix: uninstall one of them."
        )
    ep = eps[0]
    try:
        cls = ep.load()
    except Exception as exc:  # a plugin's import error is the plugin's problem, reported in one line
        cause = (str(exc).splitlines() or [""])[0]
        raise PetlbenchError(
            f"method {name!r}: could not import plugin {ep.value!r} ({type(exc).__name__}: {cause}). "
            "Fix: reinstall or repair the package that provides it."
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise PetlbenchError(f"method {name!r}: entry point {ep.value!r} is not a petlbench.Method subclass.")
    if cls.name != name:
        raise PetlbenchError(
            f"method {name!r}: entry point {ep.value!r} loads a class named {cls.name!r}. "
            "Fix: make the entry-point name equal the class's `name`."
        )
    _registered[name] = cls
    dist = getattr(ep, "dist", None)
    if dist is not None and dist.metadata is not None and dist.metadata.get("Name"):
        _dist_of[name] = (str(dist.metadata["Name"]), str(dist.version))
    return cls


def _source_sha256(cls: type[Method]) -> str | None:
    """SHA-256 of the source file that defines ``cls`` (None when it has no readable file)."""
    try:
        path = inspect.getsourcefile(cls)
        if path is None:
            return None
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except (OSError, TypeError):
        return None


def method_code(name: str) -> dict[str, Any]:
    """Which code implements method ``name``: part of every run's identity, so that a plugin
    re-run after a version bump is a new run, not "already done".

    ``{"distribution", "version"}`` of the installed package that provides it (built-ins:
    ``petlbench`` and its version); a method registered in-process from a script or notebook
    has no version, so its module and the SHA-256 of its source file stand in.
    """
    cls = get_method(name)
    found = _dist_of.get(name)
    if found is None:
        top = cls.__module__.split(".")[0]
        for dist_name in packages_distributions().get(top, []):
            try:
                found = (dist_name, distribution(dist_name).version)
                break
            except PackageNotFoundError:
                continue
    if found is not None:
        return {"distribution": found[0], "version": found[1]}
    return {"distribution": None, "version": None, "module": cls.__module__, "source_sha256": _source_sha256(cls)}


def method_provenance(name: str) -> dict[str, Any]:
    """:func:`method_code` plus the class, its file's SHA-256 and (when known) the display name,
    recorded with every run; the file hash tells an edited-but-not-bumped plugin apart."""
    cls = get_method(name)
    return {**method_code(name), "class": f"{cls.__module__}.{cls.__qualname__}",
            "source_sha256": _source_sha256(cls), "display_name": cls.display_name or name}
