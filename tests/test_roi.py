"""Cost model tests. Run: .venv/bin/python -m pytest -q tests/test_roi.py"""

from __future__ import annotations

import dataclasses

import pytest

from saten_core.roi import GIB, HOURS_PER_MONTH, Measured, RoiInputs, compute_roi, replicas_needed, roi_table


def _measured(**kw) -> Measured:
    base = dict(bytes_original=4 * GIB, bytes_compressed=2 * GIB, decode_s_original=0.02, decode_s_compressed=0.01,
                ppl_original=15.0, ppl_compressed=16.5, device="cpu")
    base.update(kw)
    return Measured(**base)


def test_faster_model_needs_fewer_replicas_and_saves_money():
    inputs = RoiInputs(current_replicas=4, engineering_days=10, day_rate=800)
    r = compute_roi(inputs, _measured())
    assert r.speedup == pytest.approx(2.0)
    assert r.compressed.replicas == 2 and r.original.replicas == 4
    gpu_month = inputs.gpu_price_per_hour * HOURS_PER_MONTH
    assert r.monthly_saving == pytest.approx(2 * gpu_month)
    assert r.payback_months == pytest.approx(8000 / (2 * gpu_month))
    assert r.compressed.memory_per_replica_gib == pytest.approx(2 + inputs.overhead_gib)
    assert r.ppl_ratio == pytest.approx(1.1)
    assert r.size_ratio == pytest.approx(0.5)


def test_slower_model_costs_more_and_never_pays_back():
    r = compute_roi(RoiInputs(current_replicas=3), _measured(decode_s_compressed=0.04))
    assert r.speedup < 1
    assert r.compressed.replicas == 6
    assert r.monthly_saving < 0 and r.payback_months is None


def test_cost_per_million_tokens_follows_traffic():
    inputs = RoiInputs(requests_per_day=1000, tokens_per_request=1000, current_replicas=1)
    r = compute_roi(inputs, _measured(decode_s_compressed=0.02))
    tokens_month = 1e6 * HOURS_PER_MONTH / 24
    assert r.original.cost_per_million_tokens == pytest.approx(r.original.monthly_cost / tokens_month * 1e6)


def test_model_bigger_than_gpu_takes_several_gpus():
    r = compute_roi(RoiInputs(gpu_memory_gib=16, overhead_gib=2, current_replicas=1),
                    _measured(bytes_original=40 * GIB, bytes_compressed=10 * GIB, decode_s_compressed=0.02))
    assert r.original.gpus_per_replica == 3 and r.compressed.gpus_per_replica == 1
    assert r.original.gpus == 3 and r.compressed.gpus == 1


def test_replicas_needed_rounds_up_and_keeps_one():
    assert replicas_needed(3, 1.5) == 2
    assert replicas_needed(3, 1.4) == 3
    assert replicas_needed(1, 10.0) == 1


@pytest.mark.parametrize("field,value", [("gpu_price_per_hour", 0), ("requests_per_day", -1),
                                         ("current_replicas", 0), ("current_replicas", 1.5), ("day_rate", -5),
                                         ("max_ppl_ratio", 0.99), ("max_payback_months", 0)])
def test_bad_inputs_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        compute_roi(dataclasses.replace(RoiInputs(), **{field: value}), _measured())


def test_bad_measurement_names_the_field():
    with pytest.raises(ValueError, match="decode_s_compressed"):
        compute_roi(RoiInputs(), _measured(decode_s_compressed=0))


def test_table_and_assumptions_mention_inputs():
    inputs = RoiInputs(gpu="NVIDIA T4 (16 GB)", overhead_gib=3)
    r = compute_roi(inputs, _measured())
    assert [row["metric"] for row in roi_table(r)][0].startswith("Memory per replica")
    text = " ".join(r.assumptions)
    assert "NVIDIA T4" in text and "3 GiB" in text and "cpu" in text


def _report_input(**kw):
    import pandas as pd

    from saten_core import charts
    from saten_core.report import ReportInput

    fig = charts.spectrum_chart(charts.spectrum_frame([3.0, 2.0, 1.0]), rank=2, title="Spectrum of q_proj")
    runs = pd.DataFrame({"run": ["job 1"], "method": ["saten"], "ppl": [16.5], "bytes": [2 * GIB]})
    base = dict(title="Saten PoC", run_label="job 1 <saten>", roi=compute_roi(RoiInputs(), _measured()),
                runs=runs, figures=[fig], caveats=["tiny demo run"])
    base.update(kw)
    return ReportInput(**base)


