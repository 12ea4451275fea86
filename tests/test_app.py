"""Every dashboard page through Streamlit's AppTest on the tiny Llama folder.

Run: .venv/bin/python -m pytest -q tests/test_app.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from saten_core.plan import Plan
from saten_core.roi import GPU_CATALOG, HOURS_PER_MONTH
from studio_ui import PLAN_KEY, method_label

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture()
def no_spawn(monkeypatch):
    """Record worker start requests instead of starting a background process that would compete for the CPUs."""
    from saten_core import jobs

    calls = []
    monkeypatch.setattr(jobs, "ensure_worker", lambda **kw: calls.append(kw) or 0)
    return calls


def page(path: str, model: str | None = None, **state) -> AppTest:
    """Open the app, set session values (the chosen model, widget values), switch to `path` and run it."""
    at = AppTest.from_file(APP, default_timeout=180)
    if model is not None:
        at.session_state["model_ref"] = model
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    return at.switch_page(path).run()


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_home_renders_and_demo_queues_reference_and_compression(no_spawn):
    from saten_core import jobs

    at = AppTest.from_file(APP, default_timeout=60).run()
    no_exception(at)
    assert at.title[0].value == "Saten Studio"
    before = len(jobs.list_jobs())
    at.button(key="demo_start").click().run()
    no_exception(at)
    new = jobs.list_jobs()[: len(jobs.list_jobs()) - before]
    assert len(new) == 3 and {j.model_ref for j in new} == {"smollm2-135m"}
    assert "(baseline: wanda at the same bytes)" in at.success[0].value
    assert no_spawn, "the demo must start a worker"
    for j in new:
        jobs.request_cancel(j.id)


def test_model_page_summarises_a_local_folder(tiny_llama_dir):
    at = page("app_pages/model.py", model=str(tiny_llama_dir), model_source="Local folder or hub id",
              model_path=str(tiny_llama_dir))
    no_exception(at)
    assert not at.error
    assert metric(at, "Compressible layers") == "14"
    assert at.dataframe[1].value.shape[0] == 14


def test_bad_model_path_shows_an_error_not_a_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    at = page("app_pages/model.py", model_source="Local folder or hub id", model_path=missing)
    no_exception(at)
    assert at.error and "does not exist" in at.error[0].value
    at = page("app_pages/plan.py", model=missing)
    no_exception(at)
    assert at.error and "Cannot load model" in at.error[0].value


@pytest.mark.parametrize("how, word", [("no-weights", "no safetensors"), ("pickle", "pytorch_model.bin"),
                                       ("corrupt", "is not a safetensors file"), ("truncated", "is truncated")])
def test_a_damaged_model_folder_is_one_error_box_on_the_pages(tiny_llama_dir, tmp_path, how, word):
    """The reliability campaign's bad folders (tests/test_reliability.py) on the Model and Plan pages."""
    from tests.test_reliability import damaged

    folder = str(damaged(tiny_llama_dir, tmp_path, how))
    at = page("app_pages/model.py", model_source="Local folder or hub id", model_path=folder)
    no_exception(at)
    assert at.error and word in at.error[0].value and len(at.error[0].value.splitlines()) == 1, \
        [e.value for e in at.error]
    at = page("app_pages/plan.py", model=folder)
    no_exception(at)
    assert at.error and word in at.error[0].value


def scan_all_layers(at: AppTest) -> AppTest:
    """Click 'Compute all layers' (it queues a spectrum job), run that job here, and let the page pick it up."""
    from saten_core import jobs

    at.button(key="spectrum_all").click().run()
    no_exception(at)
    job = jobs.list_jobs()[0]
    assert job.task == "spectrum" and job.status == "queued"
    assert any("Spectrum job" in p.proto.text for p in at.get("progress"))
    assert jobs.run_worker(once=True) == 1 and jobs.get_job(job.id).status == "succeeded"
    return at.run()


