"""Spectrum page: singular values, cumulative energy and TT-unfolding spectra per layer, and a layer x module map."""

import pandas as pd
import streamlit as st

from saten_core import charts
from studio_ui import (
    deploy_dtype,
    layer_names,
    layer_spectrum,
    library,
    loaded_model,
    model_caption,
    model_ref,
    show_error,
    spectra_if_ready,
    spectra_landed,
    spectrum_job,
)

st.title("Spectrum")
model_caption()
jobs = library("jobs", "The job queue")
if library("spectrum", "Layer spectrum analysis") is None or jobs is None or loaded_model() is None:
    st.stop()
ref = model_ref()
names = layer_names(ref)
left, right = st.columns([2, 1])
name = left.selectbox("Layer", names, key="spectrum_layer")
try:
    entry = layer_spectrum(ref, name)
except (ValueError, OSError) as exc:
    show_error(exc)
    st.stop()
full = len(entry["singular_values"])
rank = right.slider("TT rank cap", 1, full, min(full, max(1, full // 4)), key="spectrum_rank")

stats = st.columns(4)
stats[0].metric("Shape (out x in)", f"{entry['shape'][0]} x {entry['shape'][1]}")
stats[1].metric("Effective rank", f"{entry['effective_rank']:.1f}")
stats[2].metric("Stable rank", f"{entry['stable_rank']:.1f}")
stats[3].metric("Rank for 90 / 95 / 99 % energy", " / ".join(str(entry["rank_at_energy"][k]) for k in
                                                             ("0.9", "0.95", "0.99")))
frame = charts.spectrum_frame(entry["singular_values"])
a, b = st.columns(2)
a.plotly_chart(charts.spectrum_chart(frame, rank, title=f"Singular values of {name}"), key="spec_chart")
b.plotly_chart(charts.energy_chart(frame, rank), key="energy_chart")
alpha = entry.get("heavy_tail_alpha")
st.caption(f"TT modes in x out: {entry['tt_modes'][0]} x {entry['tt_modes'][1]}. "
           + (f"Heavy-tail exponent alpha (weightwatcher-style power-law fit): {alpha:.2f}." if alpha else ""))
st.plotly_chart(charts.unfoldings_chart(charts.unfoldings_frame(entry["tt_unfoldings"]), rank), key="tt_chart")

st.subheader("Energy kept by the rank cap, per layer and module")


@st.fragment(run_every=2)
def scan(ref: str, layers: int) -> None:
    """The all-layer scan is a background job (minutes on a CPU): offer it, or follow it until its cache lands."""
    job = spectrum_job(ref)
    if job is not None and job.status == "succeeded":
        if spectra_landed(ref):
            st.rerun()
        st.warning(f"Spectrum job {job.id} finished but its cache is not there for these weights: run it again.")
    if job is not None and job.status in ("queued", "running"):
        eta = "" if job.eta_seconds is None else f", about {job.eta_seconds:.0f} s left in this stage"
        st.progress(float(job.fraction or 0.0), text=f"Spectrum job {job.id} {job.status}: {job.stage or 'waiting'}"
                    f"{eta}. {job.message or ''}")
        if st.button("Cancel the scan", icon=":material/cancel:", key="spectrum_cancel"):
            jobs.request_cancel(job.id)
        return
    if job is not None and job.status in ("failed", "cancelled"):
        st.warning(f"Spectrum job {job.id} {job.status}: {job.error or job.message}")
    st.info(f"The map needs the spectra of all {layers} layers: computed once per model by a background job and "
            "cached on disk (several minutes for a 135 M model on a CPU; progress shows here and on Run).")
    if st.button("Compute all layers", key="spectrum_all", icon=":material/grid_on:"):
        try:
            jobs.submit_spectrum(ref, dtype=deploy_dtype())
            jobs.ensure_worker()
        except (ValueError, OSError) as exc:
            show_error(exc)
        st.rerun()


data = spectra_if_ready(ref)
if data is None:
    scan(ref, len(names))
    st.stop()
heat = charts.energy_kept_frame(data["layers"], rank)
st.plotly_chart(charts.heatmap_chart(heat, title=f"Share of ||W||^2 in the top {rank} singular values"),
                key="heatmap")
st.dataframe(pd.DataFrame(heat).sort_values("value"), hide_index=True, height=240, key="spectrum_table")
