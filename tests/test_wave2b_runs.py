"""Wave-2b methods through the real runner on the offline demo suite: the calibration step (SCT)
and the installed pooling (DTL) end up in the run record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from petlbench.cli import main

FAST = ["--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "limit_train=32", "--set", "limit_eval=32",
        "--set", "batch_size=16"]


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    cache = os.environ.get("PETLBENCH_CACHE") or str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("PETLBENCH_CACHE")
    os.environ["PETLBENCH_CACHE"] = cache
    yield cache
    if old is None:
        os.environ.pop("PETLBENCH_CACHE", None)


def test_sct_and_dtl_run_and_record_calibration_and_pooling(tmp_path: Path) -> None:
    out = tmp_path / "res"
    result = CliRunner().invoke(main, ["run", "--suite", "demo", "--method", "sct,dtl,adaptformer", "--task", "digits",
                                       "--output", str(out), "--quiet", *FAST])
    assert result.exit_code == 0, result.output
    recs = {r["method"]: r for r in (json.loads(p.read_text()) for p in out.rglob("*.json"))}
    assert set(recs) == {"sct", "dtl", "adaptformer"}
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    assert recs["sct"]["config"]["calibration"]["images"] == 32
    assert recs["dtl"]["config"]["calibration"] is None
    assert recs["dtl"]["config"]["pooling"] == "mean_patch_tokens_then_norm"
    assert recs["adaptformer"]["config"]["pooling"] == "cls_token"
