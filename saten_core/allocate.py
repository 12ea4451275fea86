"""Budget-driven allocation: per-layer rank/density that minimise total predicted error under a byte target.

Objective: the sum over layers of parameters x predicted squared relative error, n_l e_l^2 (preview.py's error
model; every weight counts once, so an MLP matrix 2.7x the size of q_proj weighs 2.7x). Measured on smollm2-135m
(docs/benchmarks/spectrum.md, held-out ppl): the first objective, every layer weighted equally, gave attention
bytes the MLP needed; for saten-aw it lost to the uniform plan at 60% (16.84 vs 15.79) while this one beats it at
both budgets (14.38 at 60%, 9.95 at 80% vs 10.34); for data-free saten it is better at 60% (45.4 vs 71.1) and
within 2% at 80% (11.21 vs 11.02), both far below uniform (326, 13.89).
Constraint: sum of exact stored weight bytes <= target_ratio * dense block-linear
weight bytes (biases are identical on both sides and left out, as plan.py does).
Method: per layer, a table of candidate settings (exact bytes from layer.predict_bytes, predicted error), its
lower convex hull, then greedy marginal gain per byte from every layer's cheapest point (the Lagrangian
solution), and a last pass that spends the leftover on the best non-hull candidate that still fits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from saten_core.plan import Override, Plan, mask_group, matching_override, selected
from saten_core.preview import sparse_energy_share, tail_share, tt_error_sq
from saten_core.spec import LayerSpec, needs_stats, storage_method

Progress = Callable[[str, float, str], None]
# Densities tried per rank: 40 log-spaced points. A finer grid (log-spaced to 5%, then every 0.5%) was measured and
# is not better overall: allocated saten-aw at 50% bytes 27.48 vs 29.38 held-out ppl, but data-free saten 12.03 vs
# 11.21 at 80% and 789 vs 440 at 50% (per-layer masks, docs/BENCHMARKS.md).
SATEN_DENSITIES = (0.0, *np.geomspace(1e-3, 1.0, 40).round(6).tolist())
PRUNE_DENSITIES = tuple(np.linspace(0.005, 1.0, 200).round(6).tolist())
_SATEN_RANKS = 48  # rank caps tried per layer for saten (log-spaced); tt/svd try every rank


def _max_rank(n_in: int, n_out: int, method: str, order: int) -> int:
    """Largest rank cap that changes anything: the biggest exact bond of the tensorisation."""
    from saten_core.tensorize import tensorized_shape
    from saten_core.tt import capped_ranks

    in_modes, out_modes = tensorized_shape(n_in, n_out, 1 if method == "svd" else order)
    return max(1, min(max(capped_ranks(in_modes + out_modes, None)), n_in, n_out))


@lru_cache(maxsize=64)
def _grid(n_in: int, n_out: int, method: str, structure: str, order: int, dtype: torch.dtype,
          group: str = "layer") -> tuple:
    """(ranks, densities, bytes[r, d]) for one layer shape: exact stored bytes of every candidate setting."""
    from saten_core.layer import predict_bytes

    top = _max_rank(n_in, n_out, method, order)
    if method == "prune":
        ranks = [None]
    elif method == "saten":
        ranks = sorted({int(round(r)) for r in np.geomspace(1, top, _SATEN_RANKS)})
    else:
        ranks = list(range(1, top + 1))
    if structure == "2:4" and method in ("saten", "prune"):
        densities = [0.5]
    else:
        densities = {"saten": SATEN_DENSITIES, "prune": PRUNE_DENSITIES}.get(method, (0.0,))
    spec = LayerSpec(method=method, structure=structure, order=1 if method == "svd" else order, group=group)
    table = np.array([[predict_bytes(n_in, n_out, replace(spec, rank=r, density=d), dtype) for d in densities]
                      for r in ranks], dtype=np.float64)
    return ranks, list(densities), table


def _lowrank_err_sq(layer: dict, method: str, ranks: list, order: int) -> np.ndarray:
    """Predicted e^2 of the low-rank part for every rank cap (1 for prune, which has none)."""
    from saten_core.tt import capped_ranks

    if method == "prune":
        return np.ones(1)
    if method == "svd":
        return np.array([tail_share(layer["singular_values"], r) for r in ranks])
    modes = layer["tt_modes"][0] + layer["tt_modes"][1]
    return np.array([tt_error_sq(layer, capped_ranks(modes, r)) for r in ranks])


def layer_candidates(layer: dict, plan: Plan) -> dict:
    """All settings tried for one layer: bytes, predicted e^2 and (rank, density) per candidate, plus dense."""
    n_in, n_out = layer["in_features"], layer["out_features"]
    dtype = plan.torch_dtype()  # bytes as served, whatever dtype the spectra were computed from
    kind = storage_method(plan.method)  # same bytes as the data-free twin; errors come from the spectra given
    ranks, densities, table = _grid(n_in, n_out, kind, plan.structure, plan.order, dtype, mask_group(plan))
    low = _lowrank_err_sq(layer, kind, ranks, plan.order)
    if kind in ("saten", "prune"):
        kept = np.array([sparse_energy_share(layer, d, plan.structure) if d > 0 or plan.structure == "2:4"
                         else 0.0 for d in densities])
        err = low[:, None] * (1.0 - kept[None, :])
    else:
        err = low[:, None] * np.ones((1, len(densities)))
    settings = [(r, d) for r in ranks for d in densities] + [None]  # None = keep the layer dense
    dense = float(n_in * n_out * dtype.itemsize)
    return {"bytes": np.append(table.ravel(), dense), "err": np.append(err.ravel(), 0.0), "settings": settings}


def lower_hull(nbytes: np.ndarray, err: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (bytes, err), bytes increasing and err strictly decreasing."""
    order = np.lexsort((err, nbytes))
    hull: list[int] = []
    for i in order:
        if hull and (nbytes[i] == nbytes[hull[-1]] or err[i] >= err[hull[-1]]):
            continue  # same bytes with no better error, or more bytes for no gain
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (nbytes[b] - nbytes[a]) * (err[i] - err[a]) - (err[b] - err[a]) * (nbytes[i] - nbytes[a])
            if cross > 0:
                break
            hull.pop()  # b lies on or above the segment a -> i
        hull.append(int(i))
    return hull


