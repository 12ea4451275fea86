"""Plan JSON round trip, validation, override resolution and target-ratio fitting.

Run: .venv/bin/python -m pytest -q tests/test_plan.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from saten_core.build import heal_config
from saten_core.plan import Override, Plan, dense_weight_bytes, dry_run, dry_run_totals, layer_spec
from saten_core.spec import LayerSpec

PLANS = [
    Plan(),
    Plan(method="saten", rank=8, density=0.1),
    Plan(method="saten", eps=0.3, density=0.05, structure="unstructured"),
    Plan(method="saten", target_ratio=0.8, lowrank_share=0.25),
    Plan(method="saten", structure="2:4", target_ratio=0.9),
    Plan(method="tt", rank=4, order=3),
    Plan(method="tt", eps=0.5),
    Plan(method="svd", rank=16, include=["*mlp*"], exclude=["*down_proj"]),
    Plan(method="svd", target_ratio=0.5),
    Plan(method="prune", density=0.3),
    Plan(method="prune", structure="2:4"),
    Plan(method="prune", target_ratio=0.6),
    Plan(method="saten", rank=4, density=0.2,
         overrides=[Override("*.0.*", rank=2), Override("*q_proj", eps=0.1, density=0.0),
                    Override("*v_proj", skip=True)]),
    Plan(method="saten-aw", target_ratio=0.5, lowrank_share=0.1, calib="default", calib_tokens=1024,
         heal_steps=50, heal_lr=3e-4, heal_seq_len=128, heal_batch_size=2, heal_tokens=4096, heal_eval_tokens=512,
         heal_eval_every=5, heal_lm_weight=0.5, heal_core_lr_scale=0.1),
    Plan(method="saten-aw", target_ratio=0.5, heal_steps=4, heal_core_lr_scale=0),
    Plan(method="svd-w", rank=16, calib="/data/my text.txt", calib_seq_len=256),
    Plan(method="wanda", structure="2:4", heal_steps=10),
    Plan(method="saten", target_ratio=0.7, mask_group="row"),
    Plan(method="wanda", density=0.4, mask_group="layer"),
]


@pytest.mark.parametrize("plan", PLANS, ids=range(len(PLANS)))
def test_json_round_trip(plan):
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


@pytest.mark.parametrize("bad, word", [
    ({"method": "zip"}, "zip"),
    ({"structure": "3:4"}, "3:4"),
    ({"rank": 0}, "0"),
    ({"density": 1.5}, "1.5"),
    ({"density": -0.1}, "-0.1"),
    ({"eps": 1.0}, "1.0"),
    ({"target_ratio": 0.0}, "0.0"),
    ({"target_ratio": 1.2}, "1.2"),
    ({"target_ratio": 0.5, "rank": 4}, "rank"),
    ({"target_ratio": 0.5, "density": 0.25}, "0.25"),
    ({"lowrank_share": 0.0}, "0.0"),
    ({"mask_group": "column"}, "column"),
    ({"colour": "red"}, "colour"),
    ({"overrides": [{"pattern": "*", "rank": -3}]}, "-3"),
    ({"overrides": [{"pattern": "*", "sizzle": 1}]}, "sizzle"),
    ({"overrides": [{"pattern": "", "rank": 2}]}, "pattern"),
    ({"include": "*"}, "include"),
    ({"calib": ""}, "calib"),
    ({"calib": 3}, "calib"),
    ({"calib_tokens": 0}, "calib_tokens"),
    ({"calib_tokens": 2.5}, "2.5"),
    ({"heal_steps": -1}, "-1"),
    ({"heal_steps": True}, "heal_steps"),
    ({"heal_lr": 0}, "heal_lr"),
    ({"heal_seq_len": 0}, "heal_seq_len"),
    ({"heal_lm_weight": -1.0}, "heal_lm_weight"),
    ({"heal_core_lr_scale": -0.5}, "-0.5"),
    ({"heal_core_lr_scale": "fast"}, "heal_core_lr_scale"),
    ({"method": "svd-w", "rank": 4, "heal_steps": 5, "heal_core_lr_scale": 0}, "nothing would heal"),
    ({"method": "tt", "rank": 4, "heal_steps": 5, "heal_core_lr_scale": 0}, "nothing would heal"),
])
def test_bad_plans_name_the_value(bad, word):
    with pytest.raises(ValueError, match=None) as info:
        Plan.from_json(json.dumps(bad))
    assert word in str(info.value)


def test_from_json_rejects_non_object():
    with pytest.raises(ValueError, match="object"):
        Plan.from_json("[1, 2]")


def test_include_exclude_and_last_override_wins():
    plan = Plan(method="saten", rank=8, density=0.1, include=["*mlp*", "*q_proj"], exclude=["*.1.*"],
                overrides=[Override("*up_proj", rank=4), Override("*.0.mlp.up_proj", density=0.3),
                           Override("*gate_proj", skip=True)])
    f32 = torch.float32
    assert layer_spec(plan, "model.layers.0.self_attn.k_proj", 64, 32, f32) is None  # not included
    assert layer_spec(plan, "model.layers.1.mlp.up_proj", 64, 128, f32) is None  # excluded
    assert layer_spec(plan, "model.layers.0.mlp.gate_proj", 64, 128, f32) is None  # skip override
    # the later, more specific override wins entirely: density from it, rank back to the plan's
    assert layer_spec(plan, "model.layers.0.mlp.up_proj", 64, 128, f32) == LayerSpec("saten", 8, None, 0.3)
    assert layer_spec(plan, "model.layers.2.mlp.up_proj", 64, 128, f32) == LayerSpec("saten", 4, None, 0.1)
    assert layer_spec(plan, "model.layers.0.self_attn.q_proj", 64, 64, f32) == LayerSpec("saten", 8, None, 0.1)


def test_eps_override_replaces_rank():
    plan = Plan(method="tt", rank=8, overrides=[Override("*q_proj", eps=0.2)])
    assert layer_spec(plan, "a.0.q_proj", 64, 64, torch.float32) == LayerSpec("tt", None, 0.2, 0.0)


def test_method_semantics():
    f32 = torch.float32
    assert layer_spec(Plan(method="svd", rank=3), "x.0.y", 64, 64, f32).order == 1
    assert layer_spec(Plan(method="tt", rank=3, density=0.4), "x.0.y", 64, 64, f32).density == 0.0
    pruned = layer_spec(Plan(method="prune", density=0.4, rank=None), "x.0.y", 64, 64, f32)
    assert (pruned.rank, pruned.density) == (None, 0.4)
    assert layer_spec(Plan(method="prune", structure="2:4"), "x.0.y", 64, 64, f32).density == 0.5


def test_shape_checks_name_layer_and_value():
    with pytest.raises(ValueError, match=r"layers\.0\.k_proj.*rank 40"):
        layer_spec(Plan(rank=40), "layers.0.k_proj", 64, 32, torch.float32)
    with pytest.raises(ValueError, match="130"):
        layer_spec(Plan(method="prune", structure="2:4"), "layers.0.down_proj", 130, 64, torch.float32)


SHAPES = [(64, 128), (128, 64), (64, 32), (576, 1536), (96, 80)]
TARGETS = [
    Plan(method="saten", target_ratio=0.8),
    Plan(method="saten", target_ratio=0.4, lowrank_share=0.25),
    Plan(method="saten", target_ratio=0.95, structure="2:4"),
    Plan(method="saten", target_ratio=0.7, overrides=[Override("*", density=0.05)]),
    Plan(method="saten", target_ratio=0.7, overrides=[Override("*", rank=2)]),
    Plan(method="tt", target_ratio=0.5),
    Plan(method="svd", target_ratio=0.3),
    Plan(method="prune", target_ratio=0.6),
    Plan(method="wanda", target_ratio=0.55),
    Plan(method="saten-aw", target_ratio=0.8),
    Plan(method="saten", target_ratio=0.6, mask_group="row"),
]


@pytest.mark.parametrize("plan", TARGETS, ids=range(len(TARGETS)))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_target_ratio_never_exceeds_budget_and_is_tight(plan, shape, dtype):
    """The chosen spec fits the layer's budget, and one step more of the free knob would not."""
    from saten_core.layer import predict_bytes

    n_in, n_out = shape
    budget = plan.target_ratio * dense_weight_bytes(n_in, n_out, dtype)
    spec = layer_spec(plan, "m.layers.0.proj", n_in, n_out, dtype)
    got = predict_bytes(n_in, n_out, spec, dtype)
    assert got <= budget
    if plan.method in ("svd", "tt") and spec.rank < min(n_in, n_out):
        bigger = predict_bytes(n_in, n_out, LayerSpec(**{**spec.to_dict(), "rank": spec.rank + 1}), dtype)
        assert bigger > budget or bigger == got  # rank cap saturated the bonds
    density_free = plan.structure != "2:4" and not any(o.density is not None for o in plan.overrides)
    if plan.method in ("saten", "prune", "wanda", "saten-aw") and density_free and spec.density < 1.0:
        unit = n_in if spec.group == "row" else n_in * n_out  # one more entry per row, or in the layer
        step = LayerSpec(**{**spec.to_dict(), "density": min(1.0, spec.density + 1.0 / unit)})
        assert predict_bytes(n_in, n_out, step, dtype) > budget


