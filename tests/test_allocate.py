"""Allocator: byte target met within one layer's granularity and never exceeded; beats uniform on its objective.

Run: .venv/bin/python -m pytest -q tests/test_allocate.py
"""

from __future__ import annotations

import numpy as np
import pytest

from saten_core.allocate import allocate_plan, greedy, layer_weight, lower_hull, weighted
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
    sizes = {layer["name"]: layer_weight(layer) for layer in spectra["layers"]}
    err = lambda p: sum(sizes[r["name"]] * r["predicted_rel_error"] ** 2 for r in preview(p, spectra)["layers"])
    assert alloc_bytes <= int(0.6 * dense)
    assert err(allocated) <= err(uniform)


def test_objective_counts_every_weight_once():
    """A layer twice the size weighs twice: with equal error curves the bigger layer gets the contested step."""
    layers = [{"in_features": 4, "out_features": 4}, {"in_features": 4, "out_features": 8}]
    assert [layer_weight(x) for x in layers] == [16.0, 32.0]
    curve = {"bytes": np.array([1.0, 3.0]), "err": np.array([1.0, 0.5]), "settings": [(1, 0.0), (2, 0.0)]}
    cands = [weighted(curve, layer_weight(x)) for x in layers]
    assert greedy(cands, budget=4.0) == [0, 1]  # one upgrade fits: it goes to the 32-weight layer
    assert greedy([curve, curve], budget=4.0) == [1, 0]  # equal weights: a tie, the first layer wins


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


def _narrow_input_stats(model, narrow: str, k: int = 2) -> dict:
    """Synthetic calibration statistics: layer `narrow` sees inputs spanning only k directions, others white."""
    import torch

    from saten_core.calibrate import InputStats
    from saten_core.models import linear_layers

    gen = torch.Generator().manual_seed(1)
    stats = {}
    for name, lin in linear_layers(model):
        n = lin.in_features
        x = torch.randn(512, k if name == narrow else n, generator=gen, dtype=torch.float64)
        if name == narrow:
            x = x @ torch.randn(k, n, generator=gen, dtype=torch.float64)
        stats[name] = InputStats(x.T @ x, 512)
    return stats


NARROW = "model.layers.0.mlp.down_proj"


def test_activation_spectra_are_the_whitened_weights_spectra(tiny):
    import torch

    from saten_core.allocate import activation_spectra
    from saten_core.calibrate import whitening_factor

    loaded, plain = tiny
    stats = _narrow_input_stats(loaded.model, NARROW)
    del stats["model.layers.1.self_attn.q_proj"]  # a layer without statistics keeps its own spectrum
    spectra = activation_spectra(loaded, Plan(method="saten-aw", target_ratio=0.5), stats=stats)
    got = {layer["name"]: layer for layer in spectra["layers"]}
    w = loaded.model.get_submodule(NARROW).weight.detach()
    want = torch.linalg.svdvals((w.double() @ whitening_factor(stats[NARROW])).float())
    assert np.allclose(got[NARROW]["singular_values"], want.numpy(), rtol=1e-4, atol=1e-6)
    assert got[NARROW]["rank_at_energy"]["0.95"] <= 2  # k = 2 input directions carry the output
    q = next(layer for layer in plain["layers"] if layer["name"] == "model.layers.1.self_attn.q_proj")
    assert got[q["name"]]["singular_values"] == q["singular_values"]
    with pytest.raises(ValueError, match="'saten'"):
        activation_spectra(loaded, Plan(method="saten", target_ratio=0.5), stats=stats)


@pytest.mark.parametrize("method", ["saten-aw", "svd-w", "wanda"])
def test_activation_aware_allocation_spends_less_on_a_layer_with_narrow_inputs(tiny, method):
    """Output error, not weight error: a layer whose inputs span 2 directions needs few bytes to keep its outputs."""
    from saten_core.allocate import activation_spectra

    loaded, plain = tiny
    plan = Plan(method=method, target_ratio=0.5)
    stats = _narrow_input_stats(loaded.model, NARROW)
    aware = allocate_plan(loaded, plan, spectra=activation_spectra(loaded, plan, stats=stats))
    proxy = allocate_plan(loaded, plan, spectra=plain)  # weight spectra as given (the page's cached spectra)
    dense, after, rows = _weight_bytes(loaded.model, aware)
    assert after <= int(0.5 * dense)
    narrow_bytes = lambda p: next(r["predicted_bytes"] for r in dry_run(loaded.model, p) if r["name"] == NARROW)
    assert narrow_bytes(aware) < narrow_bytes(proxy)


def test_cli_plan_allocate_activation_aware_keeps_calibration_settings(tiny_llama_dir, tmp_path):
    from saten_core.__main__ import main
    from saten_core.models import load_model

    out = tmp_path / "aw.json"
    assert main(["plan", "--model", str(tiny_llama_dir), "--method", "saten-aw", "--target-ratio", "0.6",
                 "--calib-tokens", "512", "--allocate", "--out", str(out)]) == 0
    plan = Plan.from_json(out.read_text())
    assert plan.method == "saten-aw" and plan.calib_tokens == 512 and plan.target_ratio is None
    dense, after, _ = _weight_bytes(load_model(str(tiny_llama_dir)).model, plan)
    assert after <= int(0.6 * dense)
