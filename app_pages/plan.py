"""Plan page: method and global settings, budget allocation, per-layer overrides, live byte/error preview, recipes."""

import math

import pandas as pd
import streamlit as st

from saten_core import charts
from saten_core.plan import (
    FIT_ROUNDS,
    JOINT_SHARE,
    JOINT_SHARE_MAX_RATIO,
    LOWRANK_SHARE,
    MASK_GROUPS,
    PART_BIT_METHODS,
    QUANT_GROUP,
    Override,
    Plan,
    dry_run,
    dry_run_totals,
    model_byte_bounds,
    predicted_model_bytes,
    ratio_for_model_bytes,
)
from saten_core.quant.parts import CORE_BITS, VALUE_BITS
from saten_core.spec import ACTIVATION_AWARE, METHODS, STRUCTURES, is_quantized, storage_method
from studio_ui import (
    PLAN_KEY,
    deploy_dtype,
    grid_note,
    human_bytes,
    library,
    loaded_model,
    method_label,
    model_caption,
    model_ref,
    show_error,
    spectra_if_ready,
)

st.title("Plan")
model_caption()
lm = loaded_model()
if lm is None:
    st.stop()
OVERRIDE_COLUMNS = {"pattern": "", "rank": None, "eps": None, "density": None, "skip": False}


def load_recipe() -> None:
    """Copy an uploaded recipe into the widgets' values (runs before they are drawn)."""
    upload = st.session_state.get("plan_upload")
    if upload is None:
        return
    try:
        plan = Plan.from_json(upload.getvalue().decode("utf-8"))
        plan.validate()
    except (ValueError, UnicodeDecodeError) as exc:
        st.session_state["plan_upload_error"] = f"Recipe not loaded: {exc}"
        return
    mode = "Target budget" if plan.target_ratio else "Error bound" if plan.eps else "Rank and density"
    st.session_state.update(plan_method=plan.method, plan_structure=plan.structure, plan_mode=mode,
                            plan_density=plan.density, plan_share_auto=plan.lowrank_share is None,
                            plan_share=plan.lowrank_share or LOWRANK_SHARE, plan_group=plan.mask_group,
                            plan_rounds="auto" if plan.fit_rounds is None else plan.fit_rounds,
                            plan_overrides=pd.DataFrame([vars(o) for o in plan.overrides], columns=OVERRIDE_COLUMNS))
    st.session_state.update(run_calib_tokens=plan.calib_tokens, run_heal_steps=plan.heal_steps,
                            run_heal_lr=plan.heal_lr, run_heal_core_scale=float(plan.heal_core_lr_scale))
    if plan.target_ratio:
        st.session_state.update(plan_target=plan.target_ratio, plan_budget_unit="Share of block-linear bytes")
    if plan.rank:
        st.session_state["plan_rank"] = plan.rank
    if plan.eps:
        st.session_state["plan_eps"] = plan.eps


def allocate(settings: dict) -> None:
    """Button callback: per-layer ranks/densities that meet the budget with the least predicted error.

    The result fills the override table (one row per layer), which the user can then edit.
    """
    from saten_core.allocate import allocate_plan

    try:
        plan = allocate_plan(loaded_model(), Plan(**settings), spectra=spectra_if_ready(model_ref()))
    except ValueError as exc:
        st.session_state["plan_upload_error"] = f"Allocation failed: {exc}"
        return
    st.session_state.update(plan_mode="Rank and density",
                            plan_overrides=pd.DataFrame([vars(o) for o in plan.overrides], columns=OVERRIDE_COLUMNS))


@st.cache_data(show_spinner=False)
def max_rank(ref: str) -> int:
    from saten_core.models import layer_table

    return max(min(r["in_features"], r["out_features"]) for r in layer_table(loaded_model(ref).model))


def overrides(frame: pd.DataFrame) -> list[Override]:
    """Editable-table rows -> Override objects (blank pattern rows are ignored, blank cells mean 'plan value')."""
    out = []
    for row in frame.to_dict("records"):
        if not str(row.get("pattern") or "").strip():
            continue
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        rank = None if clean["rank"] is None else int(clean["rank"])
        out.append(Override(pattern=clean["pattern"].strip(), rank=rank, eps=clean["eps"],
                            density=clean["density"], skip=bool(clean["skip"])))
    return out


with st.sidebar:
    st.file_uploader("Load a recipe (plan JSON)", type=["json"], key="plan_upload", on_change=load_recipe)
if msg := st.session_state.pop("plan_upload_error", None):
    st.error(msg)

c1, c2, c3 = st.columns(3)
method = c1.selectbox("Method", METHODS, key="plan_method", format_func=method_label,
                      help="Activation-aware methods read a calibration text while compressing (set on the Run "
                      "page); the others use the weights alone. Structure 2:4 applies to the sparse part.")
