"""Cheap preview of a Plan from cached spectra: exact bytes, multiply-adds and predicted per-layer error.

Error model (relative Frobenius error e = ||W - W_hat|| / ||W||, predicted as e^2):
- svd, rank r: e^2 = sum_{i>r} s_i^2 / sum s_i^2, exact (Eckart-Young).
- tt / saten TT part: each TT-SVD step k truncates an unfolding to bond r_k; with t_k the tail energy share of
  the ORIGINAL k-th unfolding beyond r_k, the kept share is modelled as prod_k (1 - t_k). Oseledets' bound
  sum_k t_k is an upper bound; the product is what nested orthogonal projections give when the discarded
  directions of different unfoldings are independent (closer to measured TT-SVD errors, see
  docs/benchmarks/spectrum.md). eps-driven ranks are read off the same unfolding spectra.
- sparse residual (saten): keeping density rho of the residual entries removes the share g(rho) of its energy,
  where g is the measured magnitude-energy profile of the layer's own entries (a sample of whole rows,
  spectrum.entry_energy_profile) - i.e. the residual is assumed to have the weight's (heavy-tailed) magnitude
  distribution shape rather than a Gaussian's; 2:4 uses the measured 2-of-4 share of the same sample.
- prune: e^2 = 1 - g(density) (or 1 - 2:4 share), from the same profile.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from saten_core.plan import Plan, layer_spec
from saten_core.spec import LayerSpec, storage_method
from saten_core.spectrum import DENSITY_GRID


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from its short name as stored in the spectra ("float32")."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in spectra")
    return dtype


def tail_share(values: list[float] | np.ndarray, rank: int) -> float:
    """Share of the energy beyond the top `rank` singular values (0 when rank covers the spectrum)."""
    e = np.asarray(values, dtype=np.float64) ** 2
    total = e.sum()
    return float(e[rank:].sum() / total) if total > 0 and rank < e.size else 0.0


def eps_ranks(unfoldings: list[list[float]], modes: list[int], eps: float, cap: int | None) -> list[int]:
    """Bond ranks TT-SVD picks for eps: smallest r_k whose discarded unfolding energy <= eps^2 ||W||^2/(d-1)."""
    from saten_core.tt import capped_ranks

    exact = capped_ranks(modes, cap)
    ranks = [1]
    for k, vals in enumerate(unfoldings):
        e = np.asarray(vals, dtype=np.float64) ** 2
        budget = eps**2 * e.sum() / len(unfoldings)
        tails = e.sum() - np.cumsum(e)  # tails[r-1] = energy beyond rank r
        r = int(np.argmax(tails <= budget + 1e-12 * e.sum())) + 1 if e.size else 1
        ranks.append(max(1, min(r, exact[k + 1], ranks[-1] * modes[k])))
    return ranks + [1]


def tt_error_sq(layer: dict, ranks: list[int]) -> float:
    """Predicted e^2 of a TT with these bond ranks (product model over unfolding tails, module docstring)."""
    kept = 1.0
    for k, vals in enumerate(layer["tt_unfoldings"]):
        kept *= 1.0 - tail_share(vals, ranks[k + 1])
    return max(0.0, 1.0 - kept)


def sparse_energy_share(layer: dict, density: float, structure: str) -> float:
    """Share of a residual's energy that keeping `density` of its largest entries removes (measured profile)."""
    if structure == "2:4":
        share = layer.get("entry_energy_2to4")
        return 0.0 if share is None else float(share)
    return float(np.interp(density, DENSITY_GRID, layer["entry_energy"]))


def _modes(layer: dict, spec: LayerSpec) -> list[int]:
    if storage_method(spec.method) == "svd":
        return [layer["in_features"], layer["out_features"]]
    if spec.order != 2 or not layer.get("tt_modes"):
        from saten_core.tensorize import tensorized_shape

        in_modes, out_modes = tensorized_shape(layer["in_features"], layer["out_features"], spec.order)
        return in_modes + out_modes
    return layer["tt_modes"][0] + layer["tt_modes"][1]


def _unfoldings(layer: dict, spec: LayerSpec) -> list[list[float]]:
    """Unfolding spectra for the spec's tensorisation (svd: the matrix itself)."""
    if storage_method(spec.method) == "svd":
        return [layer["singular_values"]]
    if spec.order != 2:
        raise ValueError(f"preview has unfolding spectra for order 2 only, got order {spec.order}")
    return layer["tt_unfoldings"]


def lowrank_ranks(layer: dict, spec: LayerSpec) -> list[int]:
    """Bond ranks [1, r1, ..., 1] the TT/SVD part will have (eps: predicted from the unfolding spectra)."""
    from saten_core.tt import capped_ranks

    modes = _modes(layer, spec)
    if spec.eps is not None:
        return eps_ranks(_unfoldings(layer, spec), modes, spec.eps, spec.rank)
    return capped_ranks(modes, spec.rank)


