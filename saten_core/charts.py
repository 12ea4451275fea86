"""Plotly figures for the dashboard and the report, built from pandas DataFrames (no streamlit here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from saten_core.roi import is_missing, speed_verdict

ORIGINAL_LABEL = "original"
CAST_LABEL = "original cast to bf16 (free)"


def _need(df: pd.DataFrame, columns: Sequence[str]) -> None:
    """Fail early with the missing column's name instead of a KeyError deep inside plotly."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"frame lacks column(s) {', '.join(missing)}; has {', '.join(map(str, df.columns))}")


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"orientation": "h", "y": -0.2})
    return fig


def spectrum_frame(singular_values: Sequence[float]) -> pd.DataFrame:
    """Columns k (1-based), sigma and energy (cumulative share of sum sigma^2) for one matrix."""
    s = np.asarray(singular_values, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"singular_values must be a non-empty 1-D sequence, got shape {s.shape}")
    energy = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-300)
    return pd.DataFrame({"k": np.arange(1, s.size + 1), "sigma": s, "energy": energy})


def spectrum_chart(df: pd.DataFrame, rank: int | None = None, title: str = "Singular values") -> go.Figure:
    """Singular values on a log axis, with the current rank drawn as a vertical line (what is kept is left of it)."""
    _need(df, ["k", "sigma"])
    fig = go.Figure(go.Scatter(x=df["k"], y=df["sigma"].clip(lower=1e-12), mode="lines", name="sigma_k"))
    if rank is not None:
        fig.add_vline(x=rank, line_dash="dash", line_color="crimson", annotation_text=f"rank {rank}")
    fig.update_yaxes(type="log")
    return _layout(fig, title, "index k", "singular value (log)")


def energy_chart(df: pd.DataFrame, rank: int | None = None, levels: Sequence[float] = (0.9, 0.95, 0.99)) -> go.Figure:
    """Cumulative energy; horizontal guides at the usual levels and the rank marker."""
    _need(df, ["k", "energy"])
    fig = go.Figure(go.Scatter(x=df["k"], y=df["energy"], mode="lines", name="cumulative energy"))
    for level in levels:
        fig.add_hline(y=level, line_dash="dot", line_color="grey", annotation_text=f"{level:.0%}",
                      annotation_position="bottom left")
    if rank is not None:
        fig.add_vline(x=rank, line_dash="dash", line_color="crimson", annotation_text=f"rank {rank}",
                      annotation_position="bottom right")
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, "Cumulative energy", "rank k", "share of ||W||_F^2 kept")


def unfoldings_frame(unfoldings: Sequence[Sequence[float]]) -> pd.DataFrame:
    """Long frame (bond, k, sigma) from one singular-value list per TT unfolding."""
    rows = [{"bond": f"bond {b + 1}", "k": k + 1, "sigma": float(s)}
            for b, values in enumerate(unfoldings) for k, s in enumerate(values)]
    if not rows:
        raise ValueError("unfoldings is empty: no TT bond to draw")
    return pd.DataFrame(rows)


def unfoldings_chart(df: pd.DataFrame, rank: int | None = None) -> go.Figure:
    """One log-spectrum line per TT bond; a rank cap acts on every bond at once, so one marker serves all."""
    _need(df, ["bond", "k", "sigma"])
    fig = go.Figure()
    for bond, part in df.groupby("bond", sort=False):
        fig.add_trace(go.Scatter(x=part["k"], y=part["sigma"].clip(lower=1e-12), mode="lines", name=str(bond)))
    if rank is not None:
        fig.add_vline(x=rank, line_dash="dash", line_color="crimson", annotation_text=f"rank cap {rank}")
    fig.update_yaxes(type="log")
    return _layout(fig, "TT unfolding spectra", "index k", "singular value (log)")


