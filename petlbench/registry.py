"""The method registry: entry points (group ``petlbench.methods``) plus in-process registration.

Entry points are read lazily and a plugin module is imported only when its method is used, so a
broken third-party plugin cannot break ``petlbench`` for everything else.
"""

from __future__ import annotations

import re
from importlib.metadata import EntryPoint, entry_points

from petlbench.errors import PetlbenchError, did_you_mean
from petlbench.method import Method

GROUP = "petlbench.methods"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_registered: dict[str, type[Method]] = {}
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
        raise PetlbenchError(
            f"method {name!r}: could not import plugin {ep.value!r} ({type(exc).__name__}: {exc}). "
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
    return cls