structure = c2.radio("Sparsity structure", STRUCTURES, horizontal=True, key="plan_structure")
mode = c3.radio("Set by", ["Target budget", "Rank and density", "Error bound"], key="plan_mode")
s1, s2 = st.columns(2)
group = c2.radio("Unstructured top-k per", MASK_GROUPS, horizontal=True, key="plan_group",
                 disabled=structure == "2:4", help="keep the largest scores of the whole layer, or the same count "
                 "in every output row; auto = per row for Wanda and activation-aware Saten (the Wanda paper's "
                 "rule, measured better here), per layer otherwise")
rounds_options = sorted({0, 1, 2, 4, 8, 16, 32, FIT_ROUNDS} | ({st.session_state.get("plan_rounds")} - {None, "auto"}))
has_tt_and_sparse = storage_method(method) == "saten"
rounds = c1.selectbox("Joint TT + sparse rounds", ["auto", *rounds_options], key="plan_rounds",
                      disabled=not has_tt_and_sparse,
                      help="saten / saten-aw: after the one-shot split, refit the TT part to W - S and re-choose the "
                      f"mask on W - TT; the best round is kept. auto = the library default ({FIT_ROUNDS}). Slower "
                      "to compress (each round is another TT-SVD per layer); measured in docs/BENCHMARKS.md")
settings: dict = {"method": method, "structure": structure, "mask_group": group, "dtype": deploy_dtype(),
                  "fit_rounds": rounds if has_tt_and_sparse and rounds != "auto" else None}
if mode == "Target budget":
    unit = s1.radio("Budget as", ["Share of block-linear bytes", "Whole-model size"], horizontal=True,
                    key="plan_budget_unit")
    if unit == "Whole-model size":
        fixed, dense = model_byte_bounds(lm.model)
        low, high = math.ceil(fixed / 2**20 * 100 + 1) / 100, math.floor(dense / 2**20 * 100 - 1) / 100
        mib = s1.number_input("Whole model, MiB", low, high, round(low + 0.8 * (high - low), 2), 1.0,
                              key="plan_target_mib", help=f"embeddings, norms and biases stay ({fixed / 2**20:.2f} "
                              "MiB); the block linears get the rest")
        settings["target_ratio"] = ratio_for_model_bytes(lm.model, int(mib * 2**20))
    else:
        settings["target_ratio"] = s1.slider("Keep this share of block-linear bytes", 0.05, 1.0, 0.8, 0.01,
                                             key="plan_target")
    if not s2.toggle("Measured default TT share", True, key="plan_share_auto",
                     help=f"{JOINT_SHARE} of each layer's bytes for saten-aw with joint rounds at budgets up to "
                     f"{JOINT_SHARE_MAX_RATIO:.0%}, {LOWRANK_SHARE} otherwise (docs/BENCHMARKS.md)"):
        settings["lowrank_share"] = s2.slider("Share of a layer's bytes for the TT part (saten)", 0.01, 1.0,
                                              LOWRANK_SHARE, 0.01, key="plan_share")
    ready = spectra_if_ready(model_ref()) is not None
    s1.button("Allocate per layer for this budget", on_click=allocate, args=(dict(settings),), disabled=not ready,
              key="plan_allocate", help="needs the all-layer spectra (Spectrum page)" if not ready else
              "fills the override table with per-layer settings that minimise the predicted error"
              + (" (predicted from the weights' spectra: allocating on whitened spectra measured worse for "
                 "saten-aw, docs/benchmarks/spectrum.md)" if method in ACTIVATION_AWARE else ""))
else:
    if mode == "Rank and density":
        settings["rank"] = s1.slider("TT rank cap", 1, max_rank(model_ref()), min(32, max_rank(model_ref())),
                                     key="plan_rank")
    else:
        settings["eps"] = s1.slider("TT-SVD relative error bound eps", 0.01, 0.95, 0.3, 0.01, key="plan_eps")
    settings["density"] = s2.slider("Residual / weight density (1 - sparsity)", 0.0, 1.0, 0.05, 0.01,
                                    key="plan_density")

if is_quantized(method):
    q1, q2, q3 = st.columns(3)
    bits = q1.selectbox("Bits per weight", ["auto", 8, 4, 3, 2], key="plan_bits",
                        help="auto: the most bits that fit the budget (saten-q leaves a share to its repair)")
    qgroup = q2.number_input("Inputs per quantization group (0 = per row)", 0, 4096, QUANT_GROUP, 16,
                             key="plan_qgroup", help="each group has a 16-bit scale (and minimum); it must divide "
                             "every layer's input width")
    symmetric = q3.toggle("Symmetric grid (no minimum)", False, key="plan_symmetric")
    settings.update(bits=None if bits == "auto" else int(bits), quant_group=int(qgroup), symmetric=symmetric)
    if method == "saten-q":
        settings["quant_base"] = q3.radio("Repair the error of", ["rtn", "gptq"], horizontal=True,
                                          key="plan_quant_base")

