"""Saten Studio dashboard entry point (placeholder until the dashboard issue lands)."""

import streamlit as st

st.set_page_config(page_title="Saten Studio", layout="wide")
st.title("Saten Studio")
st.write("Plan, run and measure Saten compression of language models.")
