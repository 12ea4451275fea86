"""End-to-end flows shared by the CLI and the job worker: compress a model into a DIR, evaluate a model or DIR."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saten_core.plan import Plan
from saten_core.spec import needs_stats

Progress = Callable[[str, float, str], None]
EVAL_TOKENS = 2048


def check_out_dir(out_dir: str | Path) -> None:
    """Fail before any heavy work when DIR exists and is not empty (atomic_dir would refuse it at the end)."""
    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output folder already exists and is not empty: {path}")


def compress_to_dir(model_ref: str, plan: Plan, out_dir: str | Path, *, device: str = "auto",
                    progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                    evaluate: bool = False, text: str | None = None, tokens: int = EVAL_TOKENS) -> dict:
    """Load, calibrate / compress / heal as the plan says, optionally evaluate, and save DIR; returns the report.

    The model is loaded at the plan's deploy dtype, compressed and healed in fp32 (models.to_working_precision)
    and saved at the deploy dtype; evaluation measures the saved form against the original at that dtype.
    Stages reported: load, calibrate (activation-aware methods), compress, heal (plan.heal_steps > 0; the
    teacher is the original model), evaluate, save, memory (with evaluate). The report records calibration and
    heal settings/curves.
    Example:
        report = compress_to_dir("smollm2-135m", Plan(target_ratio=0.8), "out/s80", evaluate=True)
        report["totals"]["bytes_after"], report["eval"]["ppl"], report["eval"]["resident_bytes"]
    """
    from saten_core.build import compress_loaded
    from saten_core.checkpoint import build_report, save_compressed
    from saten_core.models import load_model, parameter_bytes, resolve_device, to_working_precision

    plan.validate()
    check_out_dir(out_dir)
    dev, deploy = resolve_device(device), plan.torch_dtype()
    _report(progress, "load", 0.0, f"loading {model_ref} on {dev} at {plan.dtype}")
    start = time.perf_counter()
    blockwise = plan.sequential and needs_stats(plan.method)  # one block in fp32 at a time, replaced in place
    loaded = load_model(model_ref, device=dev, dtype=deploy)
    whole_before = parameter_bytes(loaded.model)
    if not blockwise:
        to_working_precision(loaded.model)
    reference = load_model(model_ref, device=dev, dtype=deploy) if evaluate else None
    teacher = None if reference is None or not plan.heal_steps else to_working_precision(reference.model)
    info = compress_loaded(loaded, plan, progress=progress, should_stop=should_stop, teacher=teacher)
    loaded.model.to(deploy)  # what is saved, evaluated and timed: the deploy dtype
    layers = info.pop("layers")
    extra: dict[str, Any] = {"device": dev, "plan": _plan_dict(plan), **info}
    if evaluate:
        reference.model.to(deploy)
        _report(progress, "evaluate", 0.0, "measuring the compressed model against the original")
        extra["eval"] = evaluate_deployed(reference, loaded, dtype=plan.dtype, materialize=plan.materialize,
                                          text=text, tokens=tokens, timing="side-by-side" if layers else "alone")
        del reference, teacher
    _report(progress, "save", 0.0, f"writing {out_dir}")
    report = build_report(loaded, layers, **extra)
    report["totals"]["wall_seconds"] = time.perf_counter() - start
    report["totals"]["dtype"] = plan.dtype
    add_model_bytes(report["totals"], whole_before)
    report = save_compressed(loaded, plan, report, out_dir)
    if evaluate:
        del loaded
        report = add_memory(report, out_dir, model_ref, dev, progress, changed=bool(layers))
    _report(progress, "save", 1.0, f"saved {out_dir}")
    return report


def evaluate_deployed(reference: Any, candidate: Any, *, dtype: str, materialize: bool, text: str | None,
                      tokens: int, timing: str | None = "side-by-side") -> dict:
    """Quality against the original (fp32 on a CPU without native 16-bit units) and, for decoders, speed.

    timing: "side-by-side" (the candidate against its original in this process), "alone" (a run that changed no
    layer, the reference job: it is the original itself, timed for the absolute figures, since a ratio against
    itself says nothing) or None (not timed).
    """
    from saten_core.checkpoint import set_materialized
    from saten_core.evaluate import latency, model_device
    from saten_core.kernels.dispatch import model_paths
    from saten_core.models import working_precision

    set_materialized(candidate.model, materialize)
    with working_precision(reference.model, candidate.model):
        out = evaluate_pair(reference, candidate, text=text, tokens=tokens)
    out.update(dtype=dtype, materialized=materialize)
    out["kernels"] = model_paths(candidate.model, model_device(candidate.model))
    if candidate.kind == "decoder" and timing == "side-by-side":
        out.update(speed_against(candidate, reference))
    elif candidate.kind == "decoder" and timing == "alone":
        out["latency"] = latency(candidate.model, candidate.tokenizer)
    return out


def speed_against(candidate: Any, reference: Any) -> dict:
    """Side-by-side latency fields: the compressed model's absolute times plus its ratios to the original.

    On CPU a 16-bit original is timed in fp32 too (faster here at prefill, slower at decode), and the headline
    ratio is against the faster of the two, named by `ratio_reference`.
    """
    import copy

    import torch

    from saten_core.deploy.dtype import dtype_name
    from saten_core.deploy.speed import side_by_side
    from saten_core.evaluate import model_device

    originals = {dtype_name(reference.dtype): reference.model}
    if model_device(reference.model).type == "cpu" and reference.dtype != torch.float32:
        originals["float32"] = copy.deepcopy(reference.model).float()
    sbs = side_by_side(candidate.model, originals, candidate.tokenizer)
    lat = {**sbs["compressed"], "tokens_per_s": _per_s(sbs["compressed"]["decode_ms_per_token"]),
           "device": str(model_device(candidate.model)), "side_by_side": sbs}
    keys = ("decode_ratio", "decode_ratio_min", "decode_ratio_max", "prefill_ratio", "prefill_ratio_min",
            "prefill_ratio_max", "ratio_reference")
    return {"latency": lat, **{k: sbs[k] for k in keys}}


def _per_s(ms: float | None) -> float | None:
    return 1000.0 / ms if ms else None


def add_memory(report: dict, out_dir: str | Path, model_ref: str, device: str,
               progress: Progress | None = None, changed: bool = True) -> dict:
    """Measure both models' memory in fresh processes and record it in the saved report (rewritten atomically).

    A run that changed no layer is the original: it is measured once (fields without the `_original` suffix).
    """
    import json

    from saten_core.checkpoint import REPORT
    from saten_core.files import atomic_write_text

    _report(progress, "memory", 0.0, "measuring process memory of both models in fresh processes")
    report["eval"].update(memory_fields(str(out_dir) if changed else None, model_ref, report["totals"]["dtype"],
                                        device, report["eval"].get("materialized", False)))
    atomic_write_text(Path(out_dir) / REPORT, json.dumps(report, indent=2))
    return report


def memory_fields(compressed_ref: str | None, original_ref: str, dtype: str, device: str,
                  materialize: bool = False) -> dict:
    """resident_bytes / peak_memory_bytes / memory_growth_bytes (+ `_original`), one fresh process per model.

    With compressed_ref None only the original is measured (its fields without the suffix).
    """
    from saten_core.deploy.memory import measure_process

    out: dict[str, Any] = {}
    pairs = ([(compressed_ref, "", materialize), (original_ref, "_original", False)] if compressed_ref
             else [(original_ref, "", False)])
    for ref, suffix, mat in pairs:
        got = measure_process(ref, dtype=dtype, device=device, materialize=mat)
        for key in ("resident_bytes", "peak_memory_bytes", "memory_growth_bytes"):
            if key in got:
                out[key + suffix] = got[key]
    out["memory_tokens"] = got["tokens"]
    return out


def _plan_dict(plan: Plan) -> dict:
    import json

    return json.loads(plan.to_json())


def _report(progress: Progress | None, stage: str, fraction: float, message: str) -> None:
    if progress is not None:
        progress(stage, fraction, message)


def held_out_text(text: str | None) -> str:
    """The user's text as given, else the bundled corpus' held-out part (never the calibration part)."""
    from saten_core.corpus import default_text, split_text

    return text if text is not None else split_text(default_text())[1]


def sentences(text: str, limit: int = 64) -> list[str]:
    """Sentence-like chunks for encoder similarity: non-trivial lines of the text, first `limit`."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip().split()) >= 4]
    if not lines:
        raise ValueError("text has no line with at least 4 words to embed")
    return lines[:limit]


