"""Spectrum page: singular values, cumulative energy and TT-unfolding spectra per layer, and a layer x module map."""

import pandas as pd
import streamlit as st

from pages.common import library, loaded_model, model_caption, model_ref, show_error
from saten_core import charts

st.title("Spectrum")
model_caption()
spectrum = library("spectrum", "Layer spectrum analysis")
lm = loaded_model() if spectrum else None
if lm is None:
    st.stop()


@st.cache_data(show_spinner="Computing singular values of every layer (cached on disk after the first time) ...")
def spectra(ref: str) -> dict:
    return spectrum.model_spectra(loaded_model(ref).model)


try:
    data = spectra(model_ref())
except (ValueError, OSError) as exc:
    show_error(exc)
    st.stop()
layers = data["layers"]
names = [entry["name"] for entry in layers]
left, right = st.columns([2, 1])
name = left.selectbox("Layer", names, key="spectrum_layer")
entry = layers[names.index(name)]
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
st.caption(f"TT modes in x out: {entry['tt_modes'][0]} x {entry['tt_modes'][1]}. "
           + (f"Heavy-tail exponent alpha (weightwatcher-style power-law fit): {entry['heavy_tail_alpha']:.2f}."
              if entry.get("heavy_tail_alpha") else ""))
st.plotly_chart(charts.unfoldings_chart(charts.unfoldings_frame(entry["tt_unfoldings"]), rank), key="tt_chart")

st.subheader("Energy kept by the rank cap, per layer and module")
heat = charts.energy_kept_frame(layers, rank)
st.plotly_chart(charts.heatmap_chart(heat, title=f"Share of ||W||^2 in the top {rank} singular values"),
                key="heatmap")
st.dataframe(pd.DataFrame(heat).sort_values("value", ascending=False), hide_index=True, height=240)
st.caption(f"{len(layers)} layers, spectra {'from the disk cache' if data.get('cached') else 'just computed'}.")
