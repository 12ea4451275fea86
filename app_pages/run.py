"""Run page: submit the current plan as a background job, then follow the live queue (progress, ETA, log, cancel)."""

import time
from dataclasses import replace

import pandas as pd
import streamlit as st

from studio_ui import (
    PLAN_KEY,
    deploy_dtype,
    library,
    loaded_model,
    method_label,
    model_caption,
    model_ref,
    number_list,
    show_error,
)

st.title("Run")
model_caption()
jobs = library("jobs", "The job queue")
if jobs is None:
    st.stop()
from saten_core.models import resolve_device  # noqa: E402 - after the availability check above
from saten_core.plan import Plan  # noqa: E402
from saten_core.spec import METHODS, needs_stats  # noqa: E402

plan_json = st.session_state.get(PLAN_KEY) or Plan(target_ratio=0.8, dtype=deploy_dtype()).to_json()
if PLAN_KEY not in st.session_state:
    st.info("No plan set on the Plan page yet: the default (Saten, keep 80 % of the bytes) will be used.")
with st.expander("Plan to run", expanded=False):
    st.code(plan_json, language="json")

c1, c2, c3 = st.columns(3)
device = c1.selectbox("Device", ["auto", "cpu", "cuda"], key="run_device")
try:
    c1.caption(f"This job will run on **{resolve_device(device)}**.")
except ValueError as exc:
    c1.warning(str(exc))
evaluate = c2.checkbox("Evaluate the result", value=True, key="run_eval",
                       help="After compressing: perplexity, agreement with the original and decode latency.")
reference = c2.checkbox("Time the original too", value=True, key="run_reference",
                        disabled=not evaluate, help="Speed and ROI compare a run with the original measured on the "
                        "same device; this queues that reference job unless one is already queued or done.")
budget = c3.number_input("Time budget (minutes, 0 = none)", 0.0, 24 * 60.0, 0.0, 1.0, key="run_budget")

st.subheader("Calibration and healing")
plan = Plan.from_json(plan_json)
h1, h2 = st.columns(2)
source = h1.radio("Calibration text", ["Bundled corpus (calibration half of the Python docs)", "My own text file"],
                  key="run_calib_source", help="Activation-aware methods measure each layer's inputs on it; healing "
                  "trains on it. Evaluation always uses text the calibration never saw.")
upload = h1.file_uploader("UTF-8 text file", type=["txt", "md"], key="run_calib_file") if source.startswith("My") \
    else None
calib_tokens = h1.number_input("Calibration tokens", 64, 10_000_000, plan.calib_tokens, 256, key="run_calib_tokens")
heal_steps = h2.number_input("Healing steps (0 = off)", 0, 100_000, plan.heal_steps, 10, key="run_heal_steps",
                             help="Fine-tunes the TT cores and kept values to match the original's outputs "
                             "(distillation), keeping the best checkpoint on held-out calibration text.")
heal_lr = h2.number_input("Healing learning rate", 1e-7, 1.0, plan.heal_lr, format="%.0e", key="run_heal_lr",
                          help="Measured on SmolLM2-135M (docs/BENCHMARKS.md): 3e-5 suits a near-lossless model "
                          "(80% of the bytes), 3e-4 a damaged one (50%); too high a rate makes healing worse.")
core_scale = h2.number_input("TT-core learning rate × (0 = cores frozen)", 0.0, 100.0,
                             float(plan.heal_core_lr_scale), 0.1, key="run_heal_core_scale",
                             help="TT cores heal at the learning rate times this; kept values at the learning rate. "
                             "A core update moves every entry of its layer at once.")
sequential = h1.checkbox("Calibrate block by block", plan.sequential, key="run_sequential",
                         help="Each transformer block's input statistics come from the already-compressed blocks "
                         "before it, and only one block's statistics are held at a time (as SparseGPT / GPTQ do). "
                         "Off: all layers are measured at once on the original model.")
calibrated = replace(plan, calib_tokens=int(calib_tokens), heal_steps=int(heal_steps), heal_lr=float(heal_lr),
                     heal_core_lr_scale=float(core_scale), sequential=bool(sequential))
if not calibrated.needs_calibration():
    h2.caption(f"`{plan.method}` uses the weights alone and healing is off: no calibration text is read.")


compare = st.multiselect("Also run these methods at the same bytes, for comparison", [m for m in METHODS
                         if m != plan.method], key="run_compare", format_func=method_label,
                         disabled=plan.eps is not None, help="Same bytes as this plan keeps (spent uniformly: "
                         "per-layer allocations are not carried over), layers, calibration text, healing and "
                         "evaluation." + (" An error-bound plan has no byte budget to match." if plan.eps else ""))
needs_text = calibrated.needs_calibration() or any(needs_stats(m) for m in compare)


