"""Preview: exact bytes and MACs against real compression on the tiny Llama; error model sanity.

Run: .venv/bin/python -m pytest -q tests/test_preview.py
"""

from __future__ import annotations

import pytest

from saten_core.plan import Override, Plan
from saten_core.preview import preview

PLANS = [
    Plan(method="saten", rank=6, density=0.05),
    Plan(method="saten", rank=3, structure="2:4"),
    Plan(method="tt", rank=5),
    Plan(method="svd", rank=9),
    Plan(method="prune", density=0.3),
    Plan(method="saten", target_ratio=0.6, overrides=[Override(pattern="*.o_proj", skip=True)]),
    Plan(method="saten", eps=0.5, density=0.02),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from saten_core.models import load_model
    from saten_core.spectrum import model_spectra

    model = load_model(str(tiny_llama_dir)).model
    return tiny_llama_dir, model_spectra(model, device="cpu")


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.method}-{p.structure}-{p.rank}-{p.eps}-{p.target_ratio}")
def test_preview_matches_real_compression(tiny, plan):
    from saten_core.compress import compress_
    from saten_core.models import load_model

    folder, spectra = tiny
    rows = {r["name"]: r for r in preview(plan, spectra)["layers"]}
    model = load_model(str(folder)).model
    reports = compress_(model, plan)
    assert reports
    for rep in reports:
        row = rows[rep["name"]]
        if row["bytes_exact"]:
            assert row["predicted_bytes"] == rep["bytes_after"]
            assert row["macs_per_token"] == rep["macs_per_token"]
            assert row["ranks"] == rep["ranks"]
        assert row["bytes_before"] == rep["bytes_before"]
        assert row["predicted_rel_error"] == pytest.approx(rep["rel_error"], abs=0.25)  # random weights: loose
        if plan.method == "svd":  # Eckart-Young (tt.py may use a randomized SVD, so not to the last digit)
            assert row["predicted_rel_error"] == pytest.approx(rep["rel_error"], rel=1e-2)
    changed = {r["name"] for r in reports}
    for name, row in rows.items():
        if name not in changed:
            assert row["spec"] is None and row["predicted_bytes"] == row["bytes_before"]


def test_preview_error_falls_as_rank_grows(tiny):
    _, spectra = tiny
    errs = [preview(Plan(method="tt", rank=r), spectra)["totals"]["rel_error_rms"] for r in (1, 2, 4, 8, 16, 32)]
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]


def test_preview_bad_plan_raises(tiny):
    _, spectra = tiny
    with pytest.raises(ValueError, match="1.5"):
        preview(Plan(method="saten", density=1.5), spectra)