if method in PART_BIT_METHODS:
    v1, v2, _ = st.columns(3)
    value_bits = v1.selectbox("Kept sparse values stored at (bits)", list(VALUE_BITS), key="plan_value_bits",
                              help="16: the deploy dtype; 8 / 4: codes + one 16-bit scale per 64 values. "
                              "With a budget the saved bytes buy more kept entries")
    core_bits = v2.selectbox("TT cores stored at (bits)", list(CORE_BITS), key="plan_core_bits",
                             help="16: the deploy dtype; 8: codes + one 16-bit scale per 64 numbers")
    settings.update(value_bits=int(value_bits), core_bits=int(core_bits))

st.subheader("Per-layer overrides")
st.caption("Pattern is an fnmatch on the layer name, e.g. `*.layers.0.*` or `*mlp.down_proj`. Blank = plan value.")
if "plan_overrides" not in st.session_state:
    st.session_state["plan_overrides"] = pd.DataFrame([OVERRIDE_COLUMNS]).iloc[0:0]
edited = st.data_editor(st.session_state["plan_overrides"], num_rows="dynamic", key="plan_override_editor",
                        column_config={"rank": st.column_config.NumberColumn(min_value=1, step=1),
                                       "eps": st.column_config.NumberColumn(min_value=0.0, max_value=0.99),
                                       "density": st.column_config.NumberColumn(min_value=0.0, max_value=1.0)})
try:
    plan = Plan(**settings, overrides=overrides(edited))
    rows = dry_run(lm.model, plan)
except (ValueError, TypeError) as exc:
    show_error(exc)
    st.stop()
st.session_state[PLAN_KEY] = plan.to_json()
if note := grid_note(model_ref(), rows):
    st.warning(note, icon=":material/warning:")

totals = dry_run_totals(rows)
m = st.columns(5)
m[0].metric("Layers changed", f"{totals['layers_changed']} / {totals['layers']}")
m[1].metric("Bytes before", human_bytes(totals["bytes_before"]))
m[2].metric("Predicted bytes", human_bytes(totals["predicted_bytes"]))
if totals["predicted_bytes"] is not None:
    m[3].metric("Kept", f"{totals['predicted_bytes'] / totals['bytes_before']:.1%}",
                help="predicted bytes / bytes before (block linears, indices and metadata counted)")
else:
    m[3].metric("Kept", "set by eps", help="an error bound picks each rank at compression time")
m[4].metric("Whole model", human_bytes(predicted_model_bytes(lm.model, totals)),
            help="every parameter after this plan (embeddings, norms, biases and layers left dense included)")

data = spectra_if_ready(model_ref())
if data is None:
    st.info("Predicted per-layer error, multiply-adds and budget allocation need the all-layer spectra: "
            "compute them once on the Spectrum page.", icon=":material/insights:")
elif is_quantized(plan.method) or plan.method == "sparsegpt":
    st.info("The spectrum preview predicts TT and sparse errors only; quantization and SparseGPT's weight updates "
            "are measured when the plan runs (Run page).", icon=":material/info:")
elif (preview := library("preview", "Per-layer predicted error")) is not None:
    pv = preview.preview(plan, data)
    m[3].caption(f"Multiply-adds per token: {pv['totals']['macs_per_token'] / pv['totals']['macs_before']:.1%} "
                 f"of dense; RMS predicted error {pv['totals']['rel_error_rms']:.3f}")
    st.plotly_chart(charts.layer_error_chart(pd.DataFrame(pv["layers"]), "predicted_rel_error",
                                             "Predicted per-layer relative error"), key="plan_error_chart")
table = pd.DataFrame(rows)
for field in ("method", "rank", "density", "structure", "group"):
    table[field] = table["spec"].map(lambda s, f=field: "dense" if s is None and f == "method" else (s or {}).get(f))
table["shape"] = table["shape"].map(lambda s: f"{s[0]} x {s[1]}")
table = table.drop(columns=["spec", "changed"])
st.dataframe(table, hide_index=True, height=300, key="plan_table")

d1, d2 = st.columns(2)
d1.download_button("Save recipe (plan JSON)", plan.to_json(), file_name="saten-plan.json",
                   mime="application/json", icon=":material/download:", key="plan_download")
d2.page_link("app_pages/run.py", label="Run this plan", icon=":material/play_circle:")
