"""Saten Studio dashboard entry point: the st.navigation router, the shared model picker and the home page."""

import streamlit as st

from studio_ui import signed_in_gate

st.set_page_config(page_title="Saten Studio", page_icon=":material/compress:", layout="wide")
if not signed_in_gate():  # sign-in configured (.streamlit/secrets.toml [auth]) and this visitor signed out
    st.stop()

PAGES = {
    "Start": [st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True)],
    "Workflow": [
        st.Page("app_pages/model.py", title="Model", icon=":material/memory:"),
        st.Page("app_pages/spectrum.py", title="Spectrum", icon=":material/show_chart:"),
        st.Page("app_pages/plan.py", title="Plan", icon=":material/tune:"),
        st.Page("app_pages/run.py", title="Run", icon=":material/play_circle:"),
        st.Page("app_pages/results.py", title="Results", icon=":material/leaderboard:"),
        st.Page("app_pages/roi.py", title="ROI", icon=":material/savings:"),
    ],
}

st.navigation(PAGES).run()
