"""Every dashboard page through Streamlit's AppTest on the tiny Llama folder.

Run: .venv/bin/python -m pytest -q tests/test_app.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
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
    assert metric(at, "Bytes before") == "288.00 KiB"


def test_plan_whole_model_size_target(tiny_llama_dir, no_spawn):
    """A whole-model MiB budget: the predicted whole model fits it, also after per-layer allocation."""
    from saten_core.models import load_model
    from saten_core.plan import model_byte_bounds

    fixed, dense = model_byte_bounds(load_model(str(tiny_llama_dir)).model)
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
    at.number_input(key="run_calib_tokens").set_value(512).run()
    no_exception(at)
    at.button(key="run_submit").click().run()
    no_exception(at)
    assert at.success, [e.value for e in at.error]
    job = jobs.list_jobs()[0]
    plan = Plan.from_json(job.plan_json)
    assert (plan.heal_steps, plan.calib_tokens, plan.calib, plan.heal_core_lr_scale) == (5, 512, "default", 0.0)
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


@pytest.mark.slow
def test_roi_page_opens_on_an_evaluated_run_when_the_newest_was_not(finished_runs, tiny_llama_dir):
    from saten_core import jobs
    from saten_core.plan import Plan

    job_id = jobs.submit(str(tiny_llama_dir), Plan(method="saten", target_ratio=0.7).to_json(), evaluate=False)
    while jobs.get_job(job_id).status == "queued":
        jobs.run_worker(once=True)
    assert jobs.get_job(job_id).status == "succeeded"
    at = page("app_pages/roi.py")
    no_exception(at)
    box = at.selectbox(key="roi_run")
    assert not at.error and box.value != job_id and box.options[0].endswith("(not evaluated)")
    assert metric(at, "Decode speed vs original").endswith("x")
    box.set_value(job_id).run()
    assert at.error and "has no measured decode_ms" in at.error[0].value


@pytest.mark.slow
def test_roi_page_computes_from_the_measured_run(finished_runs):
    at = page("app_pages/roi.py")
    no_exception(at)
    assert not at.error
    assert metric(at, "Decode speed vs original").endswith("x")
    verdict = [m.value for m in [*at.success, *at.warning] if "for this PoC" in m.value]
    assert not any("Decision" in m.value for m in at.markdown)  # said once, in the banner
    assert len(verdict) == 1 and "limit 1.050x" in verdict[0] and "limit 12 months" in verdict[0]
    at.number_input(key="roi_max_payback").set_value(0.5)
    at.number_input(key="roi_replicas").set_value(40).run()
    assert any("Decision: NO-GO" in w.value and "limit 0.5 months" in w.value for w in at.warning)
    no_exception(at)
    assert at.dataframe[0].value.iloc[2]["original"] == 40
    cost = at.dataframe[0].value.set_index("metric").loc["Monthly cost ($)", "original"]
    assert cost == pytest.approx(40 * GPU_CATALOG["NVIDIA L4 (24 GB)"]["price_per_hour"] * HOURS_PER_MONTH)