def test_spectrum_page_draws_one_layer_then_the_all_layer_map(tiny_llama_dir, tmp_path, monkeypatch, no_spawn):
    monkeypatch.setenv("SATEN_HOME", str(tmp_path))  # no all-layer spectra cached by earlier tests
    at = page("app_pages/spectrum.py", model=str(tiny_llama_dir))
    no_exception(at)
    assert len(at.get("plotly_chart")) == 3  # singular values, energy, TT unfoldings of one layer
    assert metric(at, "Shape (out x in)") == "64 x 64"
    at.slider(key="spectrum_rank").set_value(2).run()
    no_exception(at)
    scan_all_layers(at)
    no_exception(at)
    assert no_spawn, "the scan must start a worker"
    assert len(at.get("plotly_chart")) == 4  # + the layer x module heatmap
    assert at.dataframe[0].value.shape[0] == 14


def test_plan_allocation_fills_overrides_within_budget(tiny_llama_dir, no_spawn):
    at = page("app_pages/spectrum.py", model=str(tiny_llama_dir))
    if any(b.key == "spectrum_all" for b in at.button):  # allocation needs the all-layer spectra
        scan_all_layers(at)
    at.switch_page("app_pages/plan.py").run()
    no_exception(at)
    assert len(at.get("plotly_chart")) == 1  # predicted per-layer error
    at.slider(key="plan_target").set_value(0.6).run()
    at.button(key="plan_allocate").click().run()
    no_exception(at)
    assert at.radio(key="plan_mode").value == "Rank and density"
    assert len(at.session_state["plan_overrides"]) == 14
    kept = float(metric(at, "Kept").rstrip("%")) / 100
    assert kept <= 0.6


def test_plan_slider_changes_predicted_bytes(tiny_llama_dir):
    at = page("app_pages/plan.py", model=str(tiny_llama_dir))
    no_exception(at)
    before = metric(at, "Predicted bytes")
    at.slider(key="plan_target").set_value(0.5).run()
    no_exception(at)
    after = metric(at, "Predicted bytes")
    assert before != after
    assert metric(at, "Kept") in ("50.0%", "49.9%", "49.8%")
    assert metric(at, "Bytes before") == "144.00 KiB"  # at the bf16 deploy dtype (fp32: 288 KiB)


def test_plan_whole_model_size_target(tiny_llama_dir, no_spawn):
    """A whole-model MiB budget: the predicted whole model fits it, also after per-layer allocation."""
    from saten_core.models import load_model
    from saten_core.plan import model_byte_bounds

    fixed, dense = model_byte_bounds(load_model(str(tiny_llama_dir), dtype=torch.bfloat16).model)
    target_mib = round((fixed + 0.6 * (dense - fixed)) / 2**20, 2)
    at = page("app_pages/spectrum.py", model=str(tiny_llama_dir))
    if any(b.key == "spectrum_all" for b in at.button):
        scan_all_layers(at)
    at.switch_page("app_pages/plan.py").run()
    at.radio(key="plan_budget_unit").set_value("Whole-model size").run()
    at.number_input(key="plan_target_mib").set_value(target_mib).run()
    no_exception(at)
    whole = lambda: float(metric(at, "Whole model").removesuffix(" MiB").replace(",", ""))
    assert whole() <= target_mib and 0.55 <= float(metric(at, "Kept").rstrip("%")) / 100 <= 0.6
    at.button(key="plan_allocate").click().run()
    no_exception(at)
    assert len(at.session_state["plan_overrides"]) == 14 and whole() <= target_mib


def test_plan_page_defaults_follow_the_library_plan(tiny_llama_dir):
    """The page starts from the measured library defaults, not its own guesses."""
    at = page("app_pages/plan.py", model=str(tiny_llama_dir))
    no_exception(at)
    assert at.toggle(key="plan_share_auto").value is True
    assert at.selectbox(key="plan_rounds").value == "auto"
    plan = Plan.from_json(at.session_state[PLAN_KEY])
    assert plan.lowrank_share is None and plan.fit_rounds is None


