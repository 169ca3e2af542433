#!/usr/bin/env bash
# The wheel, as a user gets it from `pip install petlbench`: build it from the checkout, install it
# into a fresh venv (no editable install anywhere on its path) and run a real demo run from another
# folder. An editable install hides a package the wheel leaves out (petlbench.launch once was);
# this step fails CI when the wheel does.
#
# Usage: PYTHON=/path/to/venv/bin/python bash .ci/wheel-check.sh   (default: python on PATH)
# The fresh venv reuses PYTHON's installed dependencies (torch, timm, ...) through a .pth file, so
# nothing is downloaded; the wheel itself is installed with --no-deps --no-index. PYTHON needs
# setuptools>=69 (the build runs without isolation, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/petlbench-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Build from a copy of the checkout (tracked and untracked-but-not-ignored files), so the build
# leaves no build/ or egg-info behind and never sees ignored local files.
mkdir "$work/src"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work/src"
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" "$work/src" 2>"$work/build.log" || {
  cat "$work/build.log" >&2; echo "wheel-check: building the wheel failed" >&2; exit 1; }
wheel=("$work"/dist/petlbench-*.whl)

"$PY" -m venv "$work/venv"
deps="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Lines of a .pth only extend sys.path (after the venv's own site-packages); the .pth files in that
# folder, among them an editable petlbench's finder, are not run, so only the wheel provides petlbench.
echo "$deps" >"$site/_ci_dependencies.pth"
"$work/venv/bin/python" -m pip install --quiet --no-deps --no-index "${wheel[0]}"

cd "$work"  # another folder: the checkout is not on sys.path
"$work/venv/bin/python" - "$site" <<'EOF'
import importlib
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
for name in ("petlbench", "petlbench.launch", "petlbench.data", "petlbench.estimate", "petlbench.report", "petlbench_methods",
             "petlbench_suites"):
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    assert site in where.parents, f"{name} imported from {where}, not from the installed wheel"
from petlbench.registry import get_method, list_methods

assert len(list_methods()) >= 20 and all(get_method(m) for m in list_methods())
for data in ("report/templates/report.html.j2", "report/data/paper_results.csv"):
    assert (site / "petlbench" / data).is_file(), f"the wheel lacks petlbench/{data}"
print(f"wheel-check: {len(list_methods())} methods and petlbench's packages import from the wheel")
EOF
PETLBENCH_CACHE="$work/cache" "$work/venv/bin/petlbench" run --suite demo --method linear \
  --task digits_rotation --set epochs=1 --output "$work/results" --quiet
"$work/venv/bin/petlbench" report --results "$work/results" --out "$work/report.html" >/dev/null
test -s "$work/report.html"
echo "wheel-check: ok (${wheel[0]##*/} installed in a fresh venv; demo run and report from $work)"
