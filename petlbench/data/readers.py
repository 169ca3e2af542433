"""Split readers: turn a split file on disk into a :class:`SplitIndex` (paths + labels), no decoding.

Two layouts are read as they are distributed, never converted in place:

* ``vtab1k`` (NOAH format): ``<root>/<task>/<split>.txt`` with lines ``<relative path> <label>``,
  labels 0-based, paths relative to the task folder.
* ``fgvc_json`` (VPT format): ``<root>/<dataset>/<split>.json``, one JSON object mapping an
  image key to a class id. Ids need not be 0-based: the map ``sorted unique train ids -> 0..C-1``
  is built from ``train.json`` and reused for every split, so a split that lacks a class cannot
  silently shift the labels of the others (the per-split map of the reference loaders can).
  Keys are looked up under the task's ``image_roots`` (probed in order on a sample of keys).

The task folder may carry the canonical name or any alias (``cifar`` or ``cifar100``...), in
any case. Every check here is cheap (parse + ``stat``) so a bad file is reported with its
path, line, cause and fix before anything is decoded or trained. Each function has a
collecting form (returns problems, used by ``petlbench data check``) and a raising form.
"""

from __future__ import annotations

import difflib
import json
import os
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from petlbench.data.files import file_problem
from petlbench.data.problems import WARNING, Problem, data_error, raise_first
from petlbench.data.suites import Suite, Task, get_suite, name_key
from petlbench.errors import PetlbenchError

_PROBE_SAMPLE = 16
_EXT = {"vtab1k": ".txt", "fgvc_json": ".json"}


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """What one split lists, resolved and validated but not decoded."""

    suite: str
    task: str
    split: str
    layout: str
    num_classes: int
    task_dir: Path
    image_root: Path
    source: Path
    relpaths: tuple[str, ...]
    labels: tuple[int, ...]
    raw_labels: tuple[int, ...]
    lines: tuple[int | None, ...]
    class_ids: tuple[int, ...] | None = None
    warnings: tuple[Problem, ...] = field(default=())
    #: For a union of splits (:func:`concat_splits`): each part's split file and entry count.
    parts: tuple[tuple[Path, int], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.relpaths)

    @property
    def sources(self) -> tuple[Path, ...]:
        """The split file(s) this index was read from (several for a union)."""
        return tuple(p for p, _ in self.parts) if self.parts else (self.source,)

    @property
    def paths(self) -> list[Path]:
        return [self.image_root / p for p in self.relpaths]

    @property
    def extensions(self) -> dict[str, int]:
        """Image file suffixes and their counts (JPEG versus PNG changes results; record it)."""
        return dict(Counter(PurePosixPath(p).suffix.lower() or "(none)" for p in self.relpaths))

    def location(self, i: int) -> tuple[str, int | None]:
        """Where entry ``i`` is listed, for ``path:line`` messages."""
        start = 0
        for source, count in self.parts:
            if i < start + count:
                return str(source), self.lines[i]
            start += count
        return str(self.source), self.lines[i]

    def take(self, n: int) -> SplitIndex:
        """The first ``n`` entries (for quick smoke runs)."""
        parts, left = [], n
        for source, count in self.parts:
            if left > 0:
                parts.append((source, min(count, left)))
            left -= count
        return replace(
            self, relpaths=self.relpaths[:n], labels=self.labels[:n],
            raw_labels=self.raw_labels[:n], lines=self.lines[:n], parts=tuple(parts),
        )


def concat_splits(first: SplitIndex, second: SplitIndex) -> SplitIndex:
    """Two splits of one task as one training set (FGVC ``train+val``), ``first``'s entries first.

    Both use the label map of the task's train split already (readers map every split with it), so
    the labels agree. If the two were found under different image roots of the task, the paths are
    made relative to the task folder."""
    if (first.suite, first.task, first.layout) != (second.suite, second.task, second.layout):
        raise ValueError(f"cannot join splits of different tasks ({first.task}, {second.task})")
    root, rel_a, rel_b = first.image_root, first.relpaths, second.relpaths
    if second.image_root != root:
        root = first.task_dir

        def rebase(index: SplitIndex) -> tuple[str, ...]:
            return tuple(posixpath.normpath(posixpath.join(
                Path(os.path.relpath(index.image_root, root)).as_posix(), p)) for p in index.relpaths)

        rel_a, rel_b = rebase(first), rebase(second)
    return replace(
        first, split=f"{first.split}+{second.split}", image_root=root, relpaths=rel_a + rel_b,
        labels=first.labels + second.labels, raw_labels=first.raw_labels + second.raw_labels,
        lines=first.lines + second.lines, warnings=first.warnings + second.warnings,
        parts=((first.source, len(first)), (second.source, len(second))),
    )