def test_plan_rounds_and_share_reach_the_plan(tiny_llama_dir):
    at = page("app_pages/plan.py", model=str(tiny_llama_dir), plan_method="saten-aw")
    at.selectbox(key="plan_rounds").set_value(4).run()
    at.toggle(key="plan_share_auto").set_value(False).run()
    at.slider(key="plan_share").set_value(0.3).run()
    no_exception(at)
    plan = Plan.from_json(at.session_state[PLAN_KEY])
    assert (plan.fit_rounds, plan.lowrank_share) == (4, 0.3)
    at.selectbox(key="plan_method").set_value("wanda").run()  # no TT part: the rounds do not apply
    no_exception(at)
    assert Plan.from_json(at.session_state[PLAN_KEY]).fit_rounds is None


def test_plan_mask_group_reaches_the_plan_and_the_bytes(tiny_llama_dir):
    """Per-row top-k rounds per output, so the predicted bytes follow the radio; the saved plan carries it."""
    at = page("app_pages/plan.py", model=str(tiny_llama_dir), plan_mode="Rank and density", plan_method="wanda")
    at.slider(key="plan_density").set_value(0.33).run()
    no_exception(at)
    assert Plan.from_json(at.session_state[PLAN_KEY]).mask_group == "auto"
    auto = metric(at, "Predicted bytes")
    at.radio(key="plan_group").set_value("layer").run()
    no_exception(at)
    assert Plan.from_json(at.session_state[PLAN_KEY]).mask_group == "layer"
    assert metric(at, "Predicted bytes") != auto


def test_plan_quantization_controls_reach_the_plan_and_the_bytes(tiny_llama_dir):
    """rtn / saten-q: bits, group and symmetry are plan fields; the bytes follow the bits; no spectrum preview."""
    at = page("app_pages/plan.py", model=str(tiny_llama_dir), plan_method="rtn")
    no_exception(at)
    at.slider(key="plan_target").set_value(0.3).run()
    plan = Plan.from_json(at.session_state[PLAN_KEY])
    assert (plan.method, plan.bits, plan.quant_group, plan.symmetric) == ("rtn", None, 64, False)
    auto = metric(at, "Predicted bytes")
    at.selectbox(key="plan_bits").set_value(2).run()
    at.toggle(key="plan_symmetric").set_value(True).run()
    no_exception(at)
    plan = Plan.from_json(at.session_state[PLAN_KEY])
    assert (plan.bits, plan.symmetric) == (2, True) and metric(at, "Predicted bytes") != auto
    at.number_input(key="plan_qgroup").set_value(48).run()  # does not divide the tiny model's width 64
    assert any("group 48 does not divide the input width 64" in e.value for e in at.error)
    at.number_input(key="plan_qgroup").set_value(32).run()
    at.selectbox(key="plan_method").set_value("saten-q").run()
    at.radio(key="plan_quant_base").set_value("gptq").run()
    no_exception(at)
    plan = Plan.from_json(at.session_state[PLAN_KEY])
    assert (plan.method, plan.quant_base, plan.quant_group) == ("saten-q", "gptq", 32)


def test_plan_part_bits_controls_reach_the_plan(tiny_llama_dir):
    """saten: kept values / TT cores bits are plan fields and change the bytes; rtn shows no such control."""
    at = page("app_pages/plan.py", model=str(tiny_llama_dir), plan_mode="Rank and density")
    no_exception(at)
    before = metric(at, "Predicted bytes")
    at.selectbox(key="plan_value_bits").set_value(4).run()
    at.selectbox(key="plan_core_bits").set_value(8).run()
    no_exception(at)
    plan = Plan.from_json(at.session_state[PLAN_KEY])
    assert (plan.value_bits, plan.core_bits) == (4, 8) and metric(at, "Predicted bytes") != before
    at.selectbox(key="plan_method").set_value("rtn").run()
    assert not [s for s in at.selectbox if s.key == "plan_value_bits"]


