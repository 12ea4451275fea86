"""Model page: pick an embedded model, a local Hugging Face folder or a hub id, and see what it holds."""

import pandas as pd
import streamlit as st

from saten_core.deploy.dtype import DTYPES
from studio_ui import (
    DEFAULT_MODEL,
    DTYPE_KEY,
    MODEL_KEY,
    deploy_dtype,
    human_bytes,
    loaded_model,
    model_ref,
    show_source,
)

st.title("Model")


@st.cache_data(show_spinner=False)
def embedded() -> pd.DataFrame:
    from saten_core.models import list_models

    return pd.DataFrame(list_models()).drop(columns=["source_quantization"], errors="ignore")  # shown below


models = embedded()
st.dataframe(models, hide_index=True, width="stretch")
source = st.radio("Source", ["Embedded", "Local folder or hub id"], horizontal=True, key="model_source")
if source == "Embedded":
    names = list(models["name"])
    current = model_ref() if model_ref() in names else DEFAULT_MODEL
    ref = st.selectbox("Embedded model", names, index=names.index(current), key="model_pick")
else:
    ref = st.text_input("Folder path or hub id (owner/name)", key="model_path",
                        placeholder="/path/to/hf-folder or HuggingFaceTB/SmolLM2-135M").strip()
if not ref:
    st.stop()
st.session_state[MODEL_KEY] = ref
dtype = st.selectbox("Deploy dtype", DTYPES, index=DTYPES.index(deploy_dtype()), key="model_dtype",
                     help="The precision the model is served in. The original, the compressed parts and every "
                     "byte count use it; 16-bit is how LLMs are deployed.")
st.session_state[DTYPE_KEY] = dtype
if dtype == "float32":
    st.info("At float32 every saving includes what a plain 16-bit cast gives for free (half the bytes, no quality "
            "loss): Results and ROI show that cast as a reference point.")

lm = loaded_model(ref)
if lm is None:
    st.stop()


@st.cache_data(show_spinner=False)
def layers(ref: str, dtype: str) -> pd.DataFrame:
    from saten_core.models import layer_table

    return pd.DataFrame(layer_table(loaded_model(ref).model))


table = layers(ref, dtype)
total = sum(p.numel() for p in lm.model.parameters())
cols = st.columns(4)
cols[0].metric("Parameters", f"{total / 1e6:,.1f} M")
cols[1].metric("Block-linear bytes", human_bytes(int(table["bytes"].sum())))
cols[2].metric("Compressible layers", len(table))
cols[3].metric("Kind", lm.kind)
arch = ", ".join(getattr(lm.config, "architectures", None) or [type(lm.model).__name__])
st.write(f"**{lm.name}** — architecture `{arch}`, loaded at the deploy dtype {dtype}.")
st.dataframe(table, hide_index=True, width="stretch", height=360)
show_source(ref)
st.success("Next: open **Spectrum** to see which layers are compressible, or **Plan** to set a budget.")