def heatmap_chart(df: pd.DataFrame, value: str = "value", title: str = "Energy kept per layer") -> go.Figure:
    """Layer x module-type grid (e.g. energy kept at the current rank) to spot compressible layers."""
    _need(df, ["layer", "module", value])
    grid = df.pivot_table(index="module", columns="layer", values=value, aggfunc="mean", sort=False)
    fig = go.Figure(go.Heatmap(z=grid.values, x=[str(c) for c in grid.columns], y=list(grid.index),
                               colorscale="Viridis", colorbar={"title": value}))
    return _layout(fig, title, "layer", "module")


def layer_error_chart(df: pd.DataFrame, error: str = "rel_error", title: str = "Per-layer relative error") -> go.Figure:
    """Bars of each layer's (predicted or measured) relative Frobenius error."""
    _need(df, ["name", error])
    fig = go.Figure(go.Bar(x=df["name"], y=df[error], name=error))
    fig.update_xaxes(showticklabels=len(df) <= 40)
    return _layout(fig, title, "layer", "relative error ||W - W_hat|| / ||W||")


def pareto_mask(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for points no other point beats on both x and y (lower is better on both)."""
    _need(df, [x, y])
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    keep = []
    for i in range(len(df)):
        dominated = np.any((xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i])))
        keep.append(not dominated and np.isfinite(xs[i]) and np.isfinite(ys[i]))
    return pd.Series(keep, index=df.index)


def tradeoff_chart(df: pd.DataFrame, x: str, y: str, reference: dict | None = None,
                   x_title: str | None = None, y_title: str | None = None,
                   extra: Sequence[dict] = (), lines: Sequence[dict] = ()) -> go.Figure:
    """Runs as points coloured by method, the Pareto front as a line, the original model as a star.

    df needs columns `label`, `method`, x and y; `reference` is {x: .., y: ..} of the original model; each of
    `extra` ({x: .., y: .., "label": ..}) is another reference drawn as a labelled diamond (e.g. free_cast_point);
    each of `lines` ({x: .., "label": ..}) is a size with no quality of its own, drawn as a labelled vertical line
    (e.g. source_line: the GGUF source's own size).
    """
    _need(df, ["label", "method", x, y])
    fig = go.Figure()
    palette = px.colors.qualitative.Plotly
    for i, (method, part) in enumerate(df.groupby("method", sort=True)):
        colour = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=str(method), text=part["label"],
                                 legendgroup=str(method), marker={"size": 10, "color": colour},
                                 hovertemplate="%{text}<br>%{x}, %{y}<extra></extra>"))
        own = part[pareto_mask(part, x, y)].sort_values(x)
        if len(own) > 1:  # each method's own front: where it stands against the others at every size
            fig.add_trace(go.Scatter(x=own[x], y=own[y], mode="lines", name=f"{method} front",
                                     legendgroup=str(method), showlegend=False,
                                     line={"color": colour, "width": 1.5}, hoverinfo="skip"))
    front = df[pareto_mask(df, x, y)].sort_values(x)
    if len(front):
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front",
                                 line={"dash": "dash", "color": "black"}))
    if reference is not None:
        fig.add_trace(go.Scatter(x=[reference[x]], y=[reference[y]], mode="markers", name=ORIGINAL_LABEL,
                                 marker={"symbol": "star", "size": 16, "color": "gold",
                                         "line": {"color": "black", "width": 1}}))
    for point in extra:
        fig.add_trace(go.Scatter(x=[point[x]], y=[point[y]], mode="markers", name=point["label"],
                                 marker={"symbol": "diamond", "size": 13, "color": "silver",
                                         "line": {"color": "black", "width": 1}}))
    for line in lines:
        fig.add_vline(x=line[x], line_dash="dot", line_color="firebrick", annotation_text=line["label"],
                      annotation_position="top left", name=line["label"])
    return _layout(fig, f"{y_title or y} vs {x_title or x}", x_title or x, y_title or y)


def loss_curve_chart(df: pd.DataFrame) -> go.Figure:
    """Healing loss per step; one line per `split` column value when present (train / held-out)."""
    _need(df, ["step", "loss"])
    fig = go.Figure()
    groups = df.groupby("split", sort=False) if "split" in df.columns else [("loss", df)]
    for split, part in groups:
        fig.add_trace(go.Scatter(x=part["step"], y=part["loss"], mode="lines+markers", name=str(split)))
    return _layout(fig, "Healing loss", "step", "loss")


def heal_curve_frame(heal: dict) -> pd.DataFrame:
    """A healing report (build.heal_loaded) -> step / loss / split rows for loss_curve_chart.

    Training KL per step and the held-out KL that picked the kept checkpoint, so a reader sees both whether
    healing still improved at its last step and which step was kept.
    """
    train = [{"step": i, "loss": v, "split": "train KL"} for i, v in enumerate(heal.get("loss_curve") or [], 1)]
    held = [{"step": s, "loss": v, "split": "held-out KL"} for s, v in heal.get("eval_curve") or []]
    return pd.DataFrame(train + held, columns=["step", "loss", "split"])


def layer_name_parts(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'): the block index and the module type."""
    parts = name.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if idx is None:
        raise ValueError(f"layer name {name!r} has no block index")
    return int(parts[idx]), ".".join(parts[idx + 1:]) or parts[idx - 1]


def energy_kept_frame(layers: Sequence[dict], rank: int) -> pd.DataFrame:
    """Long frame (name, layer, module, value, effective_rank) from spectrum layer entries.

    value = share of ||W||_F^2 in the top `rank` singular values: the part a rank cap keeps (the middle TT bond
    of an order-2 tensorisation is exactly W's matrix rank).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    rows = []
    for entry in layers:
        s = np.asarray(entry["singular_values"], dtype=float)
        total = float(np.sum(s**2))
        block, module = layer_name_parts(entry["name"])
        kept = float(np.sum(s[:rank] ** 2) / total) if total > 0 else 0.0
        rows.append({"name": entry["name"], "layer": block, "module": module, "value": kept,
                     "effective_rank": entry.get("effective_rank")})
    return pd.DataFrame(rows)


def _plan_summary(plan: dict) -> tuple[str, bool]:
    """(short label of a plan, whether it changes no layer at all: a measurement of the original)."""
    baseline = "*" in (plan.get("exclude") or []) or not plan.get("include", ["*"])
    if baseline:
        return "original (reference)", True
    set_per_layer = sum(1 for o in plan.get("overrides") or [] if not o.get("skip"))
    what = (f"{plan['target_ratio']:.0%} bytes" if plan.get("target_ratio") else
            f"rank {plan['rank']}" if plan.get("rank") else f"eps {plan['eps']}" if plan.get("eps") else
            f"per-layer plan ({set_per_layer} layer{'s' * (set_per_layer != 1)} set)" if set_per_layer else "")
    dens = f", d={plan['density']:g}" if plan.get("density") and not plan.get("target_ratio") else ""
    struct = " 2:4" if plan.get("structure") == "2:4" else ""
    if plan.get("bits"):  # a quantizing method: its grid is what a reader compares
        group = plan.get("quant_group", 64)
        struct += f" int{plan['bits']} {'per-row' if group == 0 else f'g{group}'}" + \
            (" sym" if plan.get("symmetric") else " asym")
    parts = [f"{name} {plan[key]}-bit" for key, name in (("value_bits", "values"), ("core_bits", "cores"))
             if plan.get(key, 16) != 16]
    struct += f" ({', '.join(parts)})" if parts else ""
    heal = f", healed {plan['heal_steps']} steps" if plan.get("heal_steps") else ""
    part = "" if plan.get("include", ["*"]) == ["*"] else f" (only {', '.join(plan['include'])})"
    return f"{plan.get('method', '?')}{struct} {what}{dens}".strip() + heal + part, False


DEPLOY_COLUMNS = ("dtype", "resident_bytes", "resident_bytes_original", "peak_memory_bytes",
                  "peak_memory_bytes_original", "memory_growth_bytes", "memory_growth_bytes_original", "decode_ratio",
                  "decode_ratio_min", "decode_ratio_max", "prefill_ratio", "prefill_ratio_min", "prefill_ratio_max",
                  "ratio_reference", "ratio_rounds", "macs_per_token_before", "macs_per_token_after")
_TOTALS_FIELDS = ("dtype", "macs_per_token_before", "macs_per_token_after")


def _deploy_fields(result: dict) -> dict:
    """A report's deployment measurements (DEPLOY_COLUMNS); None for each one an older job never recorded.

    Totals hold what the plan fixes (dtype, multiply-adds); `eval` what was measured, with the ratios also looked
    up in eval.latency and the round count in its side-by-side block.
    """
    ev, tot = result.get("eval") or {}, result.get("totals") or {}
    latency = ev.get("latency") or {}
    out = {}
    for name in DEPLOY_COLUMNS:
        place = tot if name in _TOTALS_FIELDS else ev
        out[name] = place.get(name, latency.get(name) if place is ev else None)
    if out["ratio_rounds"] is None:
        out["ratio_rounds"] = (latency.get("side_by_side") or {}).get("rounds")
    return out


def runs_frame(jobs: Sequence[dict]) -> pd.DataFrame:
    """One row per finished job (Job.to_dict()): label, method, sizes, quality, latency and memory, ready to plot.

    `baseline` rows ran a plan that changes nothing: their latency is the original model's on that device.
    `slower` is True when a compressed run decodes slower than its original: from the side-by-side ratio when
    the run has one (its whole min–max spread above 1), else against the reference job on the same device.
    """
    import json

    rows = []
    for job in jobs:
        plan = json.loads(job["plan_json"])
        label, baseline = _plan_summary(plan)
        result = json.loads(job["result_json"]) if job.get("result_json") else {}
        ev, tot = result.get("eval") or {}, result.get("totals") or {}
        rows.append({"id": job["id"], "label": f"#{job['id']} {label}", "model": job["model_ref"],
                     "method": "original" if baseline else plan.get("method", "?"), "baseline": baseline,
                     "device": job.get("device_used"), "bytes_before": job.get("bytes_before"),
                     "bytes_after": job.get("bytes_after"), "ppl": job.get("ppl"),
                     "ppl_original": ev.get("ppl_original"), "kl": job.get("kl"),
                     "top1_agreement": job.get("top1_agreement"), "decode_ms": job.get("decode_ms_per_token"),
                     "prefill_ms": job.get("prefill_ms"), "seconds": job.get("seconds"),
                     "model_bytes_before": tot.get("model_bytes_before"),
                     "model_bytes_after": tot.get("model_bytes_after"), "eval_text": ev.get("text_sha256"),
                     **_deploy_fields(result)})
    df = pd.DataFrame(rows, columns=["id", "label", "model", "method", "baseline", "device", "bytes_before",
                                     "bytes_after", "model_bytes_before", "model_bytes_after", "ppl", "ppl_original",
                                     "kl", "top1_agreement", "decode_ms", "prefill_ms", "seconds", "eval_text",
                                     *DEPLOY_COLUMNS])
    return _mark_slower(df)


def _reference_decode(df: pd.DataFrame, model: str, device: str | None) -> float | None:
    """Newest measured decode time of the original `model` on `device` (None when never measured)."""
    ref = df[df["baseline"] & (df["model"] == model) & (df["device"] == device) & df["decode_ms"].notna()]
    return None if ref.empty else float(ref.sort_values("id")["decode_ms"].iloc[-1])


def is_slower(row: dict) -> bool:
    """Whether a compressed run decodes slower: the side-by-side spread all above 1, else vs the reference job.

    Two jobs timed at different moments differ by tens of percent on a shared machine, so that comparison is
    only the fallback for runs recorded before side-by-side ratios existed.
    """
    if row["baseline"]:
        return False
    if not is_missing(row.get("decode_ratio")):
        low = row.get("decode_ratio_min")
        return float(row["decode_ratio"] if is_missing(low) else low) > 1.0
    ref, mine = row.get("decode_ms_original"), row.get("decode_ms")
    return bool(not is_missing(ref) and not is_missing(mine) and mine > ref)


def _mark_slower(df: pd.DataFrame) -> pd.DataFrame:
    df["decode_ms_original"] = [_reference_decode(df, m, d) for m, d in zip(df["model"], df["device"], strict=True)]
    df["slower"] = [is_slower(row) for row in df.to_dict("records")]
    return df


def speed_text(row: dict) -> str:
    """A run's decode speed in words for tables: side by side when measured, else vs the reference job (said so)."""
    if row["baseline"]:
        return ""
    if not is_missing(row.get("decode_ratio")):
        against = "" if is_missing(row.get("ratio_reference")) else f" (vs {row['ratio_reference']} original)"
        return speed_verdict(row["decode_ratio"], row.get("decode_ratio_min"), row.get("decode_ratio_max")) + against
    ref, mine = row.get("decode_ms_original"), row.get("decode_ms")
    if is_missing(ref) or is_missing(mine):
        return "not measured"
    return speed_verdict(float(mine) / float(ref)) + " (vs reference job, timed apart)"


MEMORY_MIB = {"resident_bytes": "resident (MiB)", "resident_bytes_original": "resident, original (MiB)",
              "peak_memory_bytes": "peak memory (MiB)", "peak_memory_bytes_original": "peak memory, original (MiB)",
              "memory_growth_bytes": "memory growth (MiB)",
              "memory_growth_bytes_original": "memory growth, original (MiB)"}


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """The Results page's run table: memory in MiB and the speed in words next to quality, raw bytes after.

    Columns that no run of `df` measured (memory growth on CUDA, ratios of older runs) are left out.
    """
    out = df.drop(columns=["model", "baseline", *MEMORY_MIB])
    for raw, name in MEMORY_MIB.items():
        out[name] = df[raw].astype(float) / 2**20
    out["speed"] = [speed_text(row) for row in df.to_dict("records")]
    front = ["id", "label", "method", "device", "dtype", "ppl", "ppl_original", "kl", "top1_agreement", "speed",
             *MEMORY_MIB.values()]
    out = out[front + [c for c in out.columns if c not in front]]
    optional = {*DEPLOY_COLUMNS, *MEMORY_MIB.values()}
    return out[[c for c in out.columns if c not in optional or out[c].notna().any()]]


def eval_texts(df: pd.DataFrame) -> list[str]:
    """Distinct evaluation-text fingerprints of the evaluated runs in `df` (runs before fingerprints: left out).

    More than one means their perplexities were measured on different texts and do not compare directly.
    """
    measured = df[df["ppl"].notna() & df["eval_text"].notna()]
    return sorted(measured["eval_text"].unique().tolist())


def newest_model(df: pd.DataFrame) -> str:
    """The model of the latest finished run: what the Results page opens on (the run a user just made)."""
    return str(df.sort_values("id")["model"].iloc[-1])


def with_size_mib(df: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """Add `size (MiB)`: whole-model bytes when every run recorded them, else the changed layers' bytes.

    Runs may change different layer subsets (the demo touches 18 of 210), so only whole-model sizes compare
    across runs; older runs without them fall back to the changed layers. Returns (frame, the bytes column
    used, axis title); reference_point's dict has the same column names.
    """
    out = df.copy()
    column = "model_bytes_after" if len(out) > 0 and out["model_bytes_after"].notna().all() else "bytes_after"
    out["size (MiB)"] = out[column].astype(float) / 2**20
    return out, column, "model size (MiB)" if column == "model_bytes_after" else "size of the changed layers (MiB)"


def reference_point(df: pd.DataFrame, model: str) -> dict | None:
    """The original model as a point for trade-off charts: its bytes, perplexity, decode time and deploy dtype."""
    runs = df[(df["model"] == model) & ~df["baseline"] & df["bytes_before"].notna()]
    if runs.empty:
        return None
    last = runs.sort_values("id").iloc[-1]
    return {"bytes_after": last["bytes_before"], "model_bytes_after": last["model_bytes_before"],
            "ppl": last["ppl_original"], "decode_ms": last["decode_ms_original"], "dtype": last["dtype"]}


def free_cast_point(reference: dict | None) -> dict | None:
    """The float32 original cast to bf16 as a point at half its bytes (None unless the original is float32).

    A 16-bit cast is free and keeps quality, so a float32 run's size saving must be read against it; drawn at
    the float32 original's perplexity (the cast changes it very little).
    """
    if reference is None or reference.get("dtype") != "float32":
        return None
    half = {k: None if is_missing(reference[k]) else reference[k] / 2 for k in ("bytes_after", "model_bytes_after")}
    return {**reference, **half, "decode_ms": None, "dtype": "bfloat16", "label": CAST_LABEL}


def source_line(reference: dict | None, source: dict | None, column: str) -> dict | None:
    """The GGUF source's own size on with_size_mib's axis ({column, "size (MiB)", "label"}), or None.

    The block linears at the source's bits/weight, everything else as the run counted it: on the whole-model axis
    (model_bytes_after) the source's block-linear parameters leave the original's bytes at the deploy dtype; on
    the changed-layers axis (bytes_after) the changed layers, all block linears, shrink to the source's size.
    None without a source, a reference, its dtype, or when the source's block linears do not fit the original.
    """
    from saten_core.deploy.dtype import ITEMSIZE
    from saten_core.quant.source import source_label, source_model_bytes

    if source is None or reference is None or not source.get("bits_per_weight"):
        return None
    item = ITEMSIZE.get(reference.get("dtype"))
    total = reference.get(column)
    if item is None or is_missing(total):
        return None
    block = int(total) if column == "bytes_after" else int(source["block_linear_params"]) * item
    if block > int(total):
        return None
    size = source_model_bytes(int(total), block, float(source["bits_per_weight"]), 8 * item)
    return sized({column: size, "label": source_label(source)}, column)


def grid_artefacts(jobs: Sequence[dict], source: dict | None) -> dict[int, str]:
    """Job id -> grid_artefact note for each finished quantizing run (rtn, gptq, saten-q) on a GGUF source.

    Read from the grids its layers were given (report layers' specs), so bits a target_ratio picked count too;
    runs whose layers use several grids get their distinct notes joined.
    """
    import json

    from saten_core.quant.source import grid_artefact
    from saten_core.spec import is_quantized

    if source is None:
        return {}
    out = {}
    for job in jobs:
        result = json.loads(job["result_json"]) if job.get("result_json") else {}
        specs = [layer.get("spec") or {} for layer in result.get("layers") or []]
        grids = {(int(s["bits"]), int(s.get("qgroup", 64)), bool(s.get("symmetric", False)))
                 for s in specs if is_quantized(s.get("method", "")) and s.get("bits")}
        notes = sorted({note for grid in grids if (note := grid_artefact(source, *grid))})
        if notes:
            out[int(job["id"])] = "; ".join(notes)
    return out


def sized(point: dict | None, column: str) -> dict | None:
    """A reference point with `size (MiB)` from its `column` bytes, matching with_size_mib's axis."""
    if point is None or is_missing(point.get(column)):
        return None
    return {**point, "size (MiB)": float(point[column]) / 2**20}


def sweeps_of(jobs: list[dict], model: str) -> list[str]:
    """Sweep ids among the finished job rows of `model`, newest first (ids sort by creation time)."""
    return sorted({j["sweep"] for j in jobs if j.get("sweep") and j["model_ref"] == model}, reverse=True)


def in_sweep(runs: pd.DataFrame, jobs: list[dict], sweep: str | None) -> pd.DataFrame:
    """The runs of one sweep (None: all of them); baseline rows (the original, reference jobs) always stay."""
    if sweep is None:
        return runs
    ids = {j["id"] for j in jobs if j.get("sweep") == sweep}
    return runs[runs["id"].isin(ids) | runs["baseline"]]