def test_plan_rank_and_density_sliders_change_bytes(tiny_llama_dir):
    at = page("app_pages/plan.py", model=str(tiny_llama_dir), plan_mode="Rank and density")
    no_exception(at)
    low = metric(at, "Predicted bytes")
    at.slider(key="plan_rank").set_value(4).run()
    assert metric(at, "Predicted bytes") != low
    mid = metric(at, "Predicted bytes")
    at.slider(key="plan_density").set_value(0.2).run()
    no_exception(at)
    assert metric(at, "Predicted bytes") != mid


def test_run_page_submit_creates_a_job(tiny_llama_dir, no_spawn):
    from saten_core import jobs

    at = page("app_pages/run.py", model=str(tiny_llama_dir))
    no_exception(at)
    assert "cpu" in " ".join(c.value for c in at.caption)
    count = len(jobs.list_jobs())
    at.checkbox(key="run_eval").uncheck()
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert at.success and "queued" in at.success[0].value
    job = jobs.list_jobs()[0]
    assert len(jobs.list_jobs()) == count + 1
    assert job.model_ref == str(Path(tiny_llama_dir).resolve()) and job.status == "queued" and not job.evaluate
    assert no_spawn
    jobs.request_cancel(job.id)


def test_run_page_queues_the_reference_run_once_with_an_evaluated_job(tiny_llama_dir, no_spawn):
    from saten_core import jobs
    from saten_core.plan import Plan

    at = page("app_pages/run.py", model=str(tiny_llama_dir))
    at.selectbox(key="run_device").set_value("cpu")
    count = len(jobs.list_jobs())
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert at.success and "reference job" in at.success[0].value
    new = jobs.list_jobs()[: len(jobs.list_jobs()) - count]
    assert len(new) == 2 and all(j.evaluate and j.device_requested == "cpu" for j in new)
    assert Plan.from_json(new[0].plan_json).exclude == ["*"] and Plan.from_json(new[1].plan_json).exclude == []
    at.button(key="run_submit").click().run()
    assert "reference job" not in at.success[0].value and len(jobs.list_jobs()) == count + 3
    for job in jobs.list_jobs()[:3]:
        jobs.request_cancel(job.id)


def test_run_page_queues_chosen_baselines_at_the_plan_budget(tiny_llama_dir, no_spawn):
    from saten_core import jobs
    from saten_core.plan import Plan

    plan = Plan(method="saten", target_ratio=0.6).to_json()
    at = page("app_pages/run.py", model=str(tiny_llama_dir), **{PLAN_KEY: plan})
    at.checkbox(key="run_reference").uncheck()
    at.multiselect(key="run_compare").select("wanda").select("svd")
    count = len(jobs.list_jobs())
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert at.success and "(wanda)" in at.success[0].value and "(svd)" in at.success[0].value, at.error
    new = [Plan.from_json(j.plan_json) for j in jobs.list_jobs()[: len(jobs.list_jobs()) - count]]
    assert [(p.method, p.target_ratio, p.calib) for p in new] == [("svd", 0.6, None), ("wanda", 0.6, "default"),
                                                                   ("saten", 0.6, None)]
    for job in jobs.list_jobs()[:3]:
        jobs.request_cancel(job.id)


def test_run_page_compares_an_allocated_plan_at_the_bytes_it_keeps(tiny_llama_dir, no_spawn):
    from saten_core import jobs
    from saten_core.plan import Override, Plan

    allocated = Plan(method="saten", overrides=[Override("*.0.*", rank=2, density=0.05),
                                                Override("*.1.*", rank=4, density=0.2)])
    at = page("app_pages/run.py", model=str(tiny_llama_dir), **{PLAN_KEY: allocated.to_json()})
    at.checkbox(key="run_eval").uncheck()
    at.multiselect(key="run_compare").select("prune")
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert "(prune)" in at.success[0].value, [e.value for e in at.error]
    newest = Plan.from_json(jobs.list_jobs()[0].plan_json)
    assert newest.method == "prune" and 0 < newest.target_ratio < 1 and newest.overrides == []
    for job in jobs.list_jobs()[:2]:
        jobs.request_cancel(job.id)
    eps = page("app_pages/run.py", model=str(tiny_llama_dir), **{PLAN_KEY: Plan(method="saten", eps=0.3).to_json()})
    assert eps.multiselect(key="run_compare").disabled


