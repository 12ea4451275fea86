"""ROI page: business inputs + one run's measured numbers -> short-term (measured) and mid-term (projected) cost."""

import dataclasses

import pandas as pd
import streamlit as st

from saten_core import charts
from saten_core.quant.source import source_label
from saten_core.report import ReportInput, decision_line, dollars, headline, to_html, to_markdown
from saten_core.roi import (
    GPU_CATALOG,
    RoiInputs,
    RoiResult,
    compute_roi_terms,
    default_run,
    is_missing,
    measured_from_run,
    missing_measurement,
    roi_table,
)
from studio_ui import gguf_source, library, loaded_model, show_error

st.title("ROI")
jobs = library("jobs", "The job queue")
if jobs is None:
    st.stop()
runs = charts.runs_frame([j.to_dict() for j in jobs.list_jobs(status="succeeded") if j.task == "compress"])
compressed = runs[~runs["baseline"]] if not runs.empty else runs
if compressed.empty:
    st.info("No finished compression run yet: the ROI is computed from a run's measured numbers.")
    st.stop()


@st.cache_data(show_spinner="Measuring the model's size ...")
def model_bytes(ref: str) -> int:
    """Whole-model bytes, for runs recorded before jobs stored them (newer runs carry model_bytes_before)."""
    from saten_core.models import parameter_bytes

    return parameter_bytes(loaded_model(ref).model)


records = compressed.to_dict("records")
ready = {r["id"]: missing_measurement(r) is None for r in records}
pick = st.selectbox("Run", list(compressed["id"]), index=default_run(records), key="roi_run",
                    format_func=lambda i: compressed.set_index("id").loc[i, "label"]
                    + ("" if ready[i] else " (not evaluated)"))
run = compressed.set_index("id").loc[pick].to_dict() | {"id": pick}
if not any(ready.values()):
    st.info("No compression run has measured speed yet: submit one with evaluation on the Run page (it times the "
            "original side by side; runs recorded before that also need the reference job).")

st.subheader("Your deployment")
c1, c2, c3 = st.columns(3)
gpu = c1.selectbox("GPU type", list(GPU_CATALOG), index=1, key="roi_gpu")
spec = GPU_CATALOG[gpu]
price = c1.number_input("Price per GPU-hour ($)", 0.01, 100.0, spec["price_per_hour"], 0.01, key=f"roi_price_{gpu}")
memory = c1.number_input("GPU memory (GiB)", 1.0, 512.0, spec["memory_gib"], 1.0, key=f"roi_mem_{gpu}")
bandwidth = c1.number_input("Memory bandwidth (GB/s)", 1.0, 1e5, spec["bandwidth_gbs"], 10.0, key=f"roi_bw_{gpu}",
                            help="Bounds decode in the mid-term projection.")
tflops = c1.number_input("Peak 16-bit TFLOP/s (dense)", 1.0, 1e5, spec["peak_tflops"], 1.0, key=f"roi_tflops_{gpu}",
                         help="Bounds prefill in the mid-term projection.")
requests = c2.number_input("Requests per day", 1.0, 1e10, 100_000.0, 1000.0, key="roi_requests")
tokens = c2.number_input("Tokens per request (prompt + answer)", 1.0, 1e6, 500.0, 50.0, key="roi_tokens")
prompt_share = c2.slider("Prompt share of the tokens", 0.0, 1.0, 0.5, 0.05, key="roi_prompt_share",
                         help="Prompt tokens are prefilled, the rest generated one by one (mid-term projection).")
replicas = c2.number_input("Replicas serving the original today", 1, 10_000, 2, 1, key="roi_replicas")
overhead = c3.number_input("Runtime overhead per replica (GiB)", 0.0, 512.0, 2.0, 0.5, key="roi_overhead")
days = c3.number_input("Engineering days (PoC + rollout)", 0.0, 1000.0, 10.0, 1.0, key="roi_days")
rate = c3.number_input("Cost per engineering day ($)", 0.0, 1e5, 800.0, 50.0, key="roi_rate")

st.subheader("Go / no-go criteria")
d1, d2 = st.columns(2)
max_ppl = d1.number_input("Highest acceptable perplexity (× original)", 1.0, 100.0, 1.05, 0.01, format="%.2f",
                          key="roi_max_ppl", help="Held-out perplexity of the compressed model over the original's.")
