"""The guided demo: a small, real compression + evaluation of the embedded SmolLM2 that finishes in minutes on a CPU.

A manager following the demo wants to see the whole loop (compress, measure, compare, cost) without waiting the
half hour a full 210-layer run with a 2048-token evaluation takes on a laptop CPU. So the demo compresses only the
MLPs of six blocks and measures quality on fewer tokens; every number it shows is still measured, not assumed,
and its label says it is a demo on part of the model.
"""

from __future__ import annotations

from saten_core.plan import Plan, baseline_plan, reference_plan
from saten_core.spec import METHODS

DEMO_MODEL = "smollm2-135m"
DEMO_LAYERS = ["model.layers.2[0-5].mlp.*"]  # gate/up/down of blocks 20-25: 18 of 210 block linears
DEMO_SCOPE = "the MLPs of blocks 20-25 (18 of its 210 block linears)"  # DEMO_LAYERS in words
DEMO_TARGET = 0.7  # keep 70 % of those layers' bytes
DEMO_EVAL_TOKENS = 256  # held-out tokens for perplexity / KL / top-1 (the full evaluation uses 2048)
DEMO_CALIB_TOKENS = 512  # activation statistics for the calibrated method (a full run uses Plan().calib_tokens)


def demo_method() -> str:
    """The calibrated Saten variant when this build has it (far better quality at the same bytes), else Saten."""
    return "saten-aw" if "saten-aw" in METHODS else "saten"


def demo_plan() -> Plan:
    """Six blocks' MLPs at 70 % of their bytes; calibration on a short slice of the bundled corpus when used."""
    plan = Plan(method=demo_method(), target_ratio=DEMO_TARGET, include=list(DEMO_LAYERS))
    if plan.needs_calibration():
        plan.calib, plan.calib_tokens = "default", DEMO_CALIB_TOKENS
    return plan


def comparison_method() -> str:
    """The baseline the demo runs at the same bytes: Wanda, the strongest simple method measured on SmolLM2
    (docs/BENCHMARKS.md), so the demo shows whether Saten beats it rather than only that it runs."""
    return "wanda"


def submit_demo(model_ref: str = DEMO_MODEL) -> tuple[int, int, int]:
    """Queue (reference, baseline, demo) jobs, all evaluated on DEMO_EVAL_TOKENS; returns (reference, demo,
    baseline) ids.

    The reference job runs first so the Results and ROI pages have the original's measured latency to compare to;
    the baseline spends the demo's bytes on the same layers and text; the demo job is queued last, so it is the
    newest run the Results and ROI pages open on.
    """
    from saten_core import jobs

    plan = demo_plan()
    ref_id = jobs.submit(model_ref, reference_plan().to_json(), evaluate=True, tokens=DEMO_EVAL_TOKENS)
    other_id = jobs.submit(model_ref, baseline_plan(plan, comparison_method()).to_json(), evaluate=True,
                           tokens=DEMO_EVAL_TOKENS)
    demo_id = jobs.submit(model_ref, plan.to_json(), evaluate=True, tokens=DEMO_EVAL_TOKENS)
    return ref_id, demo_id, other_id