def test_run_page_puts_calibration_and_healing_into_the_job_plan(tiny_llama_dir, no_spawn):
    from saten_core import jobs
    from saten_core.plan import Plan

    at = page("app_pages/run.py", model=str(tiny_llama_dir))
    no_exception(at)
    assert any("no calibration text is read" in c.value for c in at.caption)  # data-free default, no healing
    at.checkbox(key="run_eval").uncheck()
    at.number_input(key="run_heal_steps").set_value(5)
    at.number_input(key="run_heal_core_scale").set_value(0.0)
    at.number_input(key="run_calib_tokens").set_value(512)
    at.checkbox(key="run_sequential").check().run()
    no_exception(at)
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert at.success, [e.value for e in at.error]
    job = jobs.list_jobs()[0]
    plan = Plan.from_json(job.plan_json)
    assert (plan.heal_steps, plan.calib_tokens, plan.calib, plan.heal_core_lr_scale) == (5, 512, "default", 0.0)
    assert plan.sequential
    jobs.request_cancel(job.id)


def test_run_page_without_an_uploaded_text_refuses_to_submit(tiny_llama_dir, no_spawn):
    from saten_core import jobs

    at = page("app_pages/run.py", model=str(tiny_llama_dir), run_calib_source="My own text file", run_heal_steps=3)
    count = len(jobs.list_jobs())
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert at.error and "choose a calibration text file" in at.error[0].value
    assert len(jobs.list_jobs()) == count


def test_plan_page_offers_every_method_of_the_library_with_labels(tiny_llama_dir):
    from saten_core.spec import METHODS

    at = page("app_pages/plan.py", model=str(tiny_llama_dir))
    box = at.selectbox(key="plan_method")
    assert list(box.options) == [method_label(m) for m in METHODS]
    box.set_value("saten-aw").run()
    no_exception(at)
    assert at.table or at.dataframe


@pytest.mark.parametrize("path", ["app_pages/results.py", "app_pages/roi.py"])
def test_results_and_roi_render_with_or_without_runs(path):
    at = page(path)
    no_exception(at)
    assert at.info or at.dataframe


@pytest.fixture(scope="module")
def finished_runs(tiny_llama_dir):
    """A real reference run and a real Saten run of the tiny model, both evaluated, executed in this process."""
    from saten_core import jobs
    from saten_core.plan import Plan

    ids = [jobs.submit(str(tiny_llama_dir), Plan(exclude=["*"]).to_json(), evaluate=True),
           jobs.submit(str(tiny_llama_dir), Plan(method="saten", target_ratio=0.6).to_json(), evaluate=True)]
    while any(jobs.get_job(i).status == "queued" for i in ids):
        jobs.run_worker(once=True)
    assert [jobs.get_job(i).status for i in ids] == ["succeeded", "succeeded"], [jobs.get_job(i).error for i in ids]
    return ids


@pytest.mark.slow
def test_results_page_shows_tradeoffs_and_layer_errors(finished_runs):
    at = page("app_pages/results.py")
    no_exception(at)
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # size trade-off, latency trade-off, per-layer error
    table = at.dataframe[0].value
    assert finished_runs[1] in list(table["id"]) and "original (reference)" in " ".join(table["label"])
    evaluated = table[table["ppl"].notna()]["eval_text"]
    assert len(evaluated) >= 2 and evaluated.notna().all() and evaluated.nunique() == 1  # same text: no warning
    assert not any("different texts" in w.value for w in at.warning)


