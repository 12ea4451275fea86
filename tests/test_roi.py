"""Cost model tests. Run: .venv/bin/python -m pytest -q tests/test_roi.py"""

from __future__ import annotations

import dataclasses

import pytest

from saten_core.roi import (
    GIB,
    GPU_CATALOG,
    HOURS_PER_MONTH,
    NO_DIFFERENCE,
    Measured,
    RoiInputs,
    compute_roi,
    compute_roi_terms,
    replicas_needed,
    roi_table,
)


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
    base = dict(title="Saten PoC", run_label="job 1 <saten>", terms=compute_roi_terms(RoiInputs(), _measured()),
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

    slow = compute_roi_terms(RoiInputs(), _measured(decode_s_compressed=0.05))
    page = to_html(_report_input(terms=slow))
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

    go = compute_roi_terms(RoiInputs(current_replicas=4, max_ppl_ratio=1.2), _measured())
    assert decision_line(go.short).startswith("Decision: GO for this PoC (quality: perplexity 1.100x")
    md = to_markdown(_report_input(terms=go))
    assert md.index("Decision: GO") < md.index("Model size:")
    assert "Decision: NO-GO" in to_html(_report_input(terms=compute_roi_terms(RoiInputs(), _measured())))


def _deployed(**kw) -> Measured:
    """A bf16 run measured the new way: resident memory, side-by-side ratio, multiply-adds (all injected)."""
    base = dict(bytes_original=1000 * 2**20, bytes_compressed=600 * 2**20, ppl_original=15.0, ppl_compressed=15.3,
                device="cpu", dtype="bfloat16", resident_bytes_original=1000 * 2**20,
                resident_bytes_compressed=1400 * 2**20, decode_ratio=0.5, decode_ratio_min=0.45,
                decode_ratio_max=0.55, ratio_reference="float32", ratio_rounds=5, changed_bytes_original=800 * 2**20,
                macs_original=400 * 2**20, macs_compressed=150 * 2**20)
    base.update(kw)
    return Measured(**base)


def test_short_term_memory_is_the_resident_bytes_and_mid_term_the_stored_bytes():
    """A compressed model that holds more than it stores (dense caches) needs that memory today, not later."""
    inputs = RoiInputs(gpu_memory_gib=3.0, overhead_gib=1.5)
    t = compute_roi_terms(inputs, _deployed(resident_bytes_compressed=2 * GIB))
    assert t.short.compressed.memory_per_replica_gib == pytest.approx(2 + 1.5)
    assert t.short.original.memory_per_replica_gib == pytest.approx(1000 / 1024 + 1.5)
    assert (t.short.compressed.gpus_per_replica, t.short.original.gpus_per_replica) == (2, 1)
    assert t.mid.compressed.memory_per_replica_gib == pytest.approx(600 / 1024 + 1.5)
    assert t.mid.compressed.gpus_per_replica == 1
    assert any("resident bytes" in f for f in t.short.formulas)
    assert any("as stored" in f for f in t.mid.formulas)


def test_a_ratio_whose_spread_spans_one_is_no_speedup():
    inputs = RoiInputs(current_replicas=4)
    noisy = compute_roi_terms(inputs, _deployed(decode_ratio=0.8, decode_ratio_min=0.7, decode_ratio_max=1.1)).short
    assert noisy.speedup == 1.0 and noisy.speed == NO_DIFFERENCE and noisy.compressed.replicas == 4
    assert any("spans 1.0" in f for f in noisy.formulas)
    clear = compute_roi_terms(inputs, _deployed(decode_ratio=0.8, decode_ratio_min=0.7, decode_ratio_max=0.9)).short
    assert clear.speedup == pytest.approx(1.25) and clear.speed == "1.25× faster" and clear.compressed.replicas == 4
    fast = compute_roi_terms(inputs, _deployed()).short  # ratio 0.5: twice as fast, half the replicas
    assert fast.speedup == pytest.approx(2.0) and fast.compressed.replicas == 2
    slow = compute_roi_terms(inputs, _deployed(decode_ratio=1.5, decode_ratio_min=1.2, decode_ratio_max=1.8)).short
    assert slow.speed == "1.50× SLOWER" and slow.compressed.replicas == 6 and slow.payback_months is None
    assert any("float32" in a for a in fast.assumptions)  # the original the ratio is against


def test_mid_term_decode_follows_bytes_and_prefill_follows_multiply_adds():
    """Bandwidth-bound decode: speed-up = byte ratio; compute-bound prefill: whole-model multiply-add ratio."""
    decode_only = compute_roi_terms(RoiInputs(prompt_share=0.0), _deployed()).mid
    assert decode_only.speedup == pytest.approx(1000 / 600)
    # changed layers 400 -> 150 (Mi multiply-adds) + the other 200 MiB of bf16 parameters once each (100 Mi)
    prefill_only = compute_roi_terms(RoiInputs(prompt_share=1.0), _deployed()).mid
    assert prefill_only.speedup == pytest.approx(500 / 250)
    mixed = compute_roi_terms(RoiInputs(), _deployed()).mid
    assert 1000 / 600 <= mixed.speedup <= 2.0
    assert mixed.speed.endswith("(projected)")
    text = " ".join(mixed.formulas)
    assert "memory bandwidth (300 GB/s)" in text and "peak throughput (121 TFLOP/s)" in text
    assert "r·(in+out) + nnz" in text and "0.50 × prefill + 0.50 × decode" in text


def test_mid_term_does_not_depend_on_the_measured_speed():
    """The projection reads bytes and multiply-adds only: a noisy or slow CPU timing leaves it unchanged."""
    a = compute_roi_terms(RoiInputs(), _deployed()).mid
    b = compute_roi_terms(RoiInputs(), _deployed(decode_ratio=1.5, decode_ratio_min=1.4, decode_ratio_max=1.6)).mid
    assert a.speedup == b.speedup and a.monthly_saving == b.monthly_saving


def test_both_terms_get_their_own_decision():
    """Slower and bigger today (no-go), twice as fast once kernels read only its bytes (go)."""
    inputs = RoiInputs(current_replicas=10, max_payback_months=12)
    t = compute_roi_terms(inputs, _deployed(decode_ratio=1.02, decode_ratio_min=0.97, decode_ratio_max=1.08))
    assert not t.short.go and "never (no saving)" in t.short.criteria[1]
    assert t.mid.go and t.mid.compressed.replicas < 10 and t.mid.payback_months < 12
    assert (t.short.term, t.mid.term) == ("Short term (measured today)",
                                          "Mid term (projected, kernels that read only the compressed bytes)")


def test_runs_without_the_new_measurements_fall_back_and_say_so():
    old = _measured(device="cpu")  # stored bytes and two separately timed decode times only
    t = compute_roi_terms(RoiInputs(current_replicas=4), old)
    assert t.short.compressed.memory_per_replica_gib == pytest.approx(2 + 2.0)
    assert t.short.speedup == pytest.approx(2.0)
    short, mid = " ".join(t.short.assumptions), " ".join(t.mid.assumptions)
    assert "no resident-memory measurement" in short and "no side-by-side speed ratio" in short
    assert "recorded no multiply-adds" in mid and "does not record its deploy dtype" in mid
    assert t.mid.speedup == pytest.approx(2.0)  # bytes 4 -> 2 GiB, prefill from bytes too
    assert t.notes == []


def test_a_float32_run_is_told_the_free_16_bit_cast():
    t = compute_roi_terms(RoiInputs(), _deployed(dtype="float32"))
    assert len(t.notes) == 1 and "halves the original's bytes for free" in t.notes[0]
    assert compute_roi_terms(RoiInputs(), _deployed()).notes == []


@pytest.mark.parametrize("changes,name", [
    ({"decode_ratio_min": 0.6}, "decode_ratio_min"), ({"decode_ratio_max": 0.4}, "decode_ratio_max"),
    ({"decode_ratio": 0.0}, "decode_ratio"), ({"resident_bytes_compressed": 0}, "resident_bytes_compressed"),
    ({"dtype": "int8"}, "dtype"), ({"changed_bytes_original": 2000 * 2**20}, "changed_bytes_original"),
    ({"decode_ratio": None}, "decode_ratio"), ({"macs_compressed": -1.0}, "macs_compressed")])
def test_bad_deploy_measurements_name_the_value(changes, name):
    with pytest.raises(ValueError, match=name):
        compute_roi_terms(RoiInputs(), _deployed(**changes))


@pytest.mark.parametrize("field,value", [("gpu_bandwidth_gbs", 0), ("gpu_peak_tflops", -1), ("prompt_share", 1.5)])
def test_bad_projection_inputs_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        compute_roi_terms(dataclasses.replace(RoiInputs(), **{field: value}), _deployed())


def test_every_catalog_gpu_has_bandwidth_and_peak():
    assert all(g["bandwidth_gbs"] > 0 and g["peak_tflops"] > 0 for g in GPU_CATALOG.values())
    h200 = next(g for name, g in GPU_CATALOG.items() if "H200" in name)
    assert (h200["bandwidth_gbs"], h200["peak_tflops"]) == (4800.0, 989.0)


def test_measured_from_run_reads_the_deploy_fields_and_needs_no_reference_job():
    """A side-by-side ratio is enough speed: no reference job, no absolute decode time needed."""
    from saten_core.roi import measured_from_run, missing_measurement

    nan = float("nan")
    run = {"id": 7, "bytes_before": 800, "bytes_after": 400, "model_bytes_before": 1000, "model_bytes_after": 590,
           "decode_ms": nan, "decode_ms_original": None, "ppl": 15.3, "ppl_original": 15.0, "device": "cpu",
           "dtype": "bfloat16", "resident_bytes": 700.0, "resident_bytes_original": 1100.0,
           "peak_memory_bytes": 5000.0, "peak_memory_bytes_original": 6000.0, "decode_ratio": 0.9,
           "decode_ratio_min": 0.8, "decode_ratio_max": 1.2, "ratio_reference": "float32", "ratio_rounds": 5.0,
           "macs_per_token_before": 400.0, "macs_per_token_after": 150.0}
    assert missing_measurement(run) is None
    m = measured_from_run(run)
    assert (m.bytes_original, m.bytes_compressed, m.changed_bytes_original) == (1000, 590, 800)
    assert (m.resident_bytes_original, m.resident_bytes_compressed, m.peak_bytes_compressed) == (1100, 700, 5000)
    assert (m.decode_ratio_min, m.ratio_reference, m.dtype, m.ratio_rounds) == (0.8, "float32", "bfloat16", 5)
    assert m.decode_s_compressed is None and m.macs_compressed == 150.0
    assert compute_roi_terms(RoiInputs(), m).short.speed == NO_DIFFERENCE
    older = {**run, "dtype": nan, "resident_bytes": nan, "decode_ratio": nan, "ratio_reference": nan}
    assert "decode_ms" in missing_measurement(older)
    with pytest.raises(ValueError, match="decode_ratio_min"):
        measured_from_run({**run, "decode_ratio_min": 0.95, "decode_ratio": 0.9})


def test_reports_show_both_terms_their_formulas_and_the_free_cast():
    from saten_core.report import to_html, to_markdown

    terms = compute_roi_terms(RoiInputs(current_replicas=10), _deployed(dtype="float32", decode_ratio=1.02,
                                                                         decode_ratio_min=0.97, decode_ratio_max=1.08))
    md = to_markdown(_report_input(terms=terms))
    short_at, mid_at = md.index("## Short term (measured today)"), md.index("## Mid term (projected, kernels")
    assert short_at < mid_at
    assert "Short term (measured today): Decision: NO-GO" in md and "Mid term (projected" in md
    assert md.count("Decision: NO-GO") == 2 and md.count("Decision: GO") == 2  # summary + each section
    assert "memory bandwidth (300 GB/s)" in md[mid_at:] and "resident bytes" in md[short_at:mid_at]
    assert "halves the original's bytes for free" in md
    page = to_html(_report_input(terms=terms))
    assert "<h2>Short term (measured today)</h2>" in page and "Formulas" in page and "for free" in page