def test_target_ratio_2_4_too_small_says_so():
    with pytest.raises(ValueError, match="2:4.*50%"):
        layer_spec(Plan(method="saten", structure="2:4", target_ratio=0.4), "a.0.b", 64, 64, torch.float32)
    with pytest.raises(ValueError, match="0.4"):
        layer_spec(Plan(method="prune", structure="2:4", target_ratio=0.4), "a.0.b", 64, 64, torch.float32)


def test_target_ratio_too_small_for_rank_one():
    with pytest.raises(ValueError, match="target_ratio 0.001"):
        layer_spec(Plan(method="svd", target_ratio=0.001), "a.0.b", 64, 64, torch.float32)


def test_dry_run_leaves_model_untouched(tiny_llama_dir):
    from saten_core.models import linear_layers, load_model

    loaded = load_model(str(tiny_llama_dir))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    plan = Plan(method="saten", target_ratio=0.7, exclude=["*.1.*"])
    rows = dry_run(loaded.model, plan)
    assert [r["name"] for r in rows] == [n for n, _ in linear_layers(loaded.model)]
    assert all(r["changed"] == (".1." not in r["name"]) for r in rows)
    for r in rows:
        assert r["predicted_bytes"] <= r["bytes_before"] * (0.7 if r["changed"] else 1.0)
    tot = dry_run_totals(rows)
    assert tot["layers_changed"] == len(rows) // 2 and tot["predicted_bytes"] < tot["bytes_before"]
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_needs_calibration():
    assert not Plan().needs_calibration()
    assert Plan(method="wanda", density=0.5).needs_calibration()
    assert Plan(method="saten", rank=4, heal_steps=1).needs_calibration()


