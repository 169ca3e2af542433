"""Package discovery for the wheel (everything else is in pyproject.toml).

The folders ``methods/`` and ``suites/`` ship as the packages ``petlbench_methods`` and
``petlbench_suites`` (installing petlbench never claims the generic top-level names). pyproject.toml
alone cannot combine that renaming with discovery, and a hand-written package list silently drops
every subpackage nobody remembers to add (it dropped ``petlbench.launch``, so a non-editable
install failed on every ``petlbench run``); here every package under each folder is found.
"""

from setuptools import find_packages, setup

#: installed package name -> folder in the checkout
RENAMED = {"petlbench": "petlbench", "petlbench_methods": "methods", "petlbench_suites": "suites"}


def discovered() -> list[str]:
    names = []
    for package, folder in RENAMED.items():
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(where=folder)]
    return names


setup(package_dir=RENAMED, packages=discovered())
