"""``petlbench data check``: verify a data folder against a suite before anything trains.

Broken mirrors are the most common reason a PETL run fails or silently differs (anchors.md §6),
so this reads every split of every task and reports *all* problems at once, one line each in
the ``path:line: cause. Fix: ...`` form:

* errors: missing task folder or split file, malformed line, non-integer label, label outside
  ``[0, classes)``, empty split, FGVC key under no probed image root, class id unseen in train,
  listed image missing, unreadable, truncated or not an image (PIL ``verify`` + full ``load``);
* warnings: line counts different from the published sizes (mirrors differ; not fatal),
  classes with no example in the training split, duplicated entries.

Each image is read once; the bytes feed both the decode check and the split fingerprint, so
the report also carries the fingerprints a result will be stamped with. Nothing in the data
folder is ever written. The runner calls :func:`check_suite` and
:meth:`CheckReport.raise_for_errors` before training.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from petlbench.data.files import file_problem, read_regular_file
from petlbench.data.fingerprint import digest_split
from petlbench.data.problems import WARNING, DataError, Problem
from petlbench.data.readers import SplitIndex, check_data_root, collect_split, find_task_dir, missing_fix
from petlbench.data.suites import Suite, Task, get_suite


@dataclass
class SplitSummary:
    split: str
    found: int | None
    expected: int | None
    fingerprint: str | None = None

    @property
    def mismatch(self) -> bool:
        return self.found is not None and self.expected is not None and self.found != self.expected


@dataclass
class TaskSummary:
    task: str
    group: str
    classes: int
    folder: str | None
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    extensions: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    warnings: int = 0

    @property
    def status(self) -> str:
        if self.folder is None:
            return "MISSING"
        if self.errors:
            return f"{self.errors} error{'s' if self.errors != 1 else ''}"
        if self.warnings:
            return f"ok ({self.warnings} warning{'s' if self.warnings != 1 else ''})"
        return "ok"


@dataclass
class CheckReport:
    """Everything ``data check`` found: per-task summaries and every problem."""

    suite: str
    data_root: str
    splits: tuple[str, ...]
    tasks: list[TaskSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def fingerprints(self) -> dict[str, dict[str, str]]:
        """``{task: {split: fingerprint}}`` for every split that was fully readable."""
        return {
            t.task: {s: v.fingerprint for s, v in t.splits.items() if v.fingerprint} for t in self.tasks
        }

    def raise_for_errors(self) -> None:
        """Raise the first error as a :class:`DataError` (mentioning how many more there are)."""
        errors = self.errors
        if errors:
            raise DataError(errors[0], more=len(errors) - 1)

    def format_table(self) -> str:
        """A fixed-width per-task table; ``*`` marks a count that differs from the published size."""
        header = ["task", "group", "folder", "classes", *self.splits, "ext", "status"]
        rows = [header]
        for t in self.tasks:
            cells = [t.task, t.group, t.folder or "-", str(t.classes)]
            for s in self.splits:
                sm = t.splits.get(s)
                if sm is None or sm.found is None:
                    cells.append("-")
                else:
                    cells.append(f"{sm.found}*" if sm.mismatch else str(sm.found))
            cells.append(",".join(sorted(t.extensions)) or "-")
            cells.append(t.status)
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if any(sm.mismatch for t in self.tasks for sm in t.splits.values()):
            lines.append("* differs from the published split size (warning only; mirrors differ)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite, "data_root": self.data_root, "ok": self.ok,
            "tasks": [
                {
                    "task": t.task, "group": t.group, "folder": t.folder, "classes": t.classes, "status": t.status,
                    "extensions": t.extensions,
                    "splits": {s: {"found": v.found, "expected": v.expected, "fingerprint": v.fingerprint} for s, v in t.splits.items()},
                }
                for t in self.tasks
            ],
            "problems": [
                {"severity": p.severity, "path": p.path, "line": p.line, "cause": p.cause, "fix": p.fix} for p in self.problems
            ],
        }


def _verify_image(path: Path) -> tuple[bytes | None, str | None]:
    """Read a file once: its SHA-256, and whether PIL can verify and fully decode it."""
    cause = file_problem(path)  # FIFOs, devices, folders: one line, never opened
    if cause is not None:
        return None, cause
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        return None, "does not exist"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    digest = hashlib.sha256(data).digest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower():
            return digest, f"is truncated ({text})"
        if "cannot identify image file" in text:
            return digest, "is not an image file PIL can read"
        return digest, f"cannot be decoded ({type(exc).__name__}: {text})"
    return digest, None


def _check_files(index: SplitIndex, decode: bool, workers: int) -> tuple[list[Problem], str | None]:
    paths = index.paths
    if decode:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="petlbench-check") as pool:
            results = list(pool.map(_verify_image, paths, chunksize=32))
    else:
        results = [(b"", None) if (c := file_problem(p)) is None else (None, c) for p in paths]
    problems = []
    for i, (_digest, cause) in enumerate(results):
        if cause is not None:
            src, line = index.location(i)
            fix = missing_fix(cause) if _digest is None else "replace it with the original image (re-download or re-extract)"
            problems.append(Problem(src, f"image {paths[i]} {cause}", fix, line))
    fingerprint = None
    if decode and all(d is not None for d, _ in results):
        fingerprint = digest_split(index, [d for d, _ in results])  # type: ignore[misc]
    return problems, fingerprint


def _split_warnings(suite: Suite, task: Task, split: str, index: SplitIndex) -> list[Problem]:
    out: list[Problem] = list(index.warnings)
    expected = task.expected_size(split)
    if expected is not None and len(index) != expected:
        out.append(Problem(
            str(index.source), f"{len(index)} entries, but the published size of {task.id} {split} is {expected}",
            "fine if your copy comes from another release; otherwise re-download the split", severity=WARNING,
        ))
    dupes = [p for p, c in Counter(index.relpaths).items() if c > 1]
    if dupes:
        out.append(Problem(
            str(index.source), f"{len(dupes)} image path(s) listed more than once (first {dupes[0]!r})",
            "remove the repeated lines", severity=WARNING,
        ))
    if split == suite.roles.get("train") and index.class_ids is None:  # FGVC: the reader already warns
        absent = task.classes - len(set(index.labels))
        if absent > 0:
            out.append(Problem(
                str(index.source), f"{absent} of {task.classes} classes have no example in {split}",
                "expected for some VTAB-1k tasks; otherwise check the split file", severity=WARNING,
            ))
    return out


def check_suite(
    suite: Suite | str,
    data_root: str | Path,
    tasks: Iterable[str] | None = None,
    *,
    splits: Iterable[str] | None = None,
    decode: bool = True,
    workers: int | None = None,
) -> CheckReport:
    """Check ``tasks`` (default: all) of ``suite`` under ``data_root``; never raises for data problems."""
    suite = get_suite(suite)
    selected = suite.select(tasks)
    split_names = tuple(suite.check_split(s) for s in (splits or suite.splits))
    report = CheckReport(suite.name, str(data_root), split_names)
    try:
        root = check_data_root(data_root)
    except DataError as exc:
        report.problems.append(exc.problem)
        report.tasks = [TaskSummary(t.name, t.group, t.classes, None) for t in selected]
        return report
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    for task in selected:
        summary = TaskSummary(task.name, task.group, task.classes, None)
        report.tasks.append(summary)
        try:
            folder = find_task_dir(root, task)
        except DataError as exc:
            report.problems.append(exc.problem)
            summary.errors += 1
            continue
        summary.folder = folder.name
        exts: Counter[str] = Counter()
        for split in split_names:
            index, problems = collect_split(suite, task, split, root, check_files=False)
            sm = SplitSummary(split, len(index) if index is not None else None, task.expected_size(split))
            summary.splits[split] = sm
            if index is not None:
                problems += _split_warnings(suite, task, split, index)
                file_problems, sm.fingerprint = _check_files(index, decode, workers)
                problems += file_problems
                exts.update(index.extensions)
                if any(p.is_error for p in problems):
                    sm.fingerprint = None
            summary.errors += sum(p.is_error for p in problems)
            summary.warnings += sum(not p.is_error for p in problems)
            report.problems += problems
        summary.extensions = dict(exts)
    return report
