"""The guided demo's plans: small enough for minutes on a CPU, honest about touching only part of the model.

Run: .venv/bin/python -m pytest -q tests/test_demo.py
"""

from __future__ import annotations

from saten_core import demo
from saten_core.plan import Plan, selected


def test_demo_plan_touches_only_the_named_layers_and_round_trips():
    plan = demo.demo_plan()
    assert Plan.from_json(plan.to_json()) == plan
    names = [f"model.layers.{b}.{part}" for b in range(30) for part in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    chosen = [n for n in names if selected(plan, n)]
    assert len(chosen) == 18 and all(".mlp." in n and 20 <= int(n.split(".")[2]) <= 25 for n in chosen)
    assert "18 of its 210" in demo.DEMO_SCOPE
    if plan.needs_calibration():
        assert plan.calib == "default" and plan.calib_tokens == demo.DEMO_CALIB_TOKENS


def test_reference_plan_changes_nothing():
    assert not any(selected(demo.reference_plan(), n) for n in ("model.layers.0.mlp.up_proj", "x"))


def test_submit_demo_queues_reference_baseline_then_demo_with_short_evaluation():
    from saten_core import jobs

    ref_id, demo_id, other_id = demo.submit_demo()
    try:
        ref, run, other = jobs.get_job(ref_id), jobs.get_job(demo_id), jobs.get_job(other_id)
        assert ref_id < other_id < demo_id  # the demo is the newest run: Results and ROI open on it
        assert ref.model_ref == run.model_ref == other.model_ref == demo.DEMO_MODEL
        assert all(j.evaluate and j.eval_tokens == demo.DEMO_EVAL_TOKENS for j in (ref, run, other))
        assert Plan.from_json(run.plan_json) == demo.demo_plan()
        baseline = Plan.from_json(other.plan_json)
        assert (baseline.method, baseline.target_ratio, baseline.include) == \
            ("wanda", demo.DEMO_TARGET, demo.DEMO_LAYERS)
        assert (baseline.calib, baseline.calib_tokens) == ("default", demo.DEMO_CALIB_TOKENS)
    finally:
        for i in (ref_id, demo_id, other_id):
            jobs.request_cancel(i)