def nnz_of(layer: dict, spec: LayerSpec) -> int:
    """Kept sparse entries, exactly as layer.py counts them (2:4 keeps half; a row group rounds per row)."""
    from saten_core.layer import kept_entries

    return kept_entries(layer["in_features"], layer["out_features"], spec)


def predicted_error_sq(layer: dict, spec: LayerSpec, ranks: list[int]) -> float:
    """Predicted e^2 for one layer and resolved spec (module docstring gives the model)."""
    if storage_method(spec.method) == "prune":
        return max(0.0, 1.0 - sparse_energy_share(layer, spec.density, spec.structure))
    if storage_method(spec.method) == "svd":
        lowrank = tail_share(layer["singular_values"], ranks[1])
    else:
        lowrank = tt_error_sq(layer, ranks)
    if storage_method(spec.method) == "saten" and nnz_of(layer, spec):
        lowrank *= 1.0 - sparse_energy_share(layer, spec.density, spec.structure)
    return max(0.0, lowrank)


def _stored_bytes(layer: dict, spec: LayerSpec, ranks: list[int], nnz: int, dtype: torch.dtype) -> tuple[int, bool]:
    """(weight bytes, exact?) - exact from layer.predict_bytes unless eps decides the ranks."""
    from saten_core.layer import predict_bytes
    from saten_core.sparse import mask_bytes
    from saten_core.tt import tt_param_count

    exact = predict_bytes(layer["in_features"], layer["out_features"], spec, dtype)
    if exact is not None:
        return exact, True
    elem = dtype.itemsize
    numel = layer["in_features"] * layer["out_features"]
    sparse = nnz * elem + mask_bytes(numel, nnz, spec.structure) if nnz else 0
    return tt_param_count(_modes(layer, spec), ranks) * elem + sparse, False


def preview_layer(plan: Plan, layer: dict) -> dict:
    """One row: resolved spec, bytes (exact when predictable), multiply-adds per token and predicted error."""
    n_in, n_out = layer["in_features"], layer["out_features"]
    dtype = plan.torch_dtype()  # bytes as served (the spectra may come from a model loaded at another dtype)
    stored = torch_dtype(layer["dtype"]).itemsize
    bias = int(layer.get("bias_bytes", 0)) * dtype.itemsize // stored
    before = n_in * n_out * dtype.itemsize + bias
    spec = layer_spec(plan, layer["name"], n_in, n_out, dtype)
    row = {"name": layer["name"], "shape": [n_out, n_in], "spec": None, "ranks": None, "nnz": None,
           "bytes_before": before, "predicted_bytes": before, "bytes_exact": True,
           "macs_before": n_in * n_out, "macs_per_token": n_in * n_out, "predicted_rel_error": 0.0}
    if spec is None:
        return row
    ranks = lowrank_ranks(layer, spec) if storage_method(spec.method) != "prune" else []
    nnz = nnz_of(layer, spec)
    weight_bytes, exact = _stored_bytes(layer, spec, ranks, nnz, dtype)
    mid = ranks[len(_modes(layer, spec)) // 2] if ranks else 0
    row.update(spec=spec.to_dict(), ranks=ranks, nnz=nnz, predicted_bytes=weight_bytes + bias,
               bytes_exact=exact, macs_per_token=mid * (n_in + n_out) + nnz,
               predicted_rel_error=math.sqrt(predicted_error_sq(layer, spec, ranks)))
    return row


def preview(plan: Plan, spectra: dict[str, Any]) -> dict:
    """Rows for every layer in `spectra` plus totals; no weights are touched (dashboard-slider fast).

    Example:
        >>> spectra = model_spectra(loaded.model)
        >>> preview(Plan(method="svd", rank=64), spectra)["totals"]["predicted_bytes"]
    """
    plan.validate()
    rows = [preview_layer(plan, layer) for layer in spectra["layers"]]
    return {"layers": rows, "totals": preview_totals(rows)}


def preview_totals(rows: list[dict]) -> dict:
    """Sums over rows; `rel_error_rms` is the energy-unweighted RMS of the per-layer relative errors."""
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["predicted_bytes"] for r in rows)
    errs = [r["predicted_rel_error"] for r in rows if r["spec"] is not None]
    return {"layers": len(rows), "layers_changed": len(errs), "bytes_before": before, "predicted_bytes": after,
            "bytes_exact": all(r["bytes_exact"] for r in rows), "ratio": after / before if before else 1.0,
            "macs_before": sum(r["macs_before"] for r in rows),
            "macs_per_token": sum(r["macs_per_token"] for r in rows),
            "rel_error_rms": math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0}
