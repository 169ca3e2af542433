"""Benchmark suites as data: YAML files define tasks, groups, class counts and split sizes.

Keeping suites in YAML (not code) means a user can add or fix a task without touching
petlbench, and every number that ends up in a result (class count, expected split size,
image size, protocol transform) is visible in one reviewable file.

Where suites come from, all merged into one registry (a suite name defined by two files is
an error that names both, so nothing is silently shadowed):

1. built-in files ``*.yaml`` in the ``petlbench_suites`` package (the repository's ``suites/``);
2. third-party packages, through the entry-point group ``petlbench.suites``. The entry point's
   value names an importable **module or package**; every ``*.yaml``/``*.yml`` file among its
   resources (``importlib.resources.files(module)``) is a suite file. For example::

       [project.entry-points."petlbench.suites"]
       my_suites = "my_package.suites"

3. directories listed in the environment variable ``PETLBENCH_SUITE_PATH`` (``os.pathsep``
   separated);
4. directories (or single YAML files) passed as ``extra_dirs``.

``get_suite`` also accepts the path of a YAML file as the suite name.

The YAML schema (``?`` = optional)::

    name: vtab                 # suite id: letters, digits, _ . -
    aliases?: [vtab1k]
    title?: VTAB-1k
    description?: ...
    layout: vtab1k             # vtab1k (NOAH txt splits) | fgvc_json (VPT JSON splits)
    image_size: 224            # model input size S
    transform: vtab_resize     # vtab_resize | fgvc_crop (see petlbench.data.transforms)
    splits?: [...]             # split names; default by layout
    roles?: {tune_train: .., tune_val: .., train: .., test: ..}   # which split plays which part
    generator?: demo           # data that petlbench can build itself (the offline demo)
    groups:                    # ordered: group name -> list of tasks
      Natural:
        - name: cifar
          display_name?: CIFAR-100    # how tables name it; default: the name
          classes: 100
          aliases?: [cifar100]
          sizes?: {train800: 800, val200: 200, train800val200: 1000, test: 10000}
          image_roots?: [images, .]   # fgvc_json only: probe order for image folders
          source?: free text
          description?: free text

Names and aliases match case-insensitively and ignoring ``_``, ``-``, ``.`` and spaces, so
``cifar_100``, ``CIFAR-100`` and ``cifar100`` are the same key; no two tasks of a suite may
share a key.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from petlbench.data.problems import data_error
from petlbench.errors import PetlbenchError, did_you_mean

SUITE_PATH_ENV = "PETLBENCH_SUITE_PATH"
ENTRY_POINT_GROUP = "petlbench.suites"
BUILTIN_PACKAGE = "petlbench_suites"

#: Default split names and protocol roles per on-disk layout.
LAYOUTS: Mapping[str, dict[str, Any]] = MappingProxyType(
    {
        "vtab1k": {
            "splits": ("train800", "val200", "train800val200", "test"),
            "roles": {"tune_train": "train800", "tune_val": "val200", "train": "train800val200", "test": "test"},
        },
        "fgvc_json": {
            "splits": ("train", "val", "test"),
            "roles": {"tune_train": "train", "tune_val": "val", "train": "train", "test": "test"},
        },
    }
)
TRANSFORMS = ("vtab_resize", "fgvc_crop")
GENERATORS = ("demo",)
ROLES = ("tune_train", "tune_val", "train", "test")
DEFAULT_IMAGE_ROOTS = ("images", "Images", ".")

_SUITE_KEYS = {
    "name", "aliases", "title", "description", "layout", "image_size", "transform",
    "splits", "roles", "generator", "groups", "train_defaults",
}
_TASK_KEYS = {"name", "display_name", "classes", "aliases", "sizes", "image_roots", "source", "description"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def name_key(name: str) -> str:
    """The matching key of a name: lower case, without ``_ - .`` and spaces."""
    return re.sub(r"[\s_.\-]+", "", name).lower()


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a suite: what the data must look like, not where it is."""

    name: str
    suite: str
    group: str
    classes: int
    aliases: tuple[str, ...] = ()
    sizes: Mapping[str, int] = field(default_factory=dict)
    image_roots: tuple[str, ...] = ()
    source: str = ""
    description: str = ""
    display_name: str = ""  # how tables name the task ("Flowers102"); default: the name

    @property
    def label(self) -> str:
        """The name a table shows: ``display_name`` when the suite gives one, else ``name``."""
        return self.display_name or self.name

    @property
    def id(self) -> str:
        """Explicit ``suite/task`` id, so full CIFAR is never confused with VTAB's 1k CIFAR."""
        return f"{self.suite}/{self.name}"

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name first, then the aliases: the folder names a reader probes."""
        return (self.name, *self.aliases)

    def expected_size(self, split: str) -> int | None:
        return self.sizes.get(split)


@dataclass(frozen=True, eq=False)
class Suite:
    """A named, ordered collection of tasks sharing a layout, image size and transform."""

    name: str
    layout: str
    image_size: int
    transform: str
    tasks: tuple[Task, ...]
    groups: Mapping[str, tuple[str, ...]]
    splits: tuple[str, ...]
    roles: Mapping[str, str]
    title: str = ""
    description: str = ""
    aliases: tuple[str, ...] = ()
    generator: str | None = None
    path: str = ""
    train_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def resolve_task(self, name: str | Task) -> Task:
        """Find a task by canonical name or alias (also ``suite/task``); raise with suggestions."""
        if isinstance(name, Task):
            if name.suite != self.name:
                raise PetlbenchError(f"task {name.id!r} does not belong to suite {self.name!r}.")
            return name
        wanted = name
        if "/" in wanted:
            prefix, _, wanted = wanted.partition("/")
            if name_key(prefix) not in {name_key(n) for n in (self.name, *self.aliases)}:
                raise PetlbenchError(
                    f"task {name!r} names suite {prefix!r} but this is suite {self.name!r}. "
                    f"Fix: drop the prefix or pass --suite {prefix}."
                )
        key = name_key(wanted)
        for task in self.tasks:
            if key in {name_key(n) for n in task.names}:
                return task
        choices = [n for t in self.tasks for n in t.names]
        raise PetlbenchError(did_you_mean(wanted, choices, "task"))

    def select(self, names: Iterable[str] | None = None) -> tuple[Task, ...]:
        """Resolve several task names (``None`` or empty = all), keeping order, dropping repeats."""
        names = list(names or ())
        if not names:
            return self.tasks
        out: list[Task] = []
        for n in names:
            task = self.resolve_task(n)
            if task not in out:
                out.append(task)
        return tuple(out)

    def split_for(self, role: str) -> str:
        """The split that plays ``role`` (``tune_train``, ``tune_val``, ``train`` or ``test``)."""
        if role not in self.roles:
            raise PetlbenchError(did_you_mean(role, self.roles, "split role"))
        return self.roles[role]

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise PetlbenchError(did_you_mean(split, self.splits, f"split of suite {self.name!r}"))
        return split


# ---------------------------------------------------------------------------- validation


def _fail(source: str, fieldname: str, problem: str, fix: str) -> PetlbenchError:
    return data_error(source, f"field '{fieldname}' {problem}", fix)


def _str(value: Any, source: str, fieldname: str, *, required: bool = False, default: str = "") -> str:
    if value is None:
        if required:
            raise _fail(source, fieldname, "is missing", f"add `{fieldname.split('.')[-1]}: ...`")
        return default
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, fieldname, f"must be a non-empty string, got {value!r}", "write it as text")
    return value.strip()


def _name(value: Any, source: str, fieldname: str) -> str:
    text = _str(value, source, fieldname, required=True)
    if not _NAME_RE.match(text):
        raise _fail(
            source, fieldname, f"must be letters, digits, '_', '.' or '-', got {text!r}", "rename it"
        )
    return text


def _int(value: Any, source: str, fieldname: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(
            source, fieldname, f"must be an integer >= {minimum}, got {value!r}", "write a whole number"
        )
    return value


def _str_list(value: Any, source: str, fieldname: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(source, fieldname, f"must be a list, got {value!r}", "write it as [a, b]")
    return tuple(_name(v, source, f"{fieldname}[{i}]") for i, v in enumerate(value))


def _relpath_list(value: Any, source: str, fieldname: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(source, fieldname, f"must be a list, got {value!r}", "write it as [images, .]")
    out = []
    for i, v in enumerate(value):
        text = _str(v, source, f"{fieldname}[{i}]", required=True)
        if Path(text).is_absolute() or ".." in Path(text).parts:
            raise _fail(source, f"{fieldname}[{i}]", f"must be a folder inside the dataset folder, got {text!r}", "use e.g. images or .")
        out.append(text)
    return tuple(out)


def _mapping(value: Any, source: str, fieldname: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(source, fieldname, f"must be a mapping, got {type(value).__name__}", "write `key: value` pairs")
    return value


def _unknown_keys(data: dict, allowed: set[str], source: str, where: str) -> None:
    extra = sorted(str(k) for k in set(data) - allowed)
    if extra:
        fieldname = f"{where}.{extra[0]}" if where else extra[0]
        raise _fail(source, fieldname, "is not a known field", f"use one of {', '.join(sorted(allowed))}")


def parse_suite(data: Any, source: str) -> Suite:
    """Validate a parsed YAML document and build the :class:`Suite` (errors name file and field)."""
    if not isinstance(data, dict):
        raise data_error(source, "a suite file must be a YAML mapping", "start the file with `name: ...`")
    _unknown_keys(data, _SUITE_KEYS, source, "")
    name = _name(data.get("name"), source, "name")
    aliases = _str_list(data.get("aliases"), source, "aliases")
    layout = _str(data.get("layout"), source, "layout", required=True)
    if layout not in LAYOUTS:
        raise _fail(source, "layout", f"is {layout!r}", f"use one of {', '.join(LAYOUTS)}")
    image_size = _int(data.get("image_size"), source, "image_size", 8)
    transform = _str(data.get("transform"), source, "transform", required=True)
    if transform not in TRANSFORMS:
        raise _fail(source, "transform", f"is {transform!r}", f"use one of {', '.join(TRANSFORMS)}")
    generator = data.get("generator")
    if generator is not None and generator not in GENERATORS:
        raise _fail(source, "generator", f"is {generator!r}", f"use one of {', '.join(GENERATORS)} or drop it")

    splits = _str_list(data.get("splits"), source, "splits") or LAYOUTS[layout]["splits"]
    if len(set(splits)) != len(splits):
        raise _fail(source, "splits", "has a repeated name", "list each split once")
    roles_raw = data.get("roles")
    roles: dict[str, str] = {}
    for role, split in _mapping(LAYOUTS[layout]["roles"] if roles_raw is None else roles_raw, source, "roles").items():
        if role not in ROLES:
            raise _fail(source, f"roles.{role}", "is not a known role", f"use one of {', '.join(ROLES)}")
        if split not in splits:
            raise _fail(source, f"roles.{role}", f"names split {split!r}, which is not in `splits`", "fix the name")
        roles[role] = split
    missing_roles = [r for r in ROLES if r not in roles]
    if missing_roles:
        raise _fail(source, f"roles.{missing_roles[0]}", "is missing", f"map each of {', '.join(ROLES)} to a split")

    groups_raw = data.get("groups")
    if groups_raw is None:
        raise _fail(source, "groups", "is missing", "add `groups:` mapping group names to task lists")
    groups_raw = _mapping(groups_raw, source, "groups")
    if not groups_raw:
        raise _fail(source, "groups", "is empty", "add at least one group with one task")

    tasks: list[Task] = []
    groups: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for group, entries in groups_raw.items():
        group = _name(group, source, "groups")
        where = f"groups.{group}"
        if not isinstance(entries, list) or not entries:
            raise _fail(source, where, "must be a non-empty list of tasks", "list the tasks with `- name: ...`")
        names: list[str] = []
        for i, entry in enumerate(entries):
            tw = f"{where}[{i}]"
            entry = _mapping(entry, source, tw)
            _unknown_keys(entry, _TASK_KEYS, source, tw)
            tname = _name(entry.get("name"), source, f"{tw}.name")
            tw = f"{where}.{tname}"
            classes = _int(entry.get("classes"), source, f"{tw}.classes", 2)
            taliases = tuple(dict.fromkeys(_str_list(entry.get("aliases"), source, f"{tw}.aliases")))
            sizes: dict[str, int] = {}
            for split, n in _mapping(entry.get("sizes") or {}, source, f"{tw}.sizes").items():
                if split not in splits:
                    raise _fail(source, f"{tw}.sizes.{split}", "is not a split of this suite", f"use one of {', '.join(splits)}")
                sizes[split] = _int(n, source, f"{tw}.sizes.{split}", 0)
            roots = _relpath_list(entry.get("image_roots"), source, f"{tw}.image_roots")
            if roots and layout != "fgvc_json":
                raise _fail(source, f"{tw}.image_roots", "only applies to layout fgvc_json", "drop it")
            if layout == "fgvc_json" and not roots:
                roots = DEFAULT_IMAGE_ROOTS
            for key in dict.fromkeys(name_key(n) for n in (tname, *taliases)):
                if key in owner and owner[key] != tname:
                    raise _fail(
                        source, f"{tw}.aliases", f"reuses the name {key!r} of task {owner[key]!r}",
                        "give every task its own names; an alias may map to one task only",
                    )
                owner[key] = tname
            tasks.append(
                Task(
                    name=tname, suite=name, group=group, classes=classes, aliases=taliases,
                    sizes=MappingProxyType(sizes), image_roots=roots,
                    source=_str(entry.get("source"), source, f"{tw}.source"),
                    description=_str(entry.get("description"), source, f"{tw}.description"),
                    display_name=_str(entry.get("display_name"), source, f"{tw}.display_name"),
                )
            )
            names.append(tname)
        groups[group] = tuple(names)
    return Suite(
        name=name, layout=layout, image_size=image_size, transform=transform, tasks=tuple(tasks),
        groups=MappingProxyType(groups), splits=splits, roles=MappingProxyType(roles),
        title=_str(data.get("title"), source, "title", default=name),
        description=_str(data.get("description"), source, "description"),
        aliases=aliases, generator=generator, path=source,
        train_defaults=MappingProxyType(_train_defaults(data.get("train_defaults"), source)),
    )


def _train_defaults(value: Any, source: str) -> dict[str, Any]:
    """Suite-level training defaults (e.g. the demo's short schedule): setting names and plain values.

    Only their shape is checked here. Which settings exist and what values they take is
    :mod:`petlbench.config`'s business (``suite_train_defaults`` checks them, naming this file,
    when a run is planned): data/ depends on neither config nor the method API.
    """
    out = {}
    for key, v in _mapping(value or {}, source, "train_defaults").items():
        if not isinstance(key, str) or not key.strip():
            raise _fail(source, f"train_defaults.{key}", "is not a setting name", "use a name such as epochs")
        if not isinstance(v, (bool, int, float, str)):
            raise _fail(source, f"train_defaults.{key}", f"must be a number, text or true/false, got {v!r}",
                        f"write e.g. `{key}: 10`")
        out[key] = v
    return out


def read_suite_text(entry: Any, source: str) -> str:
    """A suite file's text (a Path or importlib Traversable); not UTF-8 is a one-line error."""
    try:
        data = entry.read_bytes()
    except OSError as exc:
        raise data_error(source, f"suite file cannot be read ({exc.strerror or exc})",
                         "check the file's permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise data_error(source, f"suite file is not UTF-8 text (byte {exc.start})",
                         "save it as UTF-8 (YAML files are UTF-8)", line) from None


