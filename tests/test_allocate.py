"""Allocator: byte target met within one layer's granularity and never exceeded; beats uniform on its objective.

Run: .venv/bin/python -m pytest -q tests/test_allocate.py
"""

from __future__ import annotations

import numpy as np
import pytest

from saten_core.allocate import allocate_plan, greedy, lower_hull
from saten_core.plan import Override, Plan, dry_run, dry_run_totals
from saten_core.preview import preview


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from saten_core.models import load_model
    from saten_core.spectrum import model_spectra

    loaded = load_model(str(tiny_llama_dir))
    return loaded, model_spectra(loaded.model, device="cpu")


def _weight_bytes(model, plan):
    rows = dry_run(model, plan)
    dense = sum(r["bytes_before"] for r in rows)  # tiny llama: no biases
    return dense, dry_run_totals(rows)["predicted_bytes"], rows


@pytest.mark.parametrize("method,structure,ratio", [("saten", "unstructured", 0.8), ("saten", "unstructured", 0.5),
                                                    ("svd", "unstructured", 0.6), ("tt", "unstructured", 0.4),
                                                    ("prune", "unstructured", 0.7), ("saten", "2:4", 0.9)])
def test_allocation_meets_target_within_one_layer(tiny, method, structure, ratio):
    loaded, spectra = tiny
    plan = Plan(method=method, structure=structure, target_ratio=ratio)
    out = allocate_plan(loaded, plan, spectra=spectra)
    assert out.target_ratio is None and out.method == method
    dense, after, rows = _weight_bytes(loaded.model, out)
    budget = int(ratio * dense)
    assert after <= budget
    largest_layer = max(r["bytes_before"] for r in rows)
    assert budget - after <= largest_layer
    names = {r["name"] for r in rows}
    assert {o.pattern for o in out.overrides} == names  # one exact-name override per layer
    assert Plan.from_json(out.to_json()) == out  # an ordinary, editable plan


def test_allocation_beats_uniform_on_predicted_error(tiny):
    loaded, spectra = tiny
    uniform = Plan(method="saten", target_ratio=0.6)
    dense, uniform_bytes, _ = _weight_bytes(loaded.model, uniform)
    allocated = allocate_plan(loaded, uniform, spectra=spectra)
    _, alloc_bytes, _ = _weight_bytes(loaded.model, allocated)
    err = lambda p: sum(r["predicted_rel_error"] ** 2 for r in preview(p, spectra)["layers"])
    assert alloc_bytes <= int(0.6 * dense)
    assert err(allocated) <= err(uniform)


def test_skip_override_and_excluded_layers_stay_dense(tiny):
    loaded, spectra = tiny
    plan = Plan(method="svd", target_ratio=0.7, exclude=["*.o_proj"], overrides=[Override("*.q_proj", skip=True)])
    out = allocate_plan(loaded, plan, spectra=spectra)
    dense, after, rows = _weight_bytes(loaded.model, out)
    assert after <= int(0.7 * dense)
    for r in rows:
        if r["name"].endswith(("o_proj", "q_proj")):
            assert not r["changed"]


def test_too_small_target_and_missing_target_raise(tiny):
    loaded, spectra = tiny
    with pytest.raises(ValueError, match="budget"):
        allocate_plan(loaded, Plan(method="saten", structure="2:4", target_ratio=0.2), spectra=spectra)
    with pytest.raises(ValueError, match="target ratio"):
        allocate_plan(loaded, Plan(method="svd", rank=4), spectra=spectra)


def test_lower_hull_and_greedy_on_a_toy():
    nbytes = np.array([1.0, 2.0, 3.0, 4.0, 2.0])
    err = np.array([10.0, 6.0, 5.0, 0.0, 9.0])
    assert lower_hull(nbytes, err) == [0, 1, 3]  # (3, 5) lies above the segment (2, 6) -> (4, 0)
    cands = [{"bytes": nbytes, "err": err}, {"bytes": np.array([1.0, 5.0]), "err": np.array([4.0, 0.0])}]
    chosen = greedy(cands, budget=6.0)
    used = sum(c["bytes"][k] for c, k in zip(cands, chosen, strict=True))
    assert used <= 6.0
    assert chosen[0] == 3 and chosen[1] == 0  # best error under 6 bytes: 0 + 4 at 4 + 1 bytes


def test_cli_plan_allocate(tiny_llama_dir, tmp_path):
    from saten_core.__main__ import main
    from saten_core.models import load_model

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_llama_dir), "--method", "saten", "--target-ratio", "0.7",
                 "--allocate", "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text())
    assert plan.target_ratio is None and plan.overrides
    dense, after, _ = _weight_bytes(load_model(str(tiny_llama_dir)).model, plan)
    assert after <= int(0.7 * dense)
