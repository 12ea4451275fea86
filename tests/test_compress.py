"""compress_ on the tiny Llama: dry run == real bytes, reports, progress, cancel, exactness at full settings.

Run: .venv/bin/python -m pytest -q tests/test_compress.py
"""

from __future__ import annotations

import pytest
import torch

from saten_core.compress import Cancelled, compress_, totals
from saten_core.layer import SatenLinear
from saten_core.models import linear_layers, load_model
from saten_core.plan import Override, Plan, dry_run


def fp32_plan(**fields) -> Plan:
    """These tests compress fp32 models in memory and check bytes as stored, so their plans count at fp32."""
    return Plan(dtype="float32", **fields)

PLANS = [
    fp32_plan(method="saten", target_ratio=0.7),
    fp32_plan(method="saten", rank=4, density=0.05, overrides=[Override("*mlp*", rank=2, density=0.2)]),
    fp32_plan(method="saten", structure="2:4", target_ratio=0.9),
    fp32_plan(method="tt", rank=3, order=3),
    fp32_plan(method="svd", target_ratio=0.4, exclude=["*.0.*"]),
    fp32_plan(method="prune", density=0.3),
    fp32_plan(method="prune", structure="2:4"),
]


@pytest.fixture()
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.mark.parametrize("plan", PLANS, ids=range(len(PLANS)))
def test_dry_run_predicts_exact_bytes(llama, plan):
    rows = {r["name"]: r for r in dry_run(llama.model, plan)}
    reports = compress_(llama.model, plan)
    assert [r["name"] for r in reports] == [n for n, row in rows.items() if row["changed"]]
    for r in reports:
        assert r["bytes_after"] == rows[r["name"]]["predicted_bytes"]
        assert r["bytes_before"] == rows[r["name"]]["bytes_before"]
        layer = llama.model.get_submodule(r["name"])
        assert isinstance(layer, SatenLinear) and layer.stored_bytes() == r["bytes_after"]  # no bias in Llama
        assert r["spec"] == rows[r["name"]]["spec"]


def test_reports_are_complete_and_consistent(llama):
    x = torch.randint(0, 1000, (1, 12))
    calls = []
    reports = compress_(llama.model, fp32_plan(method="saten", target_ratio=0.6),
                        progress=lambda stage, frac, msg: calls.append((stage, frac, msg)))
    assert len(reports) == len(linear_layers(llama.model)) == 14
    for r in reports:
        out_f, in_f = r["shape"]
        assert r["params_before"] == in_f * out_f and r["macs_before"] == in_f * out_f
        assert 0 < r["bytes_after"] <= 0.6 * r["bytes_before"]
        assert 0 < r["params_after"] < r["params_before"] and r["macs_per_token"] > 0
        assert 0 < r["rel_error"] < 1 and r["seconds"] >= 0 and r["ranks"][0] == 1 and r["nnz"] > 0
    assert [c[1] for c in calls] == pytest.approx([(i + 1) / 14 for i in range(14)])
    assert all(stage == "compress" for stage, _, _ in calls)
    tot = totals(reports)
    assert tot["bytes_after"] == sum(r["bytes_after"] for r in reports) and tot["ratio"] <= 0.6
    assert torch.isfinite(llama.model(x).logits).all()
    assert compress_(llama.model, fp32_plan(method="saten", target_ratio=0.6)) == []  # nothing dense left to do


def test_full_rank_full_density_is_exact(llama):
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        before = llama.model(x).logits
    reports = compress_(llama.model, fp32_plan(method="saten", density=1.0))  # no cap, no eps: exact TT
    assert max(r["rel_error"] for r in reports) < 1e-5
    with torch.no_grad():
        after = llama.model(x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_error_never_grows_with_budget(tiny_llama_dir):
    errors = []
    for ratio in (0.3, 0.5, 0.7, 0.9):
        reports = compress_(load_model(str(tiny_llama_dir)).model, fp32_plan(method="saten", target_ratio=ratio))
        errors.append([r["rel_error"] for r in reports])
    for lower, higher in zip(errors, errors[1:], strict=False):
        assert all(h <= lo + 1e-6 for lo, h in zip(lower, higher, strict=True))


def test_should_stop_cancels_between_layers(llama):
    done = []
    with pytest.raises(Cancelled, match="3 of 14"):
        compress_(llama.model, fp32_plan(method="svd", rank=4), progress=lambda *a: done.append(a),
                  should_stop=lambda: len(done) >= 3)
    kinds = [type(m).__name__ for _, m in linear_layers(llama.model)]
    assert kinds.count("SatenLinear") == 3


def test_bad_plan_changes_nothing(llama):
    before = [type(m) for _, m in linear_layers(llama.model)]
    with pytest.raises(ValueError, match="k_proj.*rank 48"):  # k_proj is 64 -> 32: rank 48 only fits q/o/mlp
        compress_(llama.model, fp32_plan(method="svd", rank=48))
    assert [type(m) for _, m in linear_layers(llama.model)] == before