def evaluate_model(loaded: Any, *, text: str | None = None, tokens: int = EVAL_TOKENS) -> dict:
    """Quality of one model on its own: perplexity for decoders (encoders have none: ppl is None)."""
    from saten_core.evaluate import perplexity

    body = held_out_text(text)
    out = {"kind": loaded.kind, "text_sha256": text_fingerprint(body)}
    if loaded.kind != "decoder":
        return {**out, "ppl": None, "tokens": None, "sentences": len(sentences(body))}
    return {**out, "ppl": perplexity(loaded.model, loaded.tokenizer, body, tokens=tokens), "tokens": tokens}


def text_fingerprint(text: str) -> str:
    """First 12 hex digits of the text's SHA-256: which text a number was measured on.

    Why: the bundled corpus (pydoc_data.topics) differs between Python versions, and users upload their own, so
    perplexities from runs on different texts must not be read as one comparison (the Results page warns).
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def add_model_bytes(totals: dict, whole_before: int) -> None:
    """Whole-model bytes before/after next to the changed layers' sums, so runs over different layer subsets
    compare on one axis (size charts, replica memory). Unchanged layers, embeddings and norms count on both sides."""
    from saten_core.models import whole_model_bytes

    totals["model_bytes_before"] = int(whole_before)
    totals["model_bytes_after"] = whole_model_bytes(whole_before, totals["bytes_before"], totals["bytes_after"])


def evaluate_pair(reference: Any, candidate: Any, *, text: str | None = None, tokens: int = EVAL_TOKENS) -> dict:
    """Candidate's quality plus its agreement with the reference (KL/top-1, or embedding cosine)."""
    from saten_core.evaluate import agreement, embedding_similarity

    body = held_out_text(text)
    out = evaluate_model(candidate, text=body, tokens=tokens)
    if candidate.kind == "decoder":
        out.update(agreement(reference.model, candidate.model, candidate.tokenizer, body, tokens=tokens))
        out["ppl_original"] = evaluate_model(reference, text=body, tokens=tokens)["ppl"]
    else:
        out["embedding_similarity"] = embedding_similarity(reference.model, candidate.model, candidate.tokenizer,
                                                           sentences(body))
    return out