def train_val_splits(suite: Suite) -> tuple[str, str]:
    """The splits a ``train_split: train+val`` run trains on, or a one-line error where the suite
    has no separate validation split to add (VTAB-1k's train split already is train800val200)."""
    train, val = suite.split_for("train"), suite.split_for("tune_val")
    if suite.layout != "fgvc_json" or train == val:
        raise PetlbenchError(
            f"training setting 'train_split': train+val applies to FGVC-layout suites, whose train and val "
            f"splits are separate; suite {suite.name!r} trains on {train!r} already. Fix: drop train_split "
            "(or set it to protocol)."
        )
    return train, val


# ---------------------------------------------------------------------------- folders


def check_data_root(data_root: str | Path) -> Path:
    """The data root must be an existing folder."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise data_error(
            root, "data root does not exist",
            "pass --data-root the folder that holds the task folders (for VTAB-1k the folder with cifar/, dtd/, ...)",
        )
    if not root.is_dir():
        raise data_error(root, "data root is a file, not a folder", "pass the folder that holds the task folders")
    return root


def _folders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir())
    except OSError:
        return []


def find_task_dir(data_root: str | Path, task: Task) -> Path:
    """Find the task's folder under the canonical name or any alias (case and ``_``/``-`` ignored)."""
    root = check_data_root(data_root)
    for name in task.names:
        if (root / name).is_dir():
            return root / name
    folders = _folders(root)
    by_key: dict[str, Path] = {}
    for f in folders:
        by_key.setdefault(name_key(f.name), f)
    for name in task.names:
        if name_key(name) in by_key:
            return by_key[name_key(name)]
    # Not found: say what is there, what is close, and whether the root is one level off.
    present = [f.name for f in folders]
    shown = ", ".join(present[:15]) + (f", ... ({len(present)} folders)" if len(present) > 15 else "")
    close = difflib.get_close_matches(task.name, present, n=2, cutoff=0.6)
    hints = [f"found: {shown or '(no folders)'}"]
    if close:
        hints.append(f"did you mean {' or '.join(repr(c) for c in close)}? rename it to {task.name!r}")
    nested = [f for f in folders for n in task.names if (f / n).is_dir()]
    if any((root / f"{s}{ext}").is_file() for s in ("train800", "test", "train") for ext in (".txt", ".json")):
        hints.append(f"{root} looks like a task folder itself: pass its parent {root.parent} as --data-root")
    elif nested:
        hints.append(f"the task is one level down: pass --data-root {nested[0]}")
    else:
        hints.append(f"put the task under {root / task.name} or pass the --data-root that holds it")
    raise data_error(
        root, f"no folder for task {task.id!r} (looked for {', '.join(task.names)}, ignoring case, '_' and '-')",
        "; ".join(hints),
    )


def split_path(task_dir: Path, layout: str, split: str) -> Path:
    return task_dir / f"{split}{_EXT[layout]}"


def _missing_split(path: Path, suite: Suite) -> Problem:
    cause = file_problem(path)
    if cause is not None and cause != "does not exist":  # a FIFO or a device would hang or never end
        return Problem(str(path), f"split file {cause}", "replace it with the split file itself (only regular files "
                       "are read)")
    ext = _EXT[suite.layout]
    present = sorted(p.name for p in path.parent.glob(f"*{ext}"))
    expected = ", ".join(f"{s}{ext}" for s in suite.splits)
    return Problem(
        str(path), "split file is missing",
        f"a {suite.layout} task folder holds {expected}; found {', '.join(present) or 'none'}; "
        "re-extract the archive or re-run the converter",
    )


# ---------------------------------------------------------------------------- parsing

Entry = tuple[str, int, int | None]  # (relative path, label as written, line)