@pytest.mark.slow
def test_results_page_shows_the_healing_curve_of_a_healed_run(tiny_llama_dir):
    from saten_core import jobs
    from saten_core.plan import Plan

    plan = Plan(method="saten", target_ratio=0.6, heal_steps=3, heal_seq_len=32, heal_tokens=512,
                heal_eval_tokens=64, heal_eval_every=1)
    job_id = jobs.submit(str(tiny_llama_dir), plan.to_json(), evaluate=True)  # later ROI tests open the newest run
    while jobs.get_job(job_id).status == "queued":
        jobs.run_worker(once=True)
    assert jobs.get_job(job_id).status == "succeeded", jobs.get_job(job_id).error
    at = page("app_pages/results.py", results_pick=job_id)
    no_exception(at)
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Healing loss" in spec for spec in specs)
    assert any("Healing kept the checkpoint of step" in c.value for c in at.caption)


@pytest.mark.slow
def test_results_page_shows_both_models_answering_one_prompt(finished_runs):
    at = page("app_pages/results.py", results_pick=finished_runs[1])
    at.text_input(key="results_prompt").set_value("the quick brown fox")
    at.number_input(key="results_tokens").set_value(4)
    at.button(key="results_ask").click().run()
    no_exception(at)
    assert not at.error
    shown = at.session_state["results_answers"]
    assert shown["job"] == finished_runs[1] and shown["prompt"] == "the quick brown fox"
    assert shown["original"]["tokens"] == shown["compressed"]["tokens"] == 4
    texts = " ".join(m.value for m in at.markdown)
    assert "**Original**" in texts and "**Compressed" in texts and shown["compressed"]["text"] in texts


INJECTED = "injected-model"  # a model name only: the injected jobs never load it


def injected_runs(monkeypatch, tmp_path, dtype: str = "bfloat16") -> list[int]:
    """A fresh job store holding finished jobs with crafted results: reference, evaluated run, unevaluated run.

    The pages read these numbers exactly as they read a worker's, so no assertion rests on a measured time or
    memory figure. The evaluated run (600 of 1000 MiB as stored) holds 1400 MiB resident and decodes 12 ms vs the
    reference job's 10 ms, but side by side its ratio 1.02 spans 0.97-1.08: no measurable difference.
    """
    import json

    from saten_core.jobs import store

    monkeypatch.setenv("SATEN_HOME", str(tmp_path))
    mib = 2**20
    totals = {"dtype": dtype, "bytes_before": 800 * mib, "model_bytes_before": 1000 * mib,
              "macs_per_token_before": 400 * mib, "macs_per_token_after": 150 * mib}
    evaluated = {"ppl_original": 15.0, "resident_bytes": 1400 * mib, "resident_bytes_original": 1000 * mib,
                 "peak_memory_bytes": 1700 * mib, "peak_memory_bytes_original": 1100 * mib, "decode_ratio": 1.02,
                 "decode_ratio_min": 0.97, "decode_ratio_max": 1.08, "ratio_reference": "float32",
                 "latency": {"decode_ms_per_token": 12.0, "side_by_side": {"rounds": 5}}}
    jobs = [(Plan(exclude=["*"]), {"bytes_before": 0, "bytes_after": 0, "ppl": 15.0, "decode_ms_per_token": 10.0},
             {"eval": {"ppl_original": 15.0}, "totals": {"dtype": dtype}}),
            (Plan(method="saten", target_ratio=0.6), {"bytes_before": 800 * mib, "bytes_after": 400 * mib,
                                                      "ppl": 15.3, "decode_ms_per_token": 12.0},
             {"eval": evaluated, "totals": {**totals, "model_bytes_after": 600 * mib}}),
            (Plan(method="saten", target_ratio=0.7), {"bytes_before": 800 * mib, "bytes_after": 500 * mib},
             {"totals": {**totals, "model_bytes_after": 700 * mib}})]
    ids = []
    for plan, columns, result in jobs:
        job_id = store.insert_job(INJECTED, plan.to_json(), eval_settings={"evaluate": "ppl" in columns},
                                  device="cpu")
        assert store.claim_next(pid=1).id == job_id
        assert store.update_running(job_id, 1, status="succeeded", device_used="cpu", finished_at=1.0,
                                    result_json=json.dumps(result), **columns)
        ids.append(job_id)
    return ids