def test_markdown_report_has_table_assumptions_and_caveats():
    from saten_core.report import to_markdown

    md = to_markdown(_report_input())
    assert md.startswith("# Saten PoC")
    assert "| Memory per replica (GiB) |" in md and "| job 1 | saten | 16.5 |" in md
    assert "## Assumptions" in md and "tiny demo run" in md and "Spectrum of q_proj" in md
    assert "SLOWER" not in md


def test_html_report_is_self_contained_escaped_and_flags_slow_models():
    from saten_core.report import to_html

    slow = compute_roi(RoiInputs(), _measured(decode_s_compressed=0.05))
    page = to_html(_report_input(roi=slow))
    assert page.startswith("<!doctype html>") and "plotly" in page.lower()
    assert "job 1 &lt;saten&gt;" in page and "<saten>" not in page
    assert "SLOWER" in page and "slower than the original" in page


def test_measured_from_run_counts_the_whole_model_and_needs_a_reference():
    """A run that changed 100 B of a 1000 B model to 60 B leaves a 960 B model, not a 60% one."""
    from saten_core.roi import measured_from_run

    run = {"id": 2, "bytes_before": 100, "bytes_after": 60, "decode_ms": 12.0, "decode_ms_original": 10.0,
           "ppl": 17.0, "ppl_original": float("nan"), "device": "cpu", "model_bytes_before": 1000}
    m = measured_from_run(run)
    assert (m.bytes_original, m.bytes_compressed) == (1000, 960)
    assert m.decode_s_compressed == pytest.approx(0.012) and m.ppl_original is None
    legacy = {**run, "model_bytes_before": float("nan")}
    assert measured_from_run(legacy, model_bytes=140).bytes_compressed == 100
    with pytest.raises(ValueError, match="whole-model size"):
        measured_from_run(legacy)
    with pytest.raises(ValueError, match="fewer than"):
        measured_from_run(legacy, model_bytes=50)
    with pytest.raises(ValueError, match="decode_ms_original"):
        measured_from_run({**run, "decode_ms_original": None})


def test_dollars_puts_the_minus_before_the_currency_sign():
    from saten_core.report import dollars

    assert (dollars(-584.2), dollars(1234.0), dollars(0.0)) == ("-$584", "$1,234", "$0")


def test_roi_opens_on_the_newest_run_it_can_compute():
    """An unevaluated newest run has no decode time; the page's default skips it, and says why it would fail."""
    from saten_core.roi import default_run, missing_measurement

    done = {"id": 3, "bytes_before": 100, "bytes_after": 60, "decode_ms": 12.0, "decode_ms_original": 10.0}
    unevaluated = {**done, "id": 5, "decode_ms": float("nan")}
    no_reference = {**done, "id": 4, "decode_ms_original": None}
    assert missing_measurement(done) is None
    assert "run 5 has no measured decode_ms" == missing_measurement(unevaluated)
    assert "reference job" in missing_measurement(no_reference)
    assert default_run([unevaluated, no_reference, done]) == 2
    assert default_run([done, unevaluated]) == 0
    assert default_run([unevaluated, no_reference]) == 0  # none can: the newest, whose error names the reason


def test_go_needs_quality_within_the_limit_and_payback_in_time():
    """2x faster on 4 replicas saves 2 GPUs (~$1168/month): 8000 $ of work pays back in ~6.8 months."""
    inputs = RoiInputs(current_replicas=4, max_ppl_ratio=1.2, max_payback_months=12)
    go = compute_roi(inputs, _measured())  # ppl 1.1x
    assert go.go and all("(met)" in line for line in go.criteria)
    strict = compute_roi(dataclasses.replace(inputs, max_ppl_ratio=1.05), _measured())
    assert not strict.go and "1.100x the original, limit 1.050x (MISSED)" in strict.criteria[0]
    impatient = compute_roi(dataclasses.replace(inputs, max_payback_months=6), _measured())
    assert not impatient.go and "limit 6 months (MISSED)" in impatient.criteria[1]
    slower = compute_roi(inputs, _measured(decode_s_compressed=0.04))
    assert not slower.go and "never (no saving)" in slower.criteria[1]
    unmeasured = compute_roi(inputs, _measured(ppl_compressed=None))
    assert not unmeasured.go and "not measured" in unmeasured.criteria[0]


def test_reports_state_the_decision_first():
    from saten_core.report import decision_line, to_html, to_markdown

    go = compute_roi(RoiInputs(current_replicas=4, max_ppl_ratio=1.2), _measured())
    assert decision_line(go).startswith("Decision: GO for this PoC (quality: perplexity 1.100x")
    md = to_markdown(_report_input(roi=go))
    assert md.index("Decision: GO") < md.index("Model size:")
    assert "Decision: NO-GO" in to_html(_report_input(roi=compute_roi(RoiInputs(), _measured())))