def greedy(cands: list[dict], budget: float) -> list[int]:
    """Chosen candidate index per layer: hull-greedy by error drop per byte, then fill the leftover."""
    hulls = [lower_hull(c["bytes"], c["err"]) for c in cands]
    pos = [0] * len(cands)
    used = sum(c["bytes"][h[0]] for c, h in zip(cands, hulls, strict=True))
    if used > budget:
        raise ValueError(f"target is too small: the cheapest setting of every layer needs {int(used)} bytes "
                         f"> budget {int(budget)}")
    heap = [(-_slope(c, h, 0), i) for i, (c, h) in enumerate(zip(cands, hulls, strict=True)) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c, h = cands[i], hulls[i]
        step = c["bytes"][h[pos[i] + 1]] - c["bytes"][h[pos[i]]]
        if used + step > budget:
            continue  # this layer's next step does not fit; others may
        used += step
        pos[i] += 1
        if pos[i] + 1 < len(h):
            heapq.heappush(heap, (-_slope(c, h, pos[i]), i))
    chosen = [h[p] for h, p in zip(hulls, pos, strict=True)]
    return _fill(cands, chosen, budget - used)


def _slope(c: dict, hull: list[int], k: int) -> float:
    a, b = hull[k], hull[k + 1]
    return (c["err"][a] - c["err"][b]) / (c["bytes"][b] - c["bytes"][a])


def _fill(cands: list[dict], chosen: list[int], left: float) -> list[int]:
    """Spend what the hull steps could not use on any candidate that lowers a layer's error and still fits."""
    for i in sorted(range(len(cands)), key=lambda i: -cands[i]["err"][chosen[i]]):
        c, cur = cands[i], chosen[i]
        ok = (c["bytes"] <= c["bytes"][cur] + left) & (c["err"] < c["err"][cur])
        if ok.any():
            best = int(np.flatnonzero(ok)[np.argmin(c["err"][ok])])
            left -= c["bytes"][best] - c["bytes"][cur]
            chosen[i] = best
    return chosen


def layer_weight(layer: dict) -> float:
    """A layer's weight in the objective: its parameter count (see the module docstring for the measurement)."""
    return float(layer["in_features"] * layer["out_features"])


def weighted(cands: dict, weight: float) -> dict:
    """The same candidates with their predicted errors scaled into the objective's units."""
    return dict(cands, err=cands["err"] * weight)


def _override(name: str, setting: tuple | None, plan: Plan) -> Override:
    if setting is None:
        return Override(pattern=name, skip=True)
    rank, density = setting
    if storage_method(plan.method) in ("tt", "svd") or plan.structure == "2:4":
        return Override(pattern=name, rank=rank)
    return Override(pattern=name, rank=rank, density=float(density))


def activation_spectra(loaded: Any, plan: Plan, *, stats: dict | None = None,
                       progress: Progress | None = None) -> dict:
    """Spectra of the whitened weights W L (L L^T = a layer's input second moment), for activation-aware plans.

    Why: saten-aw / svd-w / wanda minimise the output error ||X E^T||_F = sqrt(T) ||E L||_F, so the error a
    rank or density leaves can be read off the spectra of W L rather than of W. The entry profile (for the
    residual / pruning mask, scored by |w| x input-column norm) comes from W diag(norms). Same record layout as
    spectrum.model_spectra. Not cached: it depends on the text. Opt-in only
    (allocate_plan(..., spectra=activation_spectra(...))): on smollm2-135m it measured worse than the uniform
    plan for saten-aw (see allocate_plan): compressing the uniform plan, the real output error of q/k/o/gate
    layers (inputs with strongly correlated channels) was 1.3-1.5x what this model predicts, and 1.7-2.4x on the
    budgets it then gave them, so it starves exactly those layers. The correlated-input effect on the mask (scored
    by column norms, not the full second moment) is the likeliest cause.
    stats: calibration statistics by layer name (build.collect_stats); collected from plan.calib when None.
    """
    from types import SimpleNamespace

    from saten_core.build import collect_stats
    from saten_core.calibrate import whitening_factor
    from saten_core.models import linear_layers
    from saten_core.spectrum import compute_spectra, entry_energy_profile

    if not needs_stats(plan.method):
        raise ValueError(f"method {plan.method!r} uses no calibration statistics; use spectrum.model_spectra")
    stats = collect_stats(loaded, plan, progress=progress) if stats is None else stats
    layers, scored = [], {}
    for name, lin in linear_layers(loaded.model):
        if name not in stats:  # a layer the plan leaves alone keeps its own spectrum
            layers.append((name, lin))
            continue
        w = lin.weight.detach()
        low = whitening_factor(stats[name]).to(w.device)
        layers.append((name, SimpleNamespace(weight=(w.double() @ low).to(w.dtype), bias=lin.bias)))
        scored[name] = w * stats[name].column_norms.to(w)
    data = compute_spectra(layers, progress=progress)
    for entry in data["layers"]:
        if entry["name"] in scored:
            entry.update(entry_energy_profile(scored[entry["name"]]))
    return data


def allocate_plan(loaded: Any, plan: Plan, *, progress: Progress | None = None,
                  spectra: dict | None = None) -> Plan:
    """A Plan with one override per layer (exact names) meeting plan.target_ratio of block-linear bytes.

    Every method allocates on the weights' own spectra (cached model_spectra) unless `spectra` is passed.
    For activation-aware methods, passing activation_spectra(...) allocates on the whitened spectra instead;
    that is not the default because it measured worse than the uniform plan on smollm2-135m (held-out ppl 13.99
    vs 10.34 at 80% bytes, 30.30 vs 15.79 at 60%, objective as below), while the weight spectra gave 9.95 and
    14.38 (docs/benchmarks/spectrum.md). Activation statistics still shape every layer's own compression.
    Layers the plan does not select, or skips by an override, stay dense and count against the budget; the
    plan's other overrides are replaced. The result has no target_ratio: its overrides fix every layer, so a
    user can edit any of them and compress/dry-run as usual.
    Example:
        >>> plan = allocate_plan(load_model("smollm2-135m"), Plan(method="saten", target_ratio=0.8))
        >>> plan.overrides[0]
    """
    from saten_core.spectrum import model_spectra

    plan.validate()
    if plan.target_ratio is None:
        raise ValueError("allocation needs a target ratio (fraction of block-linear bytes to keep), got None")
    if storage_method(plan.method) in ("saten", "tt") and plan.order != 2:
        raise ValueError(f"allocation uses order-2 unfolding spectra; plan order {plan.order} is not supported")
    model = getattr(loaded, "model", loaded)
    spectra = spectra if spectra is not None else model_spectra(model, progress=progress)
    free, fixed_bytes, total = [], 0.0, 0.0
    for layer in spectra["layers"]:
        dense = layer["in_features"] * layer["out_features"] * plan.torch_dtype().itemsize
        total += dense
        keep = matching_override(plan, layer["name"])
        if selected(plan, layer["name"]) and not (keep is not None and keep.skip):
            free.append(layer)
        else:
            fixed_bytes += dense
    budget = math.floor(plan.target_ratio * total) - fixed_bytes
    cands = []
    for i, layer in enumerate(free):
        cands.append(weighted(layer_candidates(layer, plan), layer_weight(layer)))
        if progress:
            progress("allocate", (i + 1) / max(len(free), 1), layer["name"])
    chosen = greedy(cands, budget)
    skips = [o for o in plan.overrides if o.skip]
    overrides = [_override(layer["name"], c["settings"][k], plan) for layer, c, k in zip(free, cands, chosen,
                                                                                          strict=True)]
    return replace(plan, target_ratio=None, rank=None, eps=None, overrides=skips + overrides)
