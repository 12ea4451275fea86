"""Plotly figures for the dashboard and the report, built from pandas DataFrames (no streamlit here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

ORIGINAL_LABEL = "original"


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
        fig.add_hline(y=level, line_dash="dot", line_color="grey", annotation_text=f"{level:.0%}")
    if rank is not None:
        fig.add_vline(x=rank, line_dash="dash", line_color="crimson", annotation_text=f"rank {rank}")
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
                   x_title: str | None = None, y_title: str | None = None) -> go.Figure:
    """Runs as points coloured by method, the Pareto front as a line, the original model as a star.

    df needs columns `label`, `method`, x and y; `reference` is {x: .., y: ..} of the original model.
    """
    _need(df, ["label", "method", x, y])
    fig = go.Figure()
    for method, part in df.groupby("method", sort=True):
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=str(method), text=part["label"],
                                 marker={"size": 10}, hovertemplate="%{text}<br>%{x}, %{y}<extra></extra>"))
    front = df[pareto_mask(df, x, y)].sort_values(x)
    if len(front):
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front",
                                 line={"dash": "dash", "color": "black"}))
    if reference is not None:
        fig.add_trace(go.Scatter(x=[reference[x]], y=[reference[y]], mode="markers", name=ORIGINAL_LABEL,
                                 marker={"symbol": "star", "size": 16, "color": "gold",
                                         "line": {"color": "black", "width": 1}}))
    return _layout(fig, f"{y_title or y} vs {x_title or x}", x_title or x, y_title or y)


def loss_curve_chart(df: pd.DataFrame) -> go.Figure:
    """Healing loss per step; one line per `split` column value when present (train / held-out)."""
    _need(df, ["step", "loss"])
    fig = go.Figure()
    groups = df.groupby("split", sort=False) if "split" in df.columns else [("loss", df)]
    for split, part in groups:
        fig.add_trace(go.Scatter(x=part["step"], y=part["loss"], mode="lines+markers", name=str(split)))
    return _layout(fig, "Healing loss", "step", "loss")
