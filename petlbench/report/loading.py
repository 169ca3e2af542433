"""Find and read run records for the reporter.

A results folder is a tree of ``*.json`` run records (see :mod:`petlbench.records`). Files that
cannot be used (corrupt or truncated JSON, another schema version, missing fields, numbers out of
range, special files, files too large to be a record) are skipped with one warning naming each
file: a table must never silently average a half-written record. Only regular files are opened,
and never more than :data:`~petlbench.records.MAX_RECORD_BYTES` of one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petlbench.errors import PetlbenchError
from petlbench.records import MAX_RECORD_BYTES, REQUIRED, SCHEMA_VERSION
from petlbench.safeio import TooLarge, read_bounded

#: Key under which the reporter remembers where a record came from (not part of the schema).
SOURCE_KEY = "_source"


class ReportWarning(UserWarning):
    """A record was skipped or a table cell needs the reader's attention."""


def warn(message: str) -> None:
    """Default warning sink of the Python API (the CLI prints ``warning: ...`` instead)."""
    warnings.warn(message, ReportWarning, stacklevel=3)


@dataclass
class LoadedRecords:
    """Records read from disk plus the files that were skipped and why."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0

    @property
    def warnings(self) -> list[str]:
        return [f"skipping {path}: {reason}" for path, reason in self.skipped]


def record_source(record: Mapping[str, Any]) -> str:
    """How to name a record in a message: its file when known, else its label."""
    return str(record.get(SOURCE_KEY) or record.get("label") or record.get("run_id") or "<record>")


#: Every integer petlbench writes fits in 64 bits (byte counts, parameter counts, seeds, epochs); a
#: larger one (``10**400``) is damage, and would overflow float conversions in the tables.
MAX_INT = 2**63


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return -MAX_INT <= value < MAX_INT if isinstance(value, int) else math.isfinite(value)


def _huge_int(data: Any) -> tuple[str, int] | None:
    """(dotted path, digits) of an integer in ``data`` outside 64 bits, or None (iterative: a
    record may be nested as deeply as the JSON parser allowed)."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
        elif isinstance(node, int) and not isinstance(node, bool) and not -MAX_INT <= node < MAX_INT:
            return where, _digits(node)
    return None


def _digits(value: int) -> int:
    """Decimal digits of ``value``, without ``str()`` (which refuses more than 4300 digits)."""
    return int(abs(value).bit_length() * math.log10(2)) + 1


def record_problem(data: Any) -> str | None:
    """Why ``data`` cannot be aggregated as a run record, or None when it can."""
    if not isinstance(data, dict):
        return f"not a run record (a JSON {type(data).__name__}, expected an object)"
    version = data.get("schema_version")
    if version is None:
        return "not a run record (no schema_version)"
    if version != SCHEMA_VERSION:
        if isinstance(version, int) and version < SCHEMA_VERSION:
            return (f"schema_version {version} is older than the {SCHEMA_VERSION} this petlbench reads "
                    "(re-run it with this petlbench)")
        return (f"schema_version {_short(version)} is not the {SCHEMA_VERSION} this petlbench reads "
                "(upgrade petlbench to report it)")
    status = data.get("status")
    if status not in ("ok", "failed"):
        return f"status is {status!r}, expected 'ok' or 'failed' (an unfinished run?)"
    for key in ("suite", "task", "method"):
        if not isinstance(data.get(key), str) or not data[key]:
            return f"field {key!r} is missing or not a string"
    huge = _huge_int(data)
    if huge is not None:
        return f"field {huge[0]!r} holds an integer of {huge[1]} digits, out of range (a damaged record?)"
    if status == "failed":
        return None
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        return f"field {missing[0]!r} is missing"
    if isinstance(data.get("seed"), bool) or not isinstance(data.get("seed"), int):
        return f"field 'seed' must be an integer, got {_short(data.get('seed'))}"
    for key in ("metrics", "params", "config", "efficiency", "provenance"):
        if not isinstance(data.get(key), dict):
            return f"field {key!r} must be an object"
    for key in ("train", "method_hparams", "backbone_kwargs"):  # read as mappings by the report
        if data["config"].get(key) is not None and not isinstance(data["config"][key], dict):
            return f"field 'config.{key}' must be an object"
    top1 = data["metrics"].get("top1")
    if not _is_number(top1) or not 0.0 <= top1 <= 100.0:
        return f"status is 'ok' but metrics.top1 is {_short(top1)}, not a percentage"
    trainable = data["params"].get("trainable")
    if not _is_number(trainable) or trainable < 0:
        return f"params.trainable is {_short(trainable)}, not a count"
    return None


