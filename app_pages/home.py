"""Home page: what Saten Studio does and a guided five-step demo a manager can follow on the embedded model."""

import streamlit as st

from saten_core.demo import (
    DEMO_EVAL_TOKENS,
    DEMO_MODEL,
    DEMO_SCOPE,
    DEMO_TARGET,
    comparison_method,
    demo_method,
    submit_demo,
)
from studio_ui import MODEL_KEY, library, show_error

st.title("Saten Studio")
st.write("Shrink a language model's weight matrices into a **low-rank tensor train plus a sparse residual** "
         "(Saten), see what it costs in quality, and what it saves in serving.")

st.subheader("Guided demo (a few minutes on a laptop CPU)")
st.markdown(f"""
1. **Model** — the embedded `{DEMO_MODEL}` (135 M parameters) is already selected.
2. **Spectrum** — see how much of each layer's energy a low rank keeps.
3. **Start the demo run** below. To finish in minutes on a CPU it is a *demo*: it compresses only {DEMO_SCOPE}
   to {DEMO_TARGET:.0%} of their bytes with
   `{demo_method()}`, and measures perplexity, agreement with the original and decode latency on
   {DEMO_EVAL_TOKENS} held-out tokens. A second small job measures the original model on the same machine, so the
   comparison is fair, and a third compresses the same layers to the same bytes with `{comparison_method()}`, the
   baseline to beat. Full runs (every layer, 2048 tokens) are set up on **Plan** and **Run**.
4. **Run** — watch the three jobs' progress live.
5. **Results** and **ROI** — the trade-off chart, both models answering one prompt, the money, and a one-click
   report to forward.
""")

jobs = library("jobs", "The job queue")
if jobs and st.button("Start the demo run", type="primary", icon=":material/rocket_launch:", key="demo_start"):
    st.session_state[MODEL_KEY] = DEMO_MODEL
    try:
        ref_id, demo_id, other_id = submit_demo()
        jobs.ensure_worker()
        st.success(f"Queued jobs {ref_id} (original, for reference), {other_id} (baseline: {comparison_method()} "
                   f"at the same bytes) and {demo_id} (demo: {demo_method()} at {DEMO_TARGET:.0%} on {DEMO_SCOPE}).")
    except (ValueError, OSError) as exc:
        show_error(exc)
st.page_link("app_pages/run.py", label="Follow the jobs on the Run page", icon=":material/play_circle:")
st.page_link("app_pages/model.py", label="Or start from your own model", icon=":material/memory:")
