"""Which records a report covers: the suite they belong to (canonical task names filled in),
``--where`` filters and the ``--names`` choice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from petlbench.errors import PetlbenchError
from petlbench.report.loading import record_source
from petlbench.report.table import _dig, _fmt_value


def resolve_suite(records: Sequence[Mapping[str, Any]], suite: Any,
                  on_warning: Callable[[str], None]) -> tuple[Any, list[dict[str, Any]]]:
    """The suite to report and the records that belong to it (canonical task names filled in)."""
    from petlbench.data import get_suite
    from petlbench.data.suites import SuitePluginError, name_key

    if suite is not None:
        the_suite = get_suite(suite)
        keys = {name_key(n) for n in (the_suite.name, *the_suite.aliases)}
        mine = [r for r in records if name_key(str(r["suite"])) in keys]
        others = sorted({str(r["suite"]) for r in records} - {str(r["suite"]) for r in mine})
        if not mine:
            raise PetlbenchError(
                f"none of the {len(records)} record(s) is of suite {the_suite.name!r} (they are of suite "
                f"{', '.join(others)}). Fix: pass --suite {others[0]} or point --results elsewhere."
            )
        if others:
            on_warning(f"leaving out {len(records) - len(mine)} record(s) of suite {', '.join(others)} "
                       f"(reporting --suite {the_suite.name})")
    else:
        by_suite: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        resolved: dict[str, Any] = {}
        for name in dict.fromkeys(str(r["suite"]) for r in records):
            try:
                resolved[name] = get_suite(name)
            except SuitePluginError:  # names the broken plugin and its error: more use than "install it"
                raise
            except PetlbenchError:
                raise PetlbenchError(
                    f"records are of suite {name!r}, which is not registered here. Fix: pass --suite with the "
                    "suite's YAML file (or install the package that defines it)."
                ) from None
        for r in records:
            by_suite[resolved[str(r["suite"])].name].append(r)
        if len(by_suite) > 1:
            counts = ", ".join(f"{n} ({len(v)} record{'' if len(v) == 1 else 's'})" for n, v in sorted(by_suite.items()))
            raise PetlbenchError(
                f"the records mix suites {counts}. Fix: pass --suite NAME to report one of them."
            )
        the_suite = resolved[str(records[0]["suite"])]
        mine = list(records)
    out = []
    for r in mine:
        try:
            task = the_suite.resolve_task(str(r["task"])).name
        except PetlbenchError:
            raise PetlbenchError(
                f"record {record_source(r)} is of task {r['task']!r}, which suite {the_suite.name!r} "
                f"({the_suite.path or 'built-in'}) does not define. Fix: pass --suite with the suite "
                "definition these runs used, or move the record out of the results folder."
            ) from None
        out.append({**r, "task": task})
    return the_suite, out


def _lookup(record: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """The value ``key`` names in a record: a dotted path, a top-level field, a method
    hyperparameter, a training setting, a config field or a provenance field (in that order)."""
    if "." in key:
        node: Any = record
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return False, None
            node = node[part]
        return True, node
    for where in ((), ("config", "method_hparams"), ("config", "train"), ("config",), ("provenance",),
                  ("efficiency",), ("metrics",)):
        node = _dig(record, *where) if where else record
        if isinstance(node, Mapping) and key in node:
            return True, node[key]
    return False, None


def _matches(value: Any, wanted: str) -> bool:
    import yaml

    if isinstance(value, str):
        return value == wanted
    try:
        parsed = float(wanted) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else yaml.safe_load(wanted)
    except ValueError:
        return False
    except (yaml.YAMLError, RecursionError):  # RecursionError: a value nested thousands deep
        return str(value) == wanted
    if isinstance(value, bool) or isinstance(parsed, bool):
        return value is parsed or str(value).lower() == wanted.lower()
    if isinstance(value, (int, float)) and isinstance(parsed, (int, float)):
        return math.isclose(float(value), float(parsed), rel_tol=1e-9, abs_tol=1e-12)
    if value is None:
        return wanted.lower() in ("none", "null", "")
    return value == parsed or str(value) == wanted


def filter_where(records: Sequence[dict[str, Any]], where: Sequence[str]) -> list[dict[str, Any]]:
    """Keep the records that satisfy every ``key=value`` (or ``key!=value``) of ``where``.

    ``value`` may list alternatives, comma-separated (``method=lora,arc``); numbers compare as
    numbers (``lr=1e-3`` matches 0.001). Raises PetlbenchError for a key no record has, or when
    nothing is left (naming the values that are there).
    """
    out = list(records)
    for clause in where:
        key, op, wanted = clause.partition("!=") if "!=" in clause else clause.partition("=")
        key = key.strip()
        if not op or not key:
            raise PetlbenchError(f"--where {clause!r} is not key=value. Fix: e.g. --where epochs=100 "
                                 "or --where method!=linear")
        alternatives = [w.strip() for w in wanted.split(",")] if wanted.strip() else [""]
        found = [(r, *_lookup(r, key)) for r in out]
        if not any(has for _r, has, _v in found):
            raise PetlbenchError(
                f"--where {clause!r}: no record has a field {key!r}. Fix: use a record field (method, task, seed, "
                "protocol), a method hyperparameter or training setting (rank, epochs, lr), or a dotted path "
                "(config.train.epochs, provenance.method_code.version)."
            )
        keep = []
        for r, has, value in found:
            hit = has and any(_matches(value, w) for w in alternatives)
            if hit != (op == "!="):
                keep.append(r)
        if not keep:
            values = sorted({_fmt_value(v) for _r, has, v in found if has})
            raise PetlbenchError(f"--where {clause!r} leaves no record ({key} is {', '.join(values[:10])} in the "
                                 "records). Fix: pick one of these values.")
        out = keep
    return out


def _parse_names(names: str) -> str:
    if names not in ("display", "registry"):
        raise PetlbenchError(f"--names {names!r} is not one of display, registry.")
    return names
