"""Third-party plugins: discovery through the ``petlbench.methods`` entry-point group.

The example package in examples/petlbench-outscale (quoted verbatim in docs/plugins.md, which
tests/test_docs.py checks) is made visible as an installed distribution (a .dist-info with
entry_points.txt on sys.path), exactly what pip leaves.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import petlbench
from petlbench import registry
from tests.conftest import TINY_VIT

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "petlbench-outscale"


def install_fake_dist(site: Path, name: str, module_src: Path | None, entry_points: str) -> None:
    dist = site / f"{name}-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    if module_src is not None:
        shutil.copytree(module_src, site / module_src.name)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points", None)
    yield tmp_path
    registry._entry_points = None
    for mod in [m for m in sys.modules if m.startswith("petlbench_outscale")]:
        del sys.modules[mod]
    registry.unregister_method("outscale")


def test_example_plugin_is_discovered_and_merges(site, images) -> None:
    install_fake_dist(site, "petlbench_outscale", EXAMPLE / "petlbench_outscale",
                      "[petlbench.methods]\noutscale = petlbench_outscale:OutScale\n")
    assert "outscale" in petlbench.list_methods()
    arch, kw = TINY_VIT
    model = petlbench.create_model(arch, "outscale", 4, backbone_kwargs=kw, init=1.5).eval()
    assert petlbench.count_params(model).trainable_without_head == 2 * (3 * 32 + 4 * 32)
    with torch.no_grad():
        assert torch.allclose(petlbench.merge(model).eval()(images), model(images), atol=1e-5)


def test_broken_plugin_is_one_clear_error(site) -> None:
    install_fake_dist(site, "broken_plugin", None, "[petlbench.methods]\nbroken = no_such_module:Thing\n")
    with pytest.raises(petlbench.PetlbenchError, match="could not import plugin 'no_such_module:Thing'"):
        petlbench.get_method("broken")
    assert "arc" in petlbench.list_methods()  # everything else keeps working


def test_in_process_registration() -> None:
    class Tiny(petlbench.Method):
        name = "tiny_probe"
        summary = "head only"

        def trainable(self, backbone, petl):
            return backbone.head_parameters()

    petlbench.register_method(Tiny)
    try:
        assert petlbench.get_method("tiny_probe") is Tiny
        with pytest.raises(ValueError, match="already registered"):
            petlbench.register_method(type("Other", (petlbench.Method,), {"name": "tiny_probe"}))
        with pytest.raises(ValueError, match="already registered"):
            petlbench.register_method(type("Clash", (petlbench.Method,), {"name": "arc"}))
    finally:
        petlbench.unregister_method("tiny_probe")