def load_original(folder: str | Path, device: str) -> Any:
    """The model a compressed DIR was made from (named in its report), at the DIR's dtype, for KL / speed."""
    from saten_core.checkpoint import read_report, report_dtype
    from saten_core.models import load_model

    report = read_report(folder)
    original = report.get("source_ref")
    try:
        return load_model(original, device=device, dtype=report_dtype(report))
    except (ValueError, OSError) as exc:
        raise ValueError(f"original model {original!r} of {folder} cannot be loaded for comparison: "
                         f"{' '.join(str(exc).split())}") from None


def evaluate_ref(ref: str, *, text: str | None = None, tokens: int = EVAL_TOKENS, device: str = "auto",
                 latency: bool = False, dtype: str | None = None, materialize: bool = False,
                 memory: bool = True) -> dict:
    """Evaluate a model ref (at `dtype`, default bfloat16) or a compressed DIR (at its saved dtype; then also
    against the original named in its report: quality, resident and peak memory, side-by-side speed)."""
    from saten_core import evaluate
    from saten_core.checkpoint import WEIGHTS, is_compressed_dir, load_compressed
    from saten_core.deploy.dtype import DEFAULT_DTYPE, check_dtype, dtype_name, torch_dtype
    from saten_core.models import load_model, resolve_device, working_precision

    dev = resolve_device(device)
    if not is_compressed_dir(ref):
        name = check_dtype(dtype or DEFAULT_DTYPE)
        loaded = load_model(ref, device=dev, dtype=torch_dtype(name))
        with working_precision(loaded.model):
            out = evaluate_model(loaded, text=text, tokens=tokens)
        if latency:
            out["latency"] = evaluate.latency(loaded.model, loaded.tokenizer)
        out.update(dtype=name, **(memory_fields(None, ref, name, dev) if memory else {}))
        return out | {"model": ref, "device": dev}
    loaded = load_compressed(ref, dev)
    name = dtype_name(loaded.dtype)
    if dtype is not None and check_dtype(dtype) != name:
        raise ValueError(f"--dtype {dtype} differs from the dtype {name} that {ref} was compressed and saved at")
    reference = load_original(ref, dev)
    out = evaluate_deployed(reference, loaded, dtype=name, materialize=materialize, text=text, tokens=tokens,
                            timing="side-by-side" if latency else None)
    out["file_bytes"] = evaluate.file_size(Path(ref) / WEIGHTS)
    original_ref = reference.ref
    del reference, loaded
    if memory:
        out.update(memory_fields(ref, original_ref, name, dev, materialize))
    return out | {"model": ref, "device": dev}
