"""Honest timing verdicts: a ratio is PASS or FAIL only when its whole spread lies on one side of
the target; otherwise it is inconclusive. A merged model that is structurally the plain backbone
gets that as its primary verdict, and its latency ratio is only a secondary timer check."""

from __future__ import annotations

from petlbench.bench import judge, ratio_spread, to_markdown, verdicts


def test_judge_straddling_interval_is_inconclusive() -> None:
    assert judge(1.005, 0.002, 1.01) == "pass"  # 1.003 .. 1.007 <= 1.01
    assert judge(1.03, 0.005, 1.01) == "fail"  # 1.025 .. 1.035 > 1.01
    assert judge(1.005, 0.03, 1.01) == "inconclusive"  # 0.975 .. 1.035: noise larger than the 1% margin
    assert judge(0.55, 0.05, 0.5, at_most=False) == "pass"
    assert judge(0.52, 0.1, 0.5, at_most=False) == "inconclusive"
    assert judge(1.02, None, 1.01) == "fail"  # no spread known: the value itself decides


def test_ratio_spread_adds_the_half_ranges() -> None:
    assert ratio_spread({"spread": 0.04}, {"spread": 0.02}) == 0.03


def _row(method: str, ratio: float, spread: float, same: bool | None, deployed: str = "merged") -> dict:
    return {"method": method, "deployed": deployed, "same_structure_as_plain": same, "latency_ratio": ratio,
            "latency_ratio_spread": spread, "mfu": None, "memory_vs_full": 0.3}


def test_structural_verdict_is_primary_and_latency_inconclusive() -> None:
    out = verdicts([_row("lora", 1.004, 0.05, True), _row("vpt", 1.3, 0.01, None, "unmerged")], None, False, True,
                   "tensors")
    lora = [v for v in out if v["target"].startswith("lora")]
    assert lora[0]["primary"] is True and lora[0]["status"] == "pass" and "structurally" in lora[0]["target"]
    latency = next(v for v in lora if "latency" in v["target"])
    assert latency["status"] == "inconclusive" and latency["ok"] is None and latency["primary"] is False
    assert not any("latency" in v["target"] for v in out if v["target"].startswith("vpt"))  # unmerged: not a target
    result = {"iters": 2, "memory_source": "tensors", "backbone": "b", "image_size": 32, "batch_size": 2,
              "dtype": "fp32", "compile": False, "device": "cpu", "torch": "x", "timm": "y", "date": "d",
              "full_peak_memory": {"tensors": 2**20}, "methods": [], "verdicts": out, "notes": []}
    text = to_markdown(result)
    assert "INCONCLUSIVE (spread straddles the target) lora: deployed latency / plain <= 1.01" in text
    assert "1.004 ± 0.050" in text


def test_merged_but_not_plain_keeps_latency_primary() -> None:
    out = verdicts([_row("odd", 1.2, 0.01, False)], None, False, True, "tensors")
    assert out[0]["status"] == "fail"
    latency = next(v for v in out if "latency" in v["target"])
    assert latency["status"] == "fail" and latency["primary"] is True and "secondary" not in latency["target"]
