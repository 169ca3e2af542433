"""The folder that holds the clone: there, ``import petlbench`` finds the clone, not petlbench.

A clone of the repository is a folder named ``petlbench`` without an ``__init__.py`` (the package
is one level down, ``petlbench/petlbench/``). Python run from the folder that holds the clone (a
script saved there, ``python -c``, a notebook started there) has that folder first on
``sys.path``, and when petlbench is installed in editable mode (``pip install -e .``, found by
setuptools' import hook, not through ``sys.path``) the path scan finds nothing but the clone
folder and imports it as an empty namespace package: ``module 'petlbench' has no attribute
'create_model'``. petlbench's own code never runs in that interpreter, so it cannot say so
there; the command line, run from the same folder, can (:func:`namespace_trap`).

A root-level ``__init__.py`` in the clone would turn the trap into an error message, but it
would also make pytest import the repository root as a package (named after the clone folder),
which breaks the test suite of every clone named ``petlbench``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = "petlbench"


def namespace_trap(folder: str | Path | None = None) -> str | None:
    """One line saying that Python run in ``folder`` (default: the working directory) would import
    the folder ``folder/petlbench`` as an empty namespace package instead of petlbench; None when it
    would not (no such folder, a real package there, or a normal install that the path scan finds).

    When the cheap checks find such a folder, a fresh interpreter started in ``folder`` is asked
    what it would import (``python -c``'s view: this process's own ``sys.path`` differs from a
    script's), so the answer is what the user's script would get."""
    here = Path.cwd() if folder is None else Path(folder)
    candidate = here / PACKAGE
    try:
        if not candidate.is_dir() or any((candidate / f"__init__{s}").exists() for s in (".py", ".pyc")):
            return None
        if (here / f"{PACKAGE}.py").exists():
            return None
        probe = subprocess.run(
            [sys.executable, "-c", f"import importlib.util as u; s = u.find_spec({PACKAGE!r}); "
             "print('regular' if s is not None and s.origin is not None else 'namespace')"],
            cwd=here, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if probe.returncode != 0 or probe.stdout.strip() != "namespace":
        return None
    clone = " (the petlbench clone)" if (candidate / PACKAGE / "__init__.py").is_file() else ""
    return (f"in {here}, Python scripts, 'python -c' and notebooks import the folder ./{PACKAGE}{clone} as an "
            f"empty namespace package, not petlbench (\"module 'petlbench' has no attribute ...\"). Fix: run them "
            f"from inside ./{PACKAGE} or from any other folder.")