max_payback = d2.number_input("Payback within (months)", 0.5, 600.0, 12.0, 1.0, key="roi_max_payback")

inputs = RoiInputs(gpu=gpu, gpu_memory_gib=memory, gpu_price_per_hour=price, gpu_bandwidth_gbs=bandwidth,
                   gpu_peak_tflops=tflops, requests_per_day=requests, tokens_per_request=tokens,
                   prompt_share=prompt_share, current_replicas=int(replicas), overhead_gib=overhead,
                   engineering_days=days, day_rate=rate, max_ppl_ratio=max_ppl, max_payback_months=max_payback)
try:
    legacy = model_bytes(run["model"]) if is_missing(run.get("model_bytes_before")) else None
    terms = compute_roi_terms(inputs, measured_from_run(run, legacy))
except (ValueError, OSError) as exc:
    show_error(exc)
    st.stop()


def show_term(col, roi: RoiResult, key: str) -> None:
    """One term's column: its decision banner, headline numbers, cost table, formulas and assumptions."""
    col.subheader(roi.term)
    (col.success if roi.go else col.warning)(decision_line(roi),
                                             icon=":material/check_circle:" if roi.go else ":material/block:")
    m1, m2 = col.columns(2)
    m1.metric("Monthly saving", dollars(roi.monthly_saving))
    m2.metric("Payback", "never" if roi.payback_months is None else f"{roi.payback_months:.1f} months")
    m1.metric("Speed vs original", roi.speed, help=f"speed-up used: {roi.speedup:.2f}x")
    m2.metric("Perplexity vs original", "n/a" if roi.ppl_ratio is None else f"{roi.ppl_ratio:.2f}x")
    col.markdown("\n".join(f"- {line}" for line in headline(roi)))
    col.dataframe(pd.DataFrame(roi_table(roi)), hide_index=True, key=f"roi_table_{key}")
    with col.expander("Formulas", expanded=True):
        st.markdown("\n".join(f"- {line}" for line in roi.formulas))
    with col.expander("Assumptions of this term"):
        st.markdown("\n".join(f"- {line}" for line in roi.assumptions))


st.subheader("Outcome")
for note in terms.notes:
    st.info(note, icon=":material/info:")
if (source := gguf_source(run["model"])) is not None:
    st.info(f"{run['model']} was dequantised from a GGUF ({source_label(source)}): the sizes and savings here are "
            "against its copy at the deploy dtype, and the report's size chart draws the source's own size as a "
            "dotted line.", icon=":material/info:")
if terms.short.speedup < 1:
    st.warning(f"This compressed model is SLOWER than the original ({terms.short.speed}) on {run['device']}: "
               "today it needs more replicas, not fewer.")
short_col, mid_col = st.columns(2)
show_term(short_col, terms.short, "short")
show_term(mid_col, terms.mid, "mid")
with st.expander("Assumptions (both terms)"):
    st.markdown("\n".join(f"- {a}" for a in terms.assumptions))


def report_input() -> ReportInput:
    """The report of this run: both terms, the size trade-off chart (with the free cast) and the run history."""
    mine, column, title = charts.with_size_mib(runs[runs["model"] == run["model"]])
    ref = charts.reference_point(runs, run["model"])
    cast = charts.sized(charts.free_cast_point(ref), column)
    line = charts.source_line(ref, gguf_source(run["model"]), column)
    figure = charts.tradeoff_chart(mine[~mine["baseline"]], "size (MiB)", "ppl", charts.sized(ref, column), title,
                                   "perplexity", extra=[cast] if cast else [], lines=[line] if line else [])
    cols = ["label", "method", "device", "dtype", "size (MiB)", "ppl", "kl", "top1_agreement", "decode_ms",
            "decode_ratio", "resident_bytes", "slower"]
    return ReportInput(title=f"Saten compression of {run['model']}: cost and benefit", run_label=run["label"],
                       terms=dataclasses.replace(terms), runs=mine[cols], figures=[figure])


r1, r2 = st.columns(2)
r1.download_button("Download report (HTML)", lambda: to_html(report_input()), file_name=f"saten-roi-{pick}.html",
                   mime="text/html", type="primary", icon=":material/description:", key="roi_html")
r2.download_button("Download report (Markdown)", lambda: to_markdown(report_input()),
                   file_name=f"saten-roi-{pick}.md", mime="text/markdown", key="roi_md")
