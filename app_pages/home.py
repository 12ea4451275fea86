"""Home page: what Saten Studio does and a guided five-step demo a manager can follow on the embedded model."""

import streamlit as st

from studio_ui import DEFAULT_MODEL, MODEL_KEY, library, show_error

st.title("Saten Studio")
st.write("Shrink a language model's weight matrices into a **low-rank tensor train plus a sparse residual** "
         "(Saten), see what it costs in quality, and what it saves in serving.")

st.subheader("Guided demo (about 5 minutes on a laptop CPU)")
st.markdown(f"""
1. **Model** — the embedded `{DEFAULT_MODEL}` (135 M parameters) is already selected.
2. **Spectrum** — see how much of each layer's energy a low rank keeps.
3. **Start the demo run** below: it compresses every block linear layer to 80 % of its bytes and measures
   perplexity, agreement with the original and decode latency. A second small job measures the original model
   on the same machine, so the comparison is fair.
4. **Run** — watch both jobs' progress live.
5. **Results** and **ROI** — the trade-off chart, the money, and a one-click report to forward.
""")


def demo_plan_json() -> str:
    """80% of block-linear bytes with the best available Saten variant (activation-aware once it exists)."""
    from saten_core.plan import Plan
    from saten_core.spec import METHODS

    method = "saten-aw" if "saten-aw" in METHODS else "saten"
    return Plan(method=method, target_ratio=0.8).to_json()


def baseline_plan_json() -> str:
    """A plan that changes no layer: its job measures the original model with the same code path."""
    from saten_core.plan import Plan

    return Plan(exclude=["*"]).to_json()


jobs = library("jobs", "The job queue")
if jobs and st.button("Start the demo run", type="primary", icon=":material/rocket_launch:", key="demo_start"):
    st.session_state[MODEL_KEY] = DEFAULT_MODEL
    try:
        ids = [jobs.submit(DEFAULT_MODEL, baseline_plan_json(), evaluate=True),
               jobs.submit(DEFAULT_MODEL, demo_plan_json(), evaluate=True)]
        jobs.ensure_worker()
        st.success(f"Queued jobs {ids[0]} (original, for reference) and {ids[1]} (Saten at 80 %).")
    except (ValueError, OSError) as exc:
        show_error(exc)
st.page_link("app_pages/run.py", label="Follow the jobs on the Run page", icon=":material/play_circle:")
st.page_link("app_pages/model.py", label="Or start from your own model", icon=":material/memory:")