def parse_suite_text(text: str, source: str) -> Suite:
    """Parse YAML text; syntax errors become one-line errors with the file and line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        cause = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise data_error(source, f"invalid YAML: {cause}", "fix the YAML syntax", line) from None
    except RecursionError:
        raise data_error(source, "invalid YAML: nested too deeply (a corrupt file?)", "restore the suite file") from None
    return parse_suite(data, source)


def load_suite_file(path: str | Path) -> Suite:
    """Load and validate one suite YAML file."""
    path = Path(path)
    if not path.is_file():
        raise data_error(path, "suite file does not exist", "pass the path of a suite YAML file")
    return parse_suite_text(read_suite_text(path, str(path)), str(path))


# ---------------------------------------------------------------------------- discovery


def _yaml_entries(folder: Any) -> list[Any]:
    """Suite files directly inside a Path or importlib Traversable, sorted by name."""
    return sorted(
        (e for e in folder.iterdir() if e.is_file() and e.name.endswith((".yaml", ".yml"))),
        key=lambda e: e.name,
    )


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _env_dirs() -> list[str]:
    return [p for p in os.environ.get(SUITE_PATH_ENV, "").split(os.pathsep) if p.strip()]


class SuitePluginError(PetlbenchError):
    """A suite was asked for that is not registered, and a suite plugin failed to load: the
    message names the plugin and its error (it may be the one that defines the suite)."""


def broken_plugins() -> list[str]:
    """One line per suite plugin (entry point of :data:`ENTRY_POINT_GROUP`) that fails to load,
    naming it, its error and the fix; empty when all load."""
    return [line for ep in _entry_points() if (line := _load_plugin(ep)[1]) is not None]


def _load_plugin(ep: importlib.metadata.EntryPoint) -> tuple[list[Any], str | None]:
    """(suite files, None) of a plugin, or ([], the line saying why it cannot be loaded)."""
    try:
        module = importlib.import_module(ep.value.split(":")[0].strip())
        return _yaml_entries(importlib.resources.files(module)), None
    except Exception as exc:  # noqa: BLE001 - a plugin's own bug; named, never a traceback
        cause = (str(exc).splitlines() or [""])[0]
        return [], (f"suite plugin {ep.name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP!r}) failed to load "
                    f"({type(exc).__name__}: {cause}). Fix: repair or reinstall the package that provides it (its "
                    "value must name an importable module or package holding *.yaml suite files)")


def suite_sources(extra_dirs: Iterable[str | Path] = ()) -> list[tuple[str, Any]]:
    """Every suite file petlbench would read, as (origin label, Path or Traversable).

    A suite plugin that fails to load is left out (see :func:`broken_plugins`): the other suites
    keep working, and asking for a suite that is not found names the broken plugin.
    """
    found: list[tuple[str, Any]] = []
    found += [("built-in", e) for e in _yaml_entries(importlib.resources.files(BUILTIN_PACKAGE))]
    for ep in _entry_points():
        files, _broken = _load_plugin(ep)
        found += [(f"entry point {ep.name}", e) for e in files]
    dirs = [(f"${SUITE_PATH_ENV}", d) for d in _env_dirs()] + [("extra dir", d) for d in extra_dirs]
    for origin, d in dirs:
        p = Path(d).expanduser()
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            found.append((origin, p))
        elif p.is_dir():
            found += [(origin, e) for e in _yaml_entries(p)]
        else:
            raise data_error(
                p, f"suite directory from {origin} does not exist",
                "create it or remove it from the list of suite directories",
            )
    return found


def load_suites(extra_dirs: Iterable[str | Path] = ()) -> dict[str, Suite]:
    """Parse every suite file; a name (or alias) claimed by two files is an error naming both."""
    suites: dict[str, Suite] = {}
    claimed: dict[str, Suite] = {}
    for _origin, entry in suite_sources(extra_dirs):
        suite = parse_suite_text(read_suite_text(entry, str(entry)), str(entry))
        for key in dict.fromkeys(name_key(n) for n in (suite.name, *suite.aliases)):
            if key in claimed:
                other = claimed[key]
                raise data_error(
                    suite.path, f"suite name {key!r} is already defined by {other.path}",
                    "give one of the two suites another `name:` (and aliases)",
                )
            claimed[key] = suite
        suites[suite.name] = suite
    return suites


def list_suites(extra_dirs: Iterable[str | Path] = ()) -> list[str]:
    """Names of all registered suites, sorted."""
    return sorted(load_suites(extra_dirs))


def get_suite(name: str | Suite, extra_dirs: Iterable[str | Path] = ()) -> Suite:
    """Look up a suite by name or alias (or load a YAML file given by path)."""
    if isinstance(name, Suite):
        return name
    if name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file():
        return load_suite_file(Path(name).expanduser())
    suites = load_suites(extra_dirs)
    key = name_key(name)
    for suite in suites.values():
        if key in {name_key(n) for n in (suite.name, *suite.aliases)}:
            return suite
    unknown = did_you_mean(name, [n for s in suites.values() for n in (s.name, *s.aliases)], "suite")
    broken = broken_plugins()
    if broken:  # the plugin that defines it may be the broken one: say so, not "install it"
        raise SuitePluginError(f"{unknown} {'; '.join(broken)}.")
    raise PetlbenchError(unknown)