def parse_vtab_file(path: Path, classes: int) -> tuple[list[Entry], list[Problem]]:
    """Parse ``<relative path> <label>`` lines; problems carry file and line."""
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return [], [Problem(str(path), "split file is not UTF-8 text", "replace it with the original split file")]
    entries: list[Entry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            problems.append(Problem(
                str(path), f"malformed line {line[:80]!r}: expected `<relative image path> <integer label>`, "
                f"got {len(parts)} field{'s' if len(parts) != 1 else ''}",
                "write one image per line as `images/train800/000000.jpg 3`; paths must not contain spaces",
                lineno,
            ))
            continue
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            problems.append(Problem(
                str(path), f"label {label_text!r} is not an integer", "write 0-based integer class labels", lineno
            ))
            continue
        if not 0 <= label < classes:
            problems.append(Problem(
                str(path), f"label {label} is outside [0, {classes})",
                f"labels must be 0-based class indices below {classes}; check the task folder and the suite's `classes`",
                lineno,
            ))
            continue
        if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute():
            problems.append(Problem(
                str(path), f"image path {rel!r} is absolute", "write paths relative to the task folder", lineno
            ))
            continue
        if climbs_out(rel):
            problems.append(Problem(
                str(path), f"image path {rel!r} climbs out of the task folder",
                "write paths inside the task folder (no leading `..`); a split must not read another task's "
                "or the machine's files", lineno,
            ))
            continue
        entries.append((rel, label, lineno))
    if not entries and not problems:
        problems.append(Problem(str(path), "split file is empty", "restore the split file; it must list at least one image"))
    return entries, problems


def climbs_out(rel: str) -> bool:
    """Whether a relative path leaves its folder (``../x``, ``a/../../x``), judged on the text.

    Only ``..`` is refused: a symlink inside the task folder that points elsewhere (data kept on
    another disk) is the user's own choice and stays allowed.
    """
    norm = posixpath.normpath(rel.replace("\\", "/"))
    return norm == ".." or norm.startswith("../")


def parse_fgvc_file(path: Path) -> tuple[list[Entry], list[Problem]]:
    """Parse a VPT JSON split ``{image key: class id}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        return [], [Problem(str(path), "split file is not UTF-8 text", "replace it with the original VPT split file")]
    except json.JSONDecodeError as exc:
        return [], [Problem(str(path), f"invalid JSON: {exc.msg}", "replace it with the original VPT split file", exc.lineno)]
    except RecursionError:  # `[[[[...`: corrupt, not a reason for a traceback
        return [], [Problem(str(path), "invalid JSON: nested too deeply (a corrupt file)",
                            "replace it with the original VPT split file")]
    if not isinstance(data, dict):
        return [], [Problem(
            str(path), f"expected a JSON object mapping image path to class id, got {type(data).__name__}",
            "use the VPT split files ({\"relative/path.jpg\": class_id, ...})",
        )]
    entries: list[Entry] = []
    problems: list[Problem] = []
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(
                str(path), f"class id {value!r} of key {key!r} is not an integer", "write integer class ids"
            ))
        elif not key.strip() or Path(key).is_absolute() or PurePosixPath(key).is_absolute():
            problems.append(Problem(
                str(path), f"image key {key!r} is not a relative path", "write keys relative to the image root"
            ))
        elif climbs_out(key):
            problems.append(Problem(
                str(path), f"image key {key!r} climbs out of the task folder",
                "write keys inside the image root (no leading `..`); a split must not read another dataset's "
                "or the machine's files",
            ))
        else:
            entries.append((key, value, None))
    if not entries and not problems:
        problems.append(Problem(str(path), "split file is empty", "restore the split file; it must list at least one image"))
    return entries, problems


def _sample(keys: Sequence[str], n: int = _PROBE_SAMPLE) -> list[str]:
    if len(keys) <= n:
        return list(keys)
    step = (len(keys) - 1) / (n - 1)
    return [keys[round(i * step)] for i in range(n)]


def probe_image_root(task_dir: Path, task: Task, keys: Sequence[str], source: Path) -> tuple[Path | None, list[Problem]]:
    """Pick the first of the task's ``image_roots`` under which a sample of keys resolves."""
    candidates = list(dict.fromkeys(task_dir / r if r != "." else task_dir for r in task.image_roots or (".",)))
    sample = _sample(keys)
    best, best_hits = None, 0
    for cand in candidates:
        hits = sum((cand / k).is_file() for k in sample)
        if hits == len(sample):
            return cand, []
        if hits > best_hits:
            best, best_hits = cand, hits
    if best is not None:
        return best, []  # partial: the missing files are reported one by one
    key = sample[0]
    tried = ", ".join(f"{c}/" for c in candidates)
    if key.startswith("car_ims/"):
        fix = (
            f"Stanford Cars keys start with car_ims/: extract the official car_ims.tgz into {task_dir} so that "
            f"{task_dir / key} exists (the Kaggle cars_train/cars_test copy uses other file names and must be renamed)"
        )
    else:
        fix = f"put the images so that <root>/{key} exists for one of these roots, or add the right folder to the task's image_roots"
    return None, [Problem(str(source), f"image key {key!r} resolves under none of the probed roots {tried}", fix)]


def _missing_files(root: Path, entries: list[Entry], source: Path) -> list[Problem]:
    problems = []
    for rel, _label, line in entries:
        cause = file_problem(root / rel)
        if cause is not None:
            problems.append(Problem(str(source), f"image {root / rel} {cause}", missing_fix(cause), line))
    return problems


def missing_fix(cause: str) -> str:
    """The fix that goes with a :func:`file_problem` cause."""
    if cause == "does not exist":
        return "restore the file or remove its line; a partial download or extraction is the usual cause"
    if cause.startswith("is not a regular file"):
        return "replace it with the image file itself (only regular files are read) or remove its line"
    return "replace it with the original image (re-download or re-extract) or remove its line"


# ---------------------------------------------------------------------------- split reading


def collect_split(
    suite: Suite | str, task: Task | str, split: str, data_root: str | Path, *, check_files: bool = True
) -> tuple[SplitIndex | None, list[Problem]]:
    """Read a split and return every problem found instead of raising (``data check`` uses this).

    Folder-level problems (missing root, task folder) still raise, because nothing below them
    can be checked.
    """
    suite = get_suite(suite)
    task = suite.resolve_task(task)
    suite.check_split(split)
    task_dir = find_task_dir(data_root, task)
    source = split_path(task_dir, suite.layout, split)
    if not source.is_file():
        return None, [_missing_split(source, suite)]
    warnings: list[Problem] = []
    class_ids: tuple[int, ...] | None = None
    if suite.layout == "vtab1k":
        entries, problems = parse_vtab_file(source, task.classes)
        image_root = task_dir
        labels = [label for _, label, _ in entries]
    else:
        entries, problems = parse_fgvc_file(source)
        if not entries:
            return None, problems
        train_split = suite.roles["train"]
        train_source = split_path(task_dir, suite.layout, train_split)
        if split == train_split:
            train_entries = entries
        elif not train_source.is_file():
            return None, problems + [_missing_split(train_source, suite)]
        else:
            train_entries, train_problems = parse_fgvc_file(train_source)
            if not train_entries:
                return None, problems + train_problems
        class_ids = tuple(sorted({label for _, label, _ in train_entries}))
        if len(class_ids) > task.classes:
            problems.append(Problem(
                str(train_source), f"{len(class_ids)} distinct class ids, but task {task.id!r} has {task.classes} classes",
                "check that this is the right dataset folder, or fix `classes` in the suite YAML",
            ))
        elif len(class_ids) < task.classes and split == train_split:
            warnings.append(Problem(
                str(source), f"only {len(class_ids)} of {task.classes} classes appear in {source.name}",
                "use the complete VPT split files", severity=WARNING,
            ))
        to_label = {cid: i for i, cid in enumerate(class_ids)}
        unseen = Counter(label for _, label, _ in entries if label not in to_label)
        for cid, count in sorted(unseen.items()):
            first = next(k for k, label, _ in entries if label == cid)
            problems.append(Problem(
                str(source), f"class id {cid} ({count} image{'s' if count != 1 else ''}, first {first!r}) does not "
                f"appear in {train_source.name}, so it has no label", "use split files from the same VPT release",
            ))
        entries = [e for e in entries if e[1] in to_label]
        labels = [to_label[label] for _, label, _ in entries]
        image_root = None
        if entries:
            image_root, root_problems = probe_image_root(task_dir, task, [k for k, _, _ in entries], source)
            problems += root_problems
        if image_root is None:
            return None, problems
    if not entries:
        return None, problems
    if check_files:
        problems += _missing_files(image_root, entries, source)
    index = SplitIndex(
        suite=suite.name, task=task.name, split=split, layout=suite.layout, num_classes=task.classes,
        task_dir=task_dir, image_root=image_root, source=source,
        relpaths=tuple(rel for rel, _, _ in entries), labels=tuple(labels),
        raw_labels=tuple(label for _, label, _ in entries), lines=tuple(line for _, _, line in entries),
        class_ids=class_ids, warnings=tuple(warnings),
    )
    return index, problems


def read_split(
    suite: Suite | str, task: Task | str, split: str, data_root: str | Path, *, check_files: bool = True
) -> SplitIndex:
    """Read and validate one split; raise :class:`DataError` (path, line, cause, fix) on the first problem."""
    index, problems = collect_split(suite, task, split, data_root, check_files=check_files)
    raise_first(problems)
    if index is None:  # defensive: collect_split always reports why
        raise PetlbenchError(f"could not read split {split!r} of task {task!r}.")
    return index


__all__ = [
    "SplitIndex", "check_data_root", "climbs_out", "collect_split", "find_task_dir", "missing_fix",
    "concat_splits", "parse_fgvc_file", "parse_vtab_file", "probe_image_root", "read_split", "split_path",
    "train_val_splits",
]
