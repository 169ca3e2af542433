"""Training speed of two petlbench revisions, side by side: the same sweep run by each, alternately.

A change to the engine must not slow the default (harmonised) protocol. This runs one real sweep
(default: ARC on the offline demo suite, 5 tasks x 10 epochs) with the code of ``--base`` and of
``--head`` in turn, ``--rounds`` times each, alternating (base, head, head, base, ...) so slow drift
of the machine falls on both, and compares the training time the run records measure
(``efficiency.train_time_s``: the training steps only, no data build, evaluation or start-up).
Each revision runs from a temporary ``git worktree`` in its own process, so nothing of one is
imported by the other. The figure is the ratio head / base of the median total training time.

    python benchmarks/bench_revisions.py --base 17d2e83             # the commit before a change
    python benchmarks/bench_revisions.py --base main~5 --head HEAD --rounds 3 --method lora

Writes ``benchmarks/results/<machine>-revisions-<method>-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: installed package name -> folder of a checkout (as setup.py maps them)
PACKAGES = {"petlbench": "petlbench", "petlbench_methods": "methods", "petlbench_suites": "suites"}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def _checkout(rev: str, where: Path) -> Path:
    """``rev`` as a detached worktree under ``where``, plus a folder of links that makes its code
    importable under the installed package names (put first on PYTHONPATH)."""
    tree = where / f"tree-{rev.replace('/', '_').replace('~', '-')}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
    shim = where / f"path-{tree.name}"
    shim.mkdir()
    for package, folder in PACKAGES.items():
        (shim / package).symlink_to(tree / folder, target_is_directory=True)
    return shim


def _sweep(shim: Path, method: str, out: Path, cache: Path, threads: int) -> float:
    """One demo sweep with the code behind ``shim``; the sum of its runs' training time (s)."""
    env = {**os.environ, "PYTHONPATH": str(shim), "PETLBENCH_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1"}
    code = "import sys; from petlbench.cli import main; sys.argv = ['petlbench'] + sys.argv[1:]; main()"
    subprocess.run([sys.executable, "-c", code, "run", "--suite", "demo", "--method", method, "--output", str(out),
                    "--quiet"], check=True, env=env, cwd=str(out.parent), stdout=subprocess.DEVNULL)
    total = 0.0
    for record in out.rglob("*.json"):
        data = json.loads(record.read_text())
        if data.get("status") == "ok":
            total += float(data["efficiency"]["train_time_s"])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision to compare against (e.g. the commit before a change)")
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--method", default="arc")
    ap.add_argument("--rounds", type=int, default=2, help="sweeps per revision (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each sweep (OMP_NUM_THREADS)")
    ap.add_argument("--out", default=None, help="output stem (default: benchmarks/results/<machine>-revisions-...)")
    args = ap.parse_args()

    revs = {"base": _git("rev-parse", "--short", args.base), "head": _git("rev-parse", "--short", args.head)}
    times: dict[str, list[float]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="petlbench-revisions-") as tmp:
        where = Path(tmp)
        shims = {side: _checkout(rev, where) for side, rev in revs.items()}
        try:
            order = [side for r in range(args.rounds) for side in (("base", "head") if r % 2 == 0 else ("head", "base"))]
            for i, side in enumerate(order):
                started = time.perf_counter()
                seconds = _sweep(shims[side], args.method, where / f"results-{i}", where / f"cache-{side}", args.threads)
                times[side].append(seconds)
                print(f"{side} {revs[side]}: {seconds:.2f} s of training ({time.perf_counter() - started:.0f} s wall)",
                      file=sys.stderr)
        finally:
            for shim in shims.values():
                tree = shim.parent / shim.name.removeprefix("path-")
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)

    base, head = statistics.median(times["base"]), statistics.median(times["head"])
    machine = f"cpu-{platform.machine()}-{args.threads}thread{'s' if args.threads > 1 else ''}"
    result = {"benchmark": "revisions", "suite": "demo", "method": args.method, "revisions": revs,
              "train_time_s": times, "median_s": {"base": base, "head": head}, "ratio_head_over_base": head / base,
              "machine": machine, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d"), "python": platform.python_version()}
    stem = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"{machine}-revisions-{args.method}-{time.strftime('%Y%m%d')}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = (f"**Training time, demo suite x {args.method}, {revs['base']} (base) vs {revs['head']} (head)** "
          f"({machine}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end, {result['date']})\n\n"
          f"| revision | sweeps (training s) | median |\n|---|---|---:|\n"
          f"| base {revs['base']} | {', '.join(f'{t:.2f}' for t in times['base'])} | {base:.2f} |\n"
          f"| head {revs['head']} | {', '.join(f'{t:.2f}' for t in times['head'])} | {head:.2f} |\n\n"
          f"head / base = **{head / base:.3f}** (the training steps of the 5 runs, as each record measures them).\n")
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
