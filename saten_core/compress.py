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
              should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Compress every layer the plan selects and return one report per compressed layer.

    All specs are resolved first, so a bad plan fails before any layer changes.
    Example:
        reports = compress_(loaded.model, Plan(method="saten", target_ratio=0.8))
        sum(r["bytes_after"] for r in reports) <= 0.8 * sum(r["bytes_before"] for r in reports)
    """
    from saten_core.models import linear_layers

    plan.validate()
    todo = _resolve(model, plan, linear_layers(model))
    reports = []
    for i, (name, linear, spec) in enumerate(todo):
        if should_stop is not None and should_stop():
            raise Cancelled(f"cancelled after {i} of {len(todo)} layers")
        reports.append(_compress_one(model, name, linear, spec))
        if progress is not None:
            progress("compress", (i + 1) / len(todo), f"{name} {reports[-1]['shape']} rel_error "
                                                       f"{reports[-1]['rel_error']:.4f}")
    return reports


def _resolve(model: nn.Module, plan: Plan, layers: list[tuple[str, nn.Linear]]) -> list[tuple]:
    todo = []
    for name, lin in layers:
        if not isinstance(lin, nn.Linear):
            continue  # already compressed: a plan applies to dense layers only
        spec = layer_spec(plan, name, lin.in_features, lin.out_features, lin.weight.dtype)
        if spec is not None:
            todo.append((name, lin, spec))
    return todo


def _compress_one(model: nn.Module, name: str, linear: nn.Linear, spec: Any) -> dict:
    """Build the SatenLinear, measure it against the dense weight, and swap it into the model."""
    from saten_core.layer import SatenLinear

    start = time.perf_counter()
    new = SatenLinear.from_linear(linear, spec)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        w = linear.weight.float()
        rel_error = (torch.linalg.norm(new.to_dense().float() - w) / torch.linalg.norm(w).clamp_min(1e-30)).item()
    report = layer_report(name, linear, new, rel_error, seconds)
    set_submodule(model, name, new)
    return report


def layer_report(name: str, linear: nn.Linear, new: nn.Module, rel_error: float, seconds: float) -> dict:
    """Exact accounting for one layer; biases count on both sides so the totals are whole-layer bytes."""
    layout = new.layout()
    bias_params = linear.bias.numel() if linear.bias is not None else 0
    bias_bytes = bias_params * linear.bias.element_size() if linear.bias is not None else 0
    n_in, n_out = linear.in_features, linear.out_features
    return {
        "name": name, "shape": [n_out, n_in], "spec": new.spec.to_dict(),
        "ranks": layout.get("ranks"), "nnz": layout.get("nnz"),
        "params_before": n_in * n_out + bias_params, "params_after": new.param_count() + bias_params,
        "bytes_before": linear.weight.numel() * linear.weight.element_size() + bias_bytes,
        "bytes_after": new.stored_bytes() + bias_bytes,
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
    out["ratio"] = out["bytes_after"] / out["bytes_before"] if out["bytes_before"] else 1.0
    return out