def test_ratio_for_model_bytes_leaves_the_rest_of_the_model_alone(tiny_llama_dir):
    from saten_core.models import linear_layers, load_model, parameter_bytes
    from saten_core.plan import ratio_for_model_bytes

    model = load_model(str(tiny_llama_dir)).model
    linear = sum(lin.weight.numel() * lin.weight.element_size() for _, lin in linear_layers(model))
    fixed = parameter_bytes(model) - linear
    assert ratio_for_model_bytes(model, fixed + linear // 2) == pytest.approx(0.5, abs=1e-6)
    for bad in (fixed, fixed - 1, fixed + linear, 1.5):
        with pytest.raises(ValueError, match="target bytes"):
            ratio_for_model_bytes(model, bad)


@pytest.mark.parametrize("plan, group", [
    (Plan(method="wanda", density=0.5), "row"),
    (Plan(method="saten-aw", rank=4, density=0.1), "row"),
    (Plan(method="saten", rank=4, density=0.1), "layer"),
    (Plan(method="prune", density=0.5), "layer"),
    (Plan(method="wanda", structure="2:4"), "layer"),  # 2:4 has its own groups of four
    (Plan(method="saten", rank=4, density=0.1, mask_group="row"), "row"),
    (Plan(method="wanda", density=0.5, mask_group="layer"), "layer"),
])
def test_mask_group_auto_is_per_row_for_activation_scored_masks(plan, group):
    assert layer_spec(plan, "m.layers.0.proj", 64, 32, torch.float32).group == group


def test_plan_json_without_mask_group_still_loads():
    legacy = json.loads(Plan(method="wanda", density=0.5).to_json())
    del legacy["mask_group"]
    assert Plan.from_json(json.dumps(legacy)).mask_group == "auto"


def test_plan_json_without_heal_core_lr_scale_heals_cores_at_the_plain_lr():
    legacy = json.loads(Plan(method="saten-aw", target_ratio=0.5, heal_steps=8).to_json())
    del legacy["heal_core_lr_scale"]
    plan = Plan.from_json(json.dumps(legacy))
    assert plan.heal_core_lr_scale == 1.0
    assert heal_config(plan).core_lr_scale == 1.0
    assert heal_config(replace(plan, heal_core_lr_scale=0.25)).core_lr_scale == 0.25


def test_baseline_plan_keeps_budget_layers_text_and_healing_but_not_the_allocation():
    from saten_core.plan import baseline_plan

    plan = Plan(method="saten-aw", target_ratio=0.5, lowrank_share=0.2, fit_rounds=3, mask_group="layer",
                exclude=["*.v_proj"], calib="my.txt", heal_steps=8, heal_lr=3e-4,
                overrides=[Override("*.0.*", rank=4, density=0.1), Override("*.1.*", skip=True)])
    wanda = baseline_plan(plan, "wanda")
    assert (wanda.method, wanda.target_ratio, wanda.exclude, wanda.calib, wanda.heal_steps, wanda.heal_lr) == \
        ("wanda", 0.5, ["*.v_proj"], "my.txt", 8, 3e-4)
    assert wanda.overrides == [Override("*.1.*", skip=True)]
    assert (wanda.lowrank_share, wanda.fit_rounds, wanda.mask_group) == (None, None, "auto")
    saten = baseline_plan(plan, "saten")
    assert (saten.lowrank_share, saten.fit_rounds) == (0.2, 3)  # same storage: the split carries over
    data_free = baseline_plan(replace(plan, heal_steps=0), "svd")
    assert data_free.calib is None  # reads no text, so it names none
    two_four = replace(plan, structure="2:4")
    assert baseline_plan(two_four, "tt").structure == "unstructured"
    assert baseline_plan(two_four, "wanda").structure == "2:4"


@pytest.mark.parametrize("plan, method, match", [
    (Plan(method="saten", rank=8, density=0.1), "wanda", "byte budget"),
    (Plan(method="saten", target_ratio=0.5), "magic", "magic"),
    (Plan(method="saten-aw", target_ratio=0.5, heal_steps=4, heal_core_lr_scale=0.0), "svd", "nothing would heal"),
])
def test_baseline_plan_refuses_what_cannot_be_compared(plan, method, match):
    from saten_core.plan import baseline_plan

    with pytest.raises(ValueError, match=match):
        baseline_plan(plan, method)


def test_budget_ratio_measures_a_plan_without_a_target_on_the_changed_layers(tiny_llama_dir):
    """A baseline at budget_ratio spends what the plan's changed layers spend (skipped layers count on neither)."""
    from saten_core.models import load_model
    from saten_core.plan import baseline_plan, budget_ratio

    model = load_model(str(tiny_llama_dir)).model
    assert budget_ratio(model, Plan(method="saten", target_ratio=0.7)) == 0.7
    fixed = Plan(method="saten", rank=2, density=0.1, overrides=[Override("*.1.*", skip=True)])
    ratio = budget_ratio(model, fixed)
    rows = [r for r in dry_run(model, fixed) if r["changed"]]
    assert ratio == pytest.approx(sum(r["predicted_bytes"] for r in rows) / sum(r["bytes_before"] for r in rows))
    assert 0 < ratio < 0.5
    wanda = dry_run_totals(dry_run(model, baseline_plan(fixed, "prune", ratio)))
    assert wanda["predicted_bytes"] == pytest.approx(dry_run_totals(dry_run(model, fixed))["predicted_bytes"], rel=0.02)
    with pytest.raises(ValueError, match="error-bound"):
        budget_ratio(model, Plan(method="saten", eps=0.3))
    with pytest.raises(ValueError, match="changes no layer"):
        budget_ratio(model, Plan(exclude=["*"]))