def test_roi_page_opens_on_an_evaluated_run_when_the_newest_was_not(monkeypatch, tmp_path):
    ids = injected_runs(monkeypatch, tmp_path)
    at = page("app_pages/roi.py")
    no_exception(at)
    box = at.selectbox(key="roi_run")
    assert not at.error and box.value == ids[1] and box.options[0].endswith("(not evaluated)")
    box.set_value(ids[2]).run()
    assert at.error and "has no measured decode_ms" in at.error[0].value


def test_roi_page_computes_both_terms_from_the_injected_run(monkeypatch, tmp_path):
    """Short term: 1400 MiB resident and no measurable speed-up, so no saving (NO-GO). Mid term: 600 of 1000 MiB
    read per token, 1.67x faster on an L4, 10 replicas -> 6 (GO). Both follow the injected numbers."""
    injected_runs(monkeypatch, tmp_path)
    at = page("app_pages/roi.py")
    no_exception(at)
    assert not at.error
    titles = [h.value for h in at.subheader]
    assert "Short term (measured today)" in titles
    assert "Mid term (projected, kernels that read only the compressed bytes)" in titles
    speeds = [m.value for m in at.metric if m.label == "Speed vs original"]
    assert speeds == ["no measurable difference", "1.67× faster (projected)"]
    assert not any("Decision" in m.value for m in at.markdown)  # said once per term, in its banner
    at.number_input(key="roi_replicas").set_value(10).run()
    no_exception(at)
    assert [w.value.split(" for")[0] for w in at.warning if "for this PoC" in w.value] == ["Decision: NO-GO"]
    assert [s.value.split(" for")[0] for s in at.success if "for this PoC" in s.value] == ["Decision: GO"]
    assert any("limit 1.050x" in s.value and "limit 12 months" in s.value for s in at.success)
    short, mid = (table.value.set_index("metric") for table in at.dataframe)  # the short column comes first
    assert short.loc["Memory per replica (GiB)", "compressed"] == pytest.approx(1400 / 1024 + 2, abs=1e-3)
    assert mid.loc["Memory per replica (GiB)", "compressed"] == pytest.approx(600 / 1024 + 2, abs=1e-3)
    assert (short.loc["Replicas needed", "compressed"], mid.loc["Replicas needed", "compressed"]) == (10, 6)
    gpu_month = GPU_CATALOG["NVIDIA L4 (24 GB)"]["price_per_hour"] * HOURS_PER_MONTH
    assert short.loc["Monthly cost ($)", "original"] == pytest.approx(10 * gpu_month)
    formulas = " ".join(m.value for m in at.markdown)
    assert "resident bytes after a forward" in formulas and "memory bandwidth (300 GB/s)" in formulas
    at.number_input(key="roi_max_payback").set_value(0.5).run()
    no_exception(at)
    assert len([w for w in at.warning if "Decision: NO-GO" in w.value and "limit 0.5 months" in w.value]) == 2
    assert not at.info  # bf16: no free-cast note


def test_roi_page_says_the_free_cast_of_a_float32_run(monkeypatch, tmp_path):
    injected_runs(monkeypatch, tmp_path, dtype="float32")
    at = page("app_pages/roi.py")
    no_exception(at)
    assert any("halves the original's bytes for free" in i.value for i in at.info)


def test_results_page_shows_memory_speed_verdict_and_the_free_cast(monkeypatch, tmp_path):
    from saten_core.charts import CAST_LABEL

    ids = injected_runs(monkeypatch, tmp_path, dtype="float32")
    at = page("app_pages/results.py")
    no_exception(at)
    table = at.dataframe[0].value.set_index("id")
    assert table.loc[ids[1], "resident (MiB)"] == 1400 and table.loc[ids[1], "peak memory, original (MiB)"] == 1100
    assert table.loc[ids[1], "speed"] == "no measurable difference (vs float32 original)"
    assert not any("SLOWER" in w.value for w in at.warning)  # 12 vs 10 ms apart, but no difference side by side
    size_chart = at.get("plotly_chart")[0].proto.spec
    assert CAST_LABEL in size_chart
    assert any(CAST_LABEL in c.value for c in at.caption)