def with_calib() -> Plan:
    """This page's plan with its calibration text: the bundled split, or the upload (saved on submit)."""
    from saten_core.corpus import save_user_text

    if not needs_text:
        return calibrated
    return replace(calibrated, calib=str(save_user_text(upload.getvalue(), upload.name)) if upload else "default")


def queued_message(job_id: int, ref_id: int | None, others: list) -> str:
    extra = [f"reference job {ref_id} (the original model)"] if ref_id else []
    extra += [f"job {i} ({m})" for m, i, _ in others if i is not None]
    return f"Job {job_id} queued" + (", and " + ", ".join(extra) if extra else "") + "."


if st.button("Submit job", type="primary", icon=":material/send:", key="run_submit"):
    try:
        if source.startswith("My") and upload is None and needs_text:
            raise ValueError("choose a calibration text file, or use the bundled corpus")
        full = with_calib()
        mine = replace(full, calib=full.calib if full.needs_calibration() else None)
        job_id = jobs.submit(model_ref(), mine.to_json(), evaluate=evaluate, device=device,
                             time_budget_s=budget * 60 if budget else None)
        ref_id = (jobs.submit_reference(model_ref(), device=device, dtype=mine.dtype)
                  if evaluate and reference else None)
        lm = loaded_model() if compare and plan.target_ratio is None else None  # measures the plan's budget
        others = jobs.submit_baselines(model_ref(), full.to_json(), compare if lm or plan.target_ratio else [],
                                       evaluate=evaluate, device=device, model=lm.model if lm else None,
                                       time_budget_s=budget * 60 if budget else None)
        jobs.ensure_worker()
        st.success(queued_message(job_id, ref_id, others))
        for method, _, reason in (o for o in others if o[1] is None):
            st.warning(f"{method_label(method)} not queued: {reason}")
    except (ValueError, OSError) as exc:
        show_error(exc)


with st.expander("Sweep: one job per method × byte ratio × healing length", icon=":material/grid_view:"):
    s1, s2, s3 = st.columns(3)
    sweep_methods = s1.multiselect("Methods", METHODS, default=[plan.method], key="sweep_methods",
                                   format_func=method_label)
    sweep_ratios = s2.text_input("Byte ratios (comma-separated)", "0.5, 0.8", key="sweep_ratios")
    sweep_heal = s3.text_input("Heal steps (comma-separated)", "0", key="sweep_heal")
    if st.button("Queue sweep", icon=":material/playlist_add:", key="sweep_submit"):
        try:
            config = jobs.SweepConfig(model=model_ref(), methods=sweep_methods, ratios=number_list(sweep_ratios, float),
                                      heal_steps=number_list(sweep_heal, int), evaluate=evaluate, device=device,
                                      dtype=plan.dtype, time_budget_s=budget * 60 if budget else None)
            sweep_id, sweep_ids = jobs.submit_sweep(config)
            jobs.ensure_worker()
            st.success(f"Sweep {sweep_id} queued: jobs {', '.join(map(str, sweep_ids))}. Results can show this "
                       "sweep alone.")
        except (ValueError, OSError) as exc:
            show_error(exc)


def queue_frame(rows: list) -> pd.DataFrame:
    """Job rows -> the columns a person watching the queue cares about."""
    now = time.time()
    return pd.DataFrame([{
        "id": j.id, "task": j.task, "status": j.status, "model": j.model_ref.rsplit("/", 1)[-1], "stage": j.stage,
        "progress": float(j.fraction or 0.0), "ETA (s)": None if j.eta_seconds is None else round(j.eta_seconds),
        "device": j.device_used or j.device_requested, "age (s)": round(now - j.created_at),
        "message": j.error or j.message} for j in rows])


@st.fragment(run_every=2)
def queue() -> None:
    """Re-drawn every 2 s from the job store; nothing about jobs is kept in session state."""
    rows = jobs.list_jobs(limit=30)
    if not rows:
        st.write("No jobs yet.")
        return
    st.dataframe(queue_frame(rows), hide_index=True, key="run_queue",
                 column_config={"progress": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0)})
    ids = [j.id for j in rows]
    pick = st.selectbox("Job", ids, key="run_pick", format_func=lambda i: f"job {i}")
    job = jobs.get_job(pick)
    log = jobs.job_dir(pick) / "job.log"
    st.code("\n".join(log.read_text().splitlines()[-15:]) if log.exists() else "(no log yet)", language="text")
    if job.status in ("queued", "running") and st.button("Cancel job", icon=":material/cancel:", key="run_cancel"):
        try:
            jobs.request_cancel(pick)
        except ValueError as exc:
            show_error(exc)


st.subheader("Queue")
queue()
st.page_link("app_pages/results.py", label="See finished runs on Results", icon=":material/leaderboard:")