def _short(value: Any, limit: int = 40) -> str:
    """``repr`` of a value for a one-line message, cut to ``limit`` characters."""
    if isinstance(value, int) and not isinstance(value, bool) and _digits(value) > limit:
        return f"an integer of {_digits(value)} digits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def find_record_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every ``*.json`` below the given folders (or the files themselves), sorted, each once.

    Hidden entries (``.slurm/``, ``.x.json.tmp``) are left out: they are never records.
    """
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found[path.resolve()] = None
            continue
        if not path.is_dir():
            raise PetlbenchError(
                f"results folder {str(path)!r} does not exist. Fix: pass --results with the --output "
                "folder of `petlbench run`."
            )
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.endswith(".json") and not name.startswith("."):
                    found[(Path(root) / name).resolve()] = None
    return sorted(found)


def load_records(paths: Iterable[str | os.PathLike],
                 on_warning: Callable[[str], None] | None = None) -> LoadedRecords:
    """Read every record under ``paths``; each unusable file is reported to ``on_warning`` and skipped.

    Raises PetlbenchError when a folder is missing, holds no ``*.json`` at all, or when no file
    is a usable record (after the warnings, which say why for each).
    """
    on_warning = on_warning or warn
    paths = list(paths)
    files = find_record_files(paths)
    where = ", ".join(str(p) for p in paths)
    if not files:
        raise PetlbenchError(
            f"no run records (*.json) under {where}. Fix: run `petlbench run ... --output DIR` first "
            "and pass --results DIR."
        )
    out = LoadedRecords(files=len(files))
    for path in files:
        try:
            data = json.loads(read_bounded(path, MAX_RECORD_BYTES).decode("utf-8"))
        except UnicodeDecodeError:
            _skip(out, on_warning, str(path), "not UTF-8 text (corrupt file?)")
            continue
        except json.JSONDecodeError as exc:
            _skip(out, on_warning, str(path), f"invalid JSON, truncated or corrupt ({exc.msg} at line {exc.lineno})")
            continue
        except ValueError:  # an integer literal longer than Python converts (4300 digits)
            _skip(out, on_warning, str(path), "invalid JSON, corrupt (a number too long to read)")
            continue
        except RecursionError:  # `[[[[...`: the parser's recursion limit, not a reason for a traceback
            _skip(out, on_warning, str(path), "invalid JSON, corrupt (nested too deeply)")
            continue
        except TooLarge as exc:
            _skip(out, on_warning, str(path), f"not read: {exc}")
            continue
        except OSError as exc:
            _skip(out, on_warning, str(path), f"cannot be read ({exc.strerror or exc})")
            continue
        problem = record_problem(data)
        if problem is not None:
            _skip(out, on_warning, str(path), problem)
            continue
        data[SOURCE_KEY] = str(path)
        out.records.append(data)
    if not out.records:
        first = f" (e.g. {out.skipped[0][0]}: {out.skipped[0][1]})" if out.skipped else ""
        raise PetlbenchError(
            f"none of the {len(files)} JSON file(s) under {where} is a usable run record{first}."
            " Fix: point --results at the --output folder of `petlbench run`."
        )
    return out


def _skip(out: LoadedRecords, on_warning: Callable[[str], None], path: str, reason: str) -> None:
    out.skipped.append((path, reason))
    on_warning(f"skipping {path}: {reason}")