def test_a_model_over_the_page_limit_is_planned_without_loading_its_weights(tiny_llama_dir, tmp_path, monkeypatch,
                                                                           no_spawn):
    """Over PAGE_LOAD_BYTES the page process holds the structure only (meta): one layer is read from disk, the
    all-layer spectra come from the job and are found by the folder's files, and allocation works on them."""
    import shutil

    import studio_ui

    folder = tmp_path / "big"
    shutil.copytree(tiny_llama_dir, folder)
    monkeypatch.setattr(studio_ui, "PAGE_LOAD_BYTES", 0)
    at = page("app_pages/spectrum.py", model=str(folder))
    no_exception(at)
    assert studio_ui.is_lazy(studio_ui._load_at(str(folder), "bfloat16"))
    assert metric(at, "Shape (out x in)") == "64 x 64"  # the first layer, read from the safetensors file
    scan_all_layers(at)
    no_exception(at)
    assert at.dataframe[0].value.shape[0] == 14
    at.switch_page("app_pages/plan.py").run()
    no_exception(at)
    at.slider(key="plan_target").set_value(0.6).run()
    at.button(key="plan_allocate").click().run()
    no_exception(at)
    assert len(at.session_state["plan_overrides"]) == 14
    assert float(metric(at, "Kept").rstrip("%")) / 100 <= 0.6


def test_run_page_sweep_form_queues_one_tagged_job_per_combination(tiny_llama_dir, no_spawn):
    from saten_core import jobs
    from saten_core.plan import Plan

    at = page("app_pages/run.py", model=str(tiny_llama_dir))
    at.multiselect(key="sweep_methods").set_value(["saten", "prune"])
    at.text_input(key="sweep_ratios").set_value("0.5, 0.7")
    at.button(key="sweep_submit").click().run()
    no_exception(at)
    assert at.success and "Sweep sweep-" in at.success[0].value, [e.value for e in at.error]
    new = jobs.list_jobs()[:4]
    assert len({j.sweep for j in new}) == 1 and new[0].sweep is not None
    assert {(Plan.from_json(j.plan_json).method, Plan.from_json(j.plan_json).target_ratio) for j in new} == {
        ("saten", 0.5), ("saten", 0.7), ("prune", 0.5), ("prune", 0.7)}
    count = len(jobs.list_jobs())
    at.text_input(key="sweep_ratios").set_value("0.5, lots")
    at.button(key="sweep_submit").click().run()
    assert at.error and "'lots' is not a number" in at.error[0].value and len(jobs.list_jobs()) == count
    for job in new:
        jobs.request_cancel(job.id)


AUTH = {"redirect_uri": "http://127.0.0.1:8501/oauth2callback", "cookie_secret": "test-only-secret",
        "client_id": "saten-studio", "client_secret": "test-only", "server_metadata_url":
        "https://idp.example.invalid/.well-known/openid-configuration"}


def test_with_sign_in_configured_a_signed_out_visitor_can_do_nothing(tiny_llama_dir, no_spawn):
    from saten_core import jobs

    at = AppTest.from_file(APP, default_timeout=60)
    at.secrets["auth"] = AUTH
    at.run()
    no_exception(at)
    assert at.button(key="sign_in") and "sign in" in at.info[0].value
    assert not [b for b in at.button if b.key == "demo_start"]
    count = len(jobs.list_jobs())
    at.session_state["model_ref"] = str(tiny_llama_dir)
    at.switch_page("app_pages/run.py").run()
    no_exception(at)
    assert not [b for b in at.button if b.key in ("run_submit", "sweep_submit")]  # the page never ran
    assert len(jobs.list_jobs()) == count


def test_without_sign_in_configured_the_pages_act_as_before(no_spawn):
    at = AppTest.from_file(APP, default_timeout=60).run()
    no_exception(at)
    assert not [b for b in at.button if b.key == "sign_in"] and at.button(key="demo_start")
