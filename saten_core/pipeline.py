"""End-to-end flows shared by the CLI and the job worker: compress a model into a DIR, evaluate a model or DIR."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saten_core.plan import Plan

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

    Stages reported: load, calibrate (activation-aware methods), compress, heal (plan.heal_steps > 0; the
    teacher is the original model), evaluate, save. The report records calibration and heal settings/curves.
    Example:
        report = compress_to_dir("smollm2-135m", Plan(target_ratio=0.8), "out/s80", evaluate=True)
        report["totals"]["bytes_after"], report["eval"]["ppl"]
    """
    from saten_core.build import compress_loaded
    from saten_core.checkpoint import build_report, save_compressed
    from saten_core.models import load_model, parameter_bytes, resolve_device

    plan.validate()
    check_out_dir(out_dir)
    dev = resolve_device(device)
    _report(progress, "load", 0.0, f"loading {model_ref} on {dev}")
    start = time.perf_counter()
    loaded = load_model(model_ref, device=dev)
    whole_before = parameter_bytes(loaded.model)
    reference = load_model(model_ref, device=dev) if evaluate else None
    info = compress_loaded(loaded, plan, progress=progress, should_stop=should_stop,
                           teacher=None if reference is None else reference.model)
    layers = info.pop("layers")
    extra: dict[str, Any] = {"device": dev, "plan": _plan_dict(plan), **info}
    if evaluate:
        _report(progress, "evaluate", 0.0, "measuring the compressed model against the original")
        extra["eval"] = evaluate_pair(reference, loaded, text=text, tokens=tokens)
        del reference
        if loaded.kind == "decoder":
            from saten_core.evaluate import latency

            extra["eval"]["latency"] = latency(loaded.model, loaded.tokenizer)
    _report(progress, "save", 0.0, f"writing {out_dir}")
    report = build_report(loaded, layers, **extra)
    report["totals"]["wall_seconds"] = time.perf_counter() - start
    add_model_bytes(report["totals"], whole_before)
    report = save_compressed(loaded, plan, report, out_dir)
    _report(progress, "save", 1.0, f"saved {out_dir}")
    return report


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
    """The model a compressed DIR was made from (named in its report), for KL / top-1 / similarity."""
    from saten_core.checkpoint import read_report
    from saten_core.models import load_model

    original = read_report(folder).get("source_ref")
    try:
        return load_model(original, device=device)
    except (ValueError, OSError) as exc:
        raise ValueError(f"original model {original!r} of {folder} cannot be loaded for comparison: "
                         f"{' '.join(str(exc).split())}") from None


def evaluate_ref(ref: str, *, text: str | None = None, tokens: int = EVAL_TOKENS, device: str = "auto",
                 latency: bool = False) -> dict:
    """Evaluate a model ref or a compressed DIR (then also against the original named in its report)."""
    from saten_core import evaluate
    from saten_core.checkpoint import WEIGHTS, is_compressed_dir, load_compressed
    from saten_core.models import load_model, resolve_device

    dev = resolve_device(device)
    if not is_compressed_dir(ref):
        loaded = load_model(ref, device=dev)
        out = evaluate_model(loaded, text=text, tokens=tokens)
    else:
        loaded = load_compressed(ref, dev)
        reference = load_original(ref, dev)
        out = evaluate_pair(reference, loaded, text=text, tokens=tokens)
        out["file_bytes"] = evaluate.file_size(Path(ref) / WEIGHTS)
    out.update(model=ref, device=dev)
    if latency:
        out["latency"] = evaluate.latency(loaded.model, loaded.tokenizer)
    return out
