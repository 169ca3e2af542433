"""The evaluation protocols: their names, what each selects, and which are labelled as test-selected.

Torch-free on purpose: the report (which never trains) needs the same source of truth as the
runner. See :mod:`petlbench.runner` for what each protocol does when a run executes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from petlbench.errors import PetlbenchError, did_you_mean

PROTOCOLS: dict[str, str] = {
    "vtab1k": "train on train800val200; test accuracy after the final epoch (no selection on test)",
    "tune": "lr x wd grid trained on train800 and scored on val200; best retrained on train800val200; "
            "final-epoch test accuracy",
    "fgvc": "train on train; epoch selected on val; test accuracy at that epoch",
    "legacy-best-test": "best test accuracy over epochs (the official scripts' selection on the TEST set; "
                        "not comparable with honest protocols)",
    "paper": "each method's official training recipe; the recipe's selection (final / val / tune), a test-set "
             "selection replaced by the final epoch",
    "paper-best-test": "each method's official training recipe and selection, best-of-N on the TEST set included "
                       "(not comparable with honest protocols)",
}
#: Protocols that train each method with its own paper recipe (``Method.recipes``).
PAPER_PROTOCOLS = frozenset({"paper", "paper-best-test"})
#: Protocols whose number may be selected on the test set: labelled wherever their numbers appear.
TEST_SELECTED = frozenset({"legacy-best-test", "paper-best-test"})
#: The suite roles each selection reads (the data check at plan time checks exactly these).
SELECTION_ROLES = {"final": ("train", "test"), "best-test": ("train", "test"),
                   "val": ("tune_train", "tune_val", "test"), "tune": ("tune_train", "tune_val", "train", "test")}


def default_protocol(layout: str) -> str:
    return "fgvc" if layout == "fgvc_json" else "vtab1k"


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise PetlbenchError("--protocol: " + did_you_mean(name, PROTOCOLS, "protocol", label="Known"))
    return name


def selection_mode(protocol: str, train: Mapping[str, Any], layout: str) -> str:
    """What a run selects: ``final`` (the last epoch), ``val`` (the best validation epoch),
    ``tune`` (a grid on validation, then final) or ``best-test`` (the best TEST epoch).

    The harmonised protocols decide by themselves; the paper protocols read the recipe's
    ``selection`` (``protocol``: the suite's honest default), and ``paper`` turns ``best-test``
    into ``final``.
    """
    fixed = {"vtab1k": "final", "fgvc": "val", "tune": "tune", "legacy-best-test": "best-test"}
    if protocol in fixed:
        return fixed[protocol]
    chosen = train.get("selection", "protocol")
    if chosen == "protocol":
        chosen = "val" if default_protocol(layout) == "fgvc" else "final"
    if chosen == "best-test" and protocol != "paper-best-test":
        return "final"
    return chosen
