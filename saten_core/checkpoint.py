"""Compressed model folders: save (safetensors + plan + report), load without the original, dense HF export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saten_core.deploy.dtype import dtype_name, torch_dtype
from saten_core.files import atomic_dir
from saten_core.plan import Plan

WEIGHTS = "model.safetensors"
REPORT = "report.json"
PLAN = "plan.json"


def is_compressed_dir(ref: str | Path) -> bool:
    """A compressed DIR is recognised by its report.json + plan.json next to the weights."""
    folder = Path(ref)
    return folder.is_dir() and (folder / REPORT).is_file() and (folder / PLAN).is_file()


def build_report(loaded: Any, layers: list[dict], **extra: Any) -> dict:
    """Report dict: per-layer reports, totals and where the model came from (what reloading needs)."""
    from saten_core.compress import totals

    report = {"source_ref": source_ref(loaded.ref), "name": loaded.name, "kind": loaded.kind,
              "dtype": dtype_name(getattr(loaded, "dtype", torch.float32)),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "layers": layers, "totals": totals(layers)}
    report.update(extra)
    return report


def source_ref(ref: str) -> str:
    """A local folder is stored as an absolute path, so eval finds the original from any working directory."""
    path = Path(ref)
    return str(path.resolve()) if path.is_dir() else str(ref)


def saten_layouts(model: nn.Module) -> dict[str, dict]:
    """layout() of every compressed layer (SatenLinear, QuantLinear), keyed by module name: the skeleton needed to
    load the state dict. A QuantLinear's repair is part of its own layout, not a layer of its own."""
    from saten_core.models import linear_layers

    return {name: m.layout() for name, m in linear_layers(model) if hasattr(m, "layout")}


def save_compressed(loaded: Any, plan: Plan, report: dict | list[dict], out_dir: str | Path) -> dict:
    """Write DIR atomically: model.safetensors (whole state dict), config, tokenizer, plan.json, report.json.

    `report` is either build_report's dict or the bare list of layer reports. Returns the report written
    (with `layouts` and `totals.file_bytes` added). A failure leaves no DIR behind.
    """
    from safetensors.torch import save_model

    if isinstance(report, list):
        report = build_report(loaded, report)
    report = dict(report, layouts=saten_layouts(loaded.model))
    with atomic_dir(out_dir) as tmp:
        save_model(loaded.model, str(tmp / WEIGHTS), metadata={"format": "pt", "saten": "1"})
        loaded.model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        report["totals"] = dict(report.get("totals", {}), file_bytes=(tmp / WEIGHTS).stat().st_size)
        (tmp / PLAN).write_text(plan.to_json(), encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def read_report(folder: str | Path) -> dict:
    """report.json of a compressed DIR; a missing or corrupt file names the path."""
    path = Path(folder) / REPORT
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt report {path}: {e}") from None


def load_compressed(folder: str | Path, device: str = "cpu") -> Any:
    """Rebuild the architecture from config, swap in SatenLinear skeletons, load the weights strictly.

    Example:
        lm = load_compressed("out/smollm2-80")      # no access to the original weights needed
        lm.model(**lm.tokenizer("hi", return_tensors="pt")).logits
    """
    from saten_core.models import LoadedModel, load_config, resolve_device

    folder = Path(folder)
    if not is_compressed_dir(folder):
        raise ValueError(f"not a compressed model folder (needs {REPORT} and {PLAN}): {folder}")
    report, dev = read_report(folder), resolve_device(device)
    config = load_config(folder)
    dtype = report_dtype(report)
    model = _skeleton(config, report["kind"], dtype)
    _load_weights(model, report.get("layouts", {}), folder / WEIGHTS)
    model = model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=_tokenizer(folder), name=f"{report['name']} (compressed)",
                       kind=report["kind"], ref=str(folder), config=config, source_dir=folder, device=dev,
                       dtype=dtype)


def _tie_embeddings(model: nn.Module) -> None:
    """safetensors stores a tied tensor once, under either name: point the missing side at the stored one."""
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not tie or inp is None or out is None:
        return
    if inp.weight.is_meta and not out.weight.is_meta:
        inp.weight = out.weight
    elif out.weight.is_meta and not inp.weight.is_meta:
        out.weight = inp.weight


def report_dtype(report: dict) -> torch.dtype:
    """The dtype the folder was saved at (reports before the deploy dtype were fp32)."""
    return torch_dtype(report.get("dtype", "float32"))


def _skeleton(config: Any, kind: str, dtype: torch.dtype) -> nn.Module:
    """Architecture with parameters on the meta device (no memory) and real buffers (rotary tables).

    Why meta: a materialised skeleton is a whole dense model in memory next to the compressed one, which is
    what a deployment measurement would then see.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config, dtype=dtype)


def _load_weights(model: nn.Module, layouts: dict, path: Path) -> None:
    """Swap in SatenLinear skeletons, then assign the stored tensors (strict: nothing missing or left over)."""
    from safetensors.torch import load_file

    from saten_core.layer import SatenLinear
    from saten_core.quant.layer import QuantLinear

    for name, layout in layouts.items():
        kind = QuantLinear if layout.get("kind") == "quant" else SatenLinear
        _set_submodule(model, name, kind.from_layout(layout, device="meta"))
    state = load_file(str(path))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    _tie_embeddings(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise ValueError(f"weights of {path} do not fit its layouts: unexpected {sorted(unexpected)[:5]}, "
                         f"missing {left[:5]}")


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    from saten_core.compress import set_submodule

    set_submodule(model, name, module)


def load_any(ref: str, device: str = "cpu", *, dtype: str | None = None, materialize: bool = False) -> Any:
    """A compressed DIR loads via load_compressed (at its saved dtype; `materialize` opts in to the dense-cache
    inference path); anything else (registry name, folder, hub id) via models at `dtype` (default float32)."""
    from saten_core.models import load_model

    if is_compressed_dir(ref):
        loaded = load_compressed(ref, device)
        set_materialized(loaded.model, materialize)
        return loaded
    return load_model(ref, device=device, dtype=torch_dtype(dtype or "float32"))


def set_materialized(model: nn.Module, on: bool) -> int:
    """Switch every SatenLinear to the dense-cache path (on) or the compact one (off); returns how many."""
    from saten_core.layer import SatenLinear

    layers = [m for m in model.modules() if isinstance(m, SatenLinear)]
    for m in layers:
        m.materialize(on)
    return len(layers)


def merge_dense(model: nn.Module) -> nn.Module:
    """Replace every compressed layer by a plain nn.Linear holding to_dense() (and the same bias)."""
    from saten_core.models import linear_layers

    for name, m in [(n, m) for n, m in linear_layers(model) if not isinstance(m, nn.Linear)]:
        dense = to_linear(m)
        _set_submodule(model, name, dense)
    return model


def to_linear(m: nn.Module) -> nn.Linear:
    weight = m.to_dense().detach()
    bias = getattr(m, "bias", None)
    lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def export_dense(folder: str | Path, out_dir: str | Path) -> Path:
    """Merge a compressed DIR into an ordinary HF folder that from_pretrained loads (no saten code needed)."""
    loaded = load_compressed(folder)
    model = merge_dense(loaded.model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    return Path(out_dir)
