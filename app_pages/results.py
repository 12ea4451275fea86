"""Results page: run history, trade-off charts with the Pareto front and the original, per-layer error, downloads."""

import shutil

import pandas as pd
import streamlit as st

from saten_core import charts
from saten_core.answers import DEFAULT_PROMPT, MAX_NEW_TOKENS, compare_answers
from studio_ui import gguf_source, library, show_error

st.title("Results")
jobs = library("jobs", "The job queue")
if jobs is None:
    st.stop()
finished = [j.to_dict() for j in jobs.list_jobs(status="succeeded") if j.task == "compress"]
runs = charts.runs_frame(finished)
if runs.empty:
    st.info("No finished run yet: submit one on the Run page (or start the demo on Home).")
    st.stop()

models = sorted(runs["model"].unique())
model = st.selectbox("Model", models, index=models.index(charts.newest_model(runs)), key="results_model")
sweeps = charts.sweeps_of(finished, model)
sweep = st.selectbox("Sweep", ["all runs", *sweeps], key="results_sweep", disabled=not sweeps,
                     help="Runs queued together by one sweep (Run page or `jobs sweep`); the original stays drawn.")
chosen = charts.in_sweep(runs[runs["model"] == model], finished, None if sweep == "all runs" else sweep)
mine, size_column, size_title = charts.with_size_mib(chosen)
st.dataframe(charts.results_table(mine), hide_index=True, key="results_table")
if len(texts := charts.eval_texts(mine)) > 1:
    st.warning(f"These runs were evaluated on {len(texts)} different texts (column eval_text): compare perplexities "
               "only between runs with the same text. The bundled corpus itself differs between Python versions.")
if mine["slower"].any():
    st.warning("Runs marked **SLOWER** decode slower than their original: side by side in one process (the whole "
               "min–max spread above 1) or, for older runs, against the reference job timed separately.")
st.caption("Speed: compressed / original time per token, interleaved in one process; a spread that spans 1.0 is "
           "no measurable difference. Resident: bytes of every tensor the model holds after a forward; peak: "
           "measured peak process memory (CPU RSS or CUDA allocated).")

compressed = mine[~mine["baseline"]]
original = charts.reference_point(runs, model)
ref, cast = charts.sized(original, size_column), charts.sized(charts.free_cast_point(original), size_column)
source = gguf_source(model)
source_line = charts.source_line(original, source, size_column)
a, b = st.columns(2)
a.plotly_chart(charts.tradeoff_chart(compressed, "size (MiB)", "ppl", ref, size_title, "perplexity",
                                     extra=[cast] if cast else [], lines=[source_line] if source_line else []),
               key="tradeoff_size")
if source_line:
    a.caption(f"The dotted line is the **{source_line['label']}**: this model was dequantised from a GGUF whose "
              "block linears already took that many bits, so only runs left of it are smaller than the file it "
              "came from (the rest of the model counted at the deploy dtype, as in the runs).")
artefacts = charts.grid_artefacts([j for j in finished if j["model_ref"] == model], source)
if artefacts:
    st.warning("Quantized on a GGUF-derived model: " + "; ".join(f"run #{i}: {n}" for i, n in artefacts.items()),
               icon=":material/warning:")
if cast:
    a.caption(f"These runs are stored in float32: **{charts.CAST_LABEL}** halves the original's bytes with no "
              "compression, drawn at the float32 original's perplexity. Compression has to beat that point.")
if compressed["decode_ms"].notna().any():
    lat_ref = original if original is not None and original.get("decode_ms") is not None else None
    b.plotly_chart(charts.tradeoff_chart(compressed.dropna(subset=["decode_ms"]), "decode_ms", "ppl", lat_ref,
                                         "decode latency (ms/token)", "perplexity"), key="tradeoff_latency")
else:
    b.info("No run measured latency yet (tick 'Evaluate' when submitting).")

st.subheader("One run")
runs_first = list(compressed["id"]) + list(mine[mine["baseline"]]["id"])  # newest compressed run by default
pick = st.selectbox("Run", runs_first, format_func=lambda i: mine.set_index("id").loc[i, "label"],
                    key="results_pick")
job = jobs.get_job(int(pick))
report = job.result or {}
layers = pd.DataFrame(report.get("layers") or [])
if not layers.empty and "rel_error" in layers:
    st.plotly_chart(charts.layer_error_chart(layers, "rel_error", "Measured per-layer relative error"),
                    key="results_layer_error")
if report.get("heal"):
    curve = charts.heal_curve_frame(report["heal"])
    if not curve.empty:
        st.plotly_chart(charts.loss_curve_chart(curve), key="results_loss")
        st.caption(f"Healing kept the checkpoint of step {report['heal'].get('best_step', 0)} "
                   "(lowest held-out KL; step 0 is the unhealed model).")

st.subheader("Same prompt, both models")
# A few seconds of greedy decoding on a CPU: run in the page behind a spinner, not as a job, because the job
# queue runs compression jobs only (one worker, one at a time) and this would wait behind them.
p1, p2 = st.columns([4, 1])
prompt = p1.text_input("Prompt", DEFAULT_PROMPT, key="results_prompt")
new_tokens = p2.number_input("New tokens", 1, 128, MAX_NEW_TOKENS, key="results_tokens")
if job.artifact_dir and st.button("Ask both models", icon=":material/forum:", key="results_ask"):
    with st.spinner("Both models are writing (greedy decoding, a few seconds on a CPU) ..."):
        try:
            st.session_state["results_answers"] = {"job": job.id, **compare_answers(job.artifact_dir, prompt,
                                                                                    max_new_tokens=new_tokens)}
        except (ValueError, OSError) as exc:
            show_error(exc)
shown = st.session_state.get("results_answers")
if shown and shown["job"] == job.id:
    left, right = st.columns(2)
    for col, side, title in ((left, "original", "Original"), (right, "compressed", f"Compressed (run #{job.id})")):
        col.markdown(f"**{title}**")
        col.container(border=True).markdown(f"*{shown['prompt']}* {shown[side]['text']}")
        col.caption(f"{shown[side]['tokens']} tokens in {shown[side]['seconds']:.1f} s")
    st.caption("Identical answers." if shown["same"] else "The answers differ: greedy decoding is deterministic, "
               "so the difference comes from the compression.")

d1, d2, d3 = st.columns(3)
d1.download_button("Recipe (plan JSON)", job.plan_json, file_name=f"saten-plan-{job.id}.json",
                   mime="application/json", key="results_recipe")
d2.download_button("Run report (JSON)", job.result_json or "{}", file_name=f"saten-report-{job.id}.json",
                   mime="application/json", key="results_report")


def zipped(folder: str, job_id: int):
    """Zip the run's model folder only when the button is clicked (deferred download), once per run."""
    archive = jobs.job_dir(job_id) / f"saten-model-{job_id}.zip"
    if not archive.exists():
        shutil.make_archive(str(archive.with_suffix("")), "zip", folder)
    return open(archive, "rb")  # noqa: SIM115 - streamlit reads and closes it


if job.artifact_dir:
    d3.download_button("Compressed model (zip)", lambda: zipped(job.artifact_dir, job.id),
                       file_name=f"saten-model-{job.id}.zip", mime="application/zip", key="results_model_zip")
st.page_link("app_pages/roi.py", label="What is it worth? Open ROI", icon=":material/savings:")
