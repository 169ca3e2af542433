"""Wave-2b methods through the real runner on the offline demo suite: the calibration step (SCT)
and the installed pooling (DTL) end up in the run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from petlbench.cli import main

FAST = ["--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "limit_train=32", "--set", "limit_eval=32",
        "--set", "batch_size=16"]


pytestmark = pytest.mark.usefixtures("demo_cache")  # tests/conftest.py: one demo cache per process


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
