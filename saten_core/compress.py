"""compress_: the one verb that swaps a model's selected nn.Linear layers for SatenLinear, in place."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from saten_core.plan import Plan, layer_spec

Progress = Callable[[str, float, str], None]


class Cancelled(Exception):
    """Raised between layers when should_stop() says so; layers already swapped stay compressed."""


def compress_(model: nn.Module, plan: Plan, *, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, stats: dict[str, Any] | None = None) -> list[dict]:
    """Compress every layer the plan selects and return one report per compressed layer.

    `stats` maps layer name -> calibrate.InputStats (collected on the uncompressed model); activation-aware
    methods need it for every layer they compress, and with it each report also has `rel_output_error`.
    All specs are resolved first, so a bad plan (or missing statistics) fails before any layer changes.
    Example:
        reports = compress_(loaded.model, Plan(method="saten", target_ratio=0.8))
        sum(r["bytes_after"] for r in reports) <= 0.8 * sum(r["bytes_before"] for r in reports)
    """
    plan.validate()
    stats = stats or {}
    todo = planned_layers(model, plan)
    _check_stats(todo, stats)
    reports = []
    dtype = plan.torch_dtype()
    for i, (name, linear, spec) in enumerate(todo):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled after {i} of {len(todo)} layers")
        reports.append(compress_layer(model, name, linear, spec, stats.get(name), dtype))
        if progress is not None:
            progress("compress", (i + 1) / len(todo), f"{name} {reports[-1]['shape']} rel_error "
                                                       f"{reports[-1]['rel_error']:.4f}")
    return reports


def planned_layers(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Linear, Any]]:
    """(name, dense linear, resolved LayerSpec) of every layer the plan will compress, in model order."""
    from saten_core.models import block_linears

    todo = []
    for name, lin in block_linears(model):
        if not isinstance(lin, nn.Linear):
            continue  # already compressed: a plan applies to dense layers only
        spec = layer_spec(plan, name, lin.in_features, lin.out_features)  # budgets at the deploy dtype
        if spec is not None:
            todo.append((name, lin, spec))
    return todo


def _check_stats(todo: list[tuple], stats: dict[str, Any]) -> None:
    """Activation-aware layers without calibration statistics fail up front, naming layer and method."""
    from saten_core.spec import needs_stats

    for name, _, spec in todo:
        if needs_stats(spec.method) and name not in stats:
            raise ValueError(f"layer {name}: method {spec.method!r} needs calibration input statistics "
                             "(collect them with calibrate.collect_input_stats), none given")


def compress_layer(model: nn.Module, name: str, linear: nn.Linear, spec: Any, stats: Any = None,
                  dtype: torch.dtype | None = None) -> dict:
    """Build the SatenLinear (parts rounded to the deploy `dtype`), measure it against the dense weight, swap it in."""
    from saten_core.layer import SatenLinear
    from saten_core.quant.layer import QuantLinear
    from saten_core.spec import is_quantized

    dtype = dtype or linear.weight.dtype
    start = time.perf_counter()
    kind = QuantLinear if is_quantized(spec.method) else SatenLinear
    new = kind.from_linear(linear, spec, stats=stats, dtype=dtype)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        w = linear.weight.float()
        delta = new.to_dense().float() - w
        rel_error = (torch.linalg.norm(delta) / torch.linalg.norm(w).clamp_min(1e-30)).item()
        out_error = None if stats is None else relative_output_error(delta, w, stats.xtx)  # scale-free: X^T X, no copy
    report = layer_report(name, linear, new, rel_error, seconds, dtype)
    if out_error is not None:
        report["rel_output_error"] = out_error
    set_submodule(model, name, new)
    return report


def relative_output_error(delta: torch.Tensor, w: torch.Tensor, second_moment: torch.Tensor) -> float:
    """||X dW^T|| / ||X W^T|| on the calibration inputs, from their second moment C: tr(dW C dW^T) ratios.

    delta, w: (out, in) like nn.Linear.weight; second_moment: (in, in), any positive multiple of it (the ratio
    is scale-free, so callers pass X^T X itself rather than a divided copy).
    """
    from saten_core import whiten

    delta, w = delta.detach(), w.detach()  # a number, not a graph: callers pass trainable weights after healing
    c = second_moment.detach().to(w.device, torch.float64)
    rows = max(1, whiten.SLAB // c.shape[0])  # float64 slabs of <= 32 MB: no float64 copy of the whole weight
    num = torch.zeros((), dtype=torch.float64, device=w.device)
    den = torch.zeros((), dtype=torch.float64, device=w.device)
    for i in range(0, w.shape[0], rows):
        d, ww = delta[i : i + rows].double(), w[i : i + rows].double()
        num += torch.sum((d @ c) * d)
        den += torch.sum((ww @ c) * ww)
    return float(torch.sqrt(num.clamp_min(0) / den.clamp_min(1e-30)))


def layer_report(name: str, linear: nn.Linear, new: nn.Module, rel_error: float, seconds: float,
                 dtype: torch.dtype | None = None) -> dict:
    """Exact accounting for one layer at the deploy `dtype` (default: as stored); biases count on both sides."""
    layout = new.layout()
    elem = (dtype or linear.weight.dtype).itemsize
    bias_params = linear.bias.numel() if linear.bias is not None else 0
    bias_bytes = bias_params * elem
    n_in, n_out = linear.in_features, linear.out_features
    return {
        "name": name, "shape": [n_out, n_in], "spec": new.spec.to_dict(),
        "ranks": layout["ranks"], "nnz": layout["nnz"],
        "params_before": n_in * n_out + bias_params, "params_after": new.param_count() + bias_params,
        "bytes_before": linear.weight.numel() * elem + bias_bytes,
        "bytes_after": new.stored_bytes(dtype) + bias_bytes,
        "macs_before": n_in * n_out, "macs_per_token": new.macs_per_token(),
        "rel_error": rel_error, "seconds": seconds,
    }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path `name` (nn.Module has get_submodule but no setter)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def totals(reports: list[dict]) -> dict:
    """Whole-run sums of the per-layer reports."""
    keys = ("params_before", "params_after", "bytes_before", "bytes_after", "macs_before", "macs_per_token",
            "seconds")
    out = {k: sum(r[k] for r in reports) for k in keys}
    out["layers"] = len(reports)
    out["macs_per_token_before"], out["macs_per_token_after"] = out["macs_before"], out["macs_per_token"]
    out["ratio"] = out["bytes_after"] / out["bytes_before"] if out["bytes_before"] else 1.0
    return out
