"""Measurements of a model: perplexity, KL / top-1 agreement, embedding similarity, latency, memory, file size."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device the model's weights sit on (inputs must follow them)."""
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels so wall-clock timings measure the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_ids(tokenizer: Any, text: str, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of text (no special tokens: windows cut a continuous stream).

    Tokenises a generous prefix first (tens of times faster on the whole corpus), the full text if that falls short.
    """
    if not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an integer >= 2, got {tokens!r}")
    prefix = text[: tokens * 16]
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if len(ids) <= tokens and len(prefix) < len(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"text has {len(ids)} tokens, fewer than the {tokens} tokens requested")
    return torch.tensor(ids[:tokens], dtype=torch.long)


def bos_prefix(tokenizer: Any) -> torch.Tensor:
    """The token every window starts with: [BOS] when the tokenizer puts one in front of any text by default,
    else nothing. # (P,) with P in {0, 1}

    Why: a model trained with a BOS token reads a window without it as out of distribution (Gemma 3 270M: held-out
    ppl 30 without, 10 with, on 512 tokens); SmolLM2's and BERT's tokenizers add none, so their windows are unchanged.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return torch.zeros(0, dtype=torch.long)
    ids = tokenizer("a")["input_ids"]
    return torch.tensor([bos] if ids and ids[0] == bos else [], dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, prefix: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Non-overlapping windows of seq_len (the last may be shorter, but keeps >= 2 tokens to predict from), each
    after `prefix` (bos_prefix: the prefix's last token then predicts the chunk's first)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    head = torch.zeros(0, dtype=ids.dtype) if prefix is None else prefix.to(ids.dtype)
    for start in range(0, len(ids), seq_len):
        chunk = ids[start:start + seq_len]
        if len(chunk) >= 2:
            yield torch.cat([head, chunk]).unsqueeze(0)  # (1, P + T)


def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits (T, V) of one window; an encoder without an LM head is a usage error."""
    out = model(input_ids=window.to(model_device(model)), use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"{type(model).__name__} has no language-model head (no logits): use a decoder")
    return logits[0].float()


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer: Any, text: str, *, tokens: int = 2048, seq_len: int = 512) -> float:
    """exp(mean next-token NLL) over non-overlapping seq_len windows of the first `tokens` tokens (each after
    bos_prefix: every token of the window is then predicted, the first one from the BOS).

    Example:
        lm = load_model("smollm2-135m")
        perplexity(lm.model, lm.tokenizer, split_text(default_text())[1])   # ~15 on CPU fp32
    """
    nll, count = 0.0, 0
    for window in windows(token_ids(tokenizer, text, tokens), seq_len, bos_prefix(tokenizer)):
        logits = _logits(model, window)  # (T, V)
        target = window[0, 1:].to(logits.device)
        nll += F.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += target.numel()
    return float(torch.exp(torch.tensor(nll / count)))


@torch.inference_mode()
def agreement(reference: nn.Module, candidate: nn.Module, tokenizer: Any, text: str, *, tokens: int = 2048,
              seq_len: int = 512) -> dict:
    """How closely a compressed model follows the original, token by token.

    Returns {"kl": mean KL(reference || candidate) per token position, "top1_agreement": fraction of positions
    whose most likely next token is the same, "tokens": positions compared}.
    """
    kl_sum, same, count = 0.0, 0, 0
    for window in windows(token_ids(tokenizer, text, tokens), seq_len, bos_prefix(tokenizer)):
        ref = F.log_softmax(_logits(reference, window), dim=-1)  # (T, V)
        cand = F.log_softmax(_logits(candidate, window).to(ref.device), dim=-1)
        kl_sum += F.kl_div(cand, ref, log_target=True, reduction="sum").item()
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += ref.shape[0]
    return {"kl": kl_sum / count, "top1_agreement": same / count, "tokens": count}


def _mean_pooled(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embeddings (B, H): mean of token states where attention_mask is 1 (sentence-transformers pooling)."""
    dev = model_device(model)
    batch = {k: v.to(dev) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.inference_mode()
def embedding_similarity(reference: nn.Module, candidate: nn.Module, tokenizer: Any, sentences: list[str],
                         *, batch_size: int = 32, max_length: int = 256) -> float:
    """Mean cosine similarity between the reference's and candidate's mean-pooled sentence embeddings."""
    if not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError(f"sentences must be a non-empty list of non-empty strings, got {sentences!r:.80}")
    total = 0.0
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start:start + batch_size]
        batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        ref, cand = _mean_pooled(reference, batch), _mean_pooled(candidate, batch)
        total += F.cosine_similarity(ref, cand.to(ref.device), dim=-1).sum().item()
    return total / len(sentences)


# ---------------------------------------------------------------- speed and size

def _prompt(tokenizer: Any, n: int) -> torch.Tensor:
    """n real tokens of the bundled corpus (1, n): realistic ids, identical on every run."""
    from saten_core.corpus import default_text

    return token_ids(tokenizer, default_text(), max(n, 2))[:n].unsqueeze(0)


def _check_latency_args(model: nn.Module, prefill_tokens: int, decode_tokens: int, repeats: int) -> None:
    """Reject counts that cannot be timed (or exceed the model's context) before any warm-up runs."""
    for name, value, low in (("prefill_tokens", prefill_tokens, 1), ("decode_tokens", decode_tokens, 0),
                             ("repeats", repeats, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and prefill_tokens + decode_tokens > limit:
        raise ValueError(f"prefill_tokens + decode_tokens = {prefill_tokens + decode_tokens} exceeds the "
                         f"model's context of {limit} tokens")


def _can_decode(model: nn.Module) -> bool:
    """Only generative models keep a KV cache; an encoder is timed on its forward pass alone."""
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def _kv_cache(out: Any) -> Any:
    """The KV cache of a forward output (transformers 5.24 names it `cache`, older versions past_key_values)."""
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None:
        raise ValueError("the model returned no KV cache although use_cache=True; cannot time decoding")
    return cache


def _time_once(model: nn.Module, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float | None]:
    """(prefill ms, decode ms per token) of one greedy run that reuses the KV cache for decoding."""
    dev = prompt.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=_can_decode(model))
    _sync(dev)
    prefill = (time.perf_counter() - t0) * 1000
    if not _can_decode(model) or decode_tokens == 0:
        return prefill, None
    past, token = _kv_cache(out), out.logits[:, -1:].argmax(-1)  # (1, 1)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, cache=past, use_cache=True)
        past, token = _kv_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(dev)
    return prefill, (time.perf_counter() - t1) * 1000 / decode_tokens


@torch.inference_mode()
def latency(model: nn.Module, tokenizer: Any, *, prefill_tokens: int = 128, decode_tokens: int = 16,
            repeats: int = 5) -> dict:
    """Median batch-1 prefill time and per-token decode time on the model's own device, after one warm-up run.

    Example:
        latency(lm.model, lm.tokenizer)   # {"prefill_ms": ..., "decode_ms_per_token": ..., "tokens_per_s": ...}
    """
    _check_latency_args(model, prefill_tokens, decode_tokens, repeats)
    dev = model_device(model)
    prompt = _prompt(tokenizer, prefill_tokens).to(dev)
    reset_peak_memory(dev)
    _time_once(model, prompt, decode_tokens)  # warm-up: allocator, kernels, lazy init
    runs = [_time_once(model, prompt, decode_tokens) for _ in range(repeats)]
    decode = [d for _, d in runs if d is not None]
    decode_ms = statistics.median(decode) if decode else None
    return {"prefill_ms": statistics.median(p for p, _ in runs), "decode_ms_per_token": decode_ms,
            "tokens_per_s": 1000.0 / decode_ms if decode_ms else None, "prefill_tokens": prefill_tokens,
            "decode_tokens": decode_tokens if decode else 0, "repeats": repeats, "device": str(dev),
            "peak_memory_bytes": peak_memory(dev)}


@torch.inference_mode()
def forward_once(loaded: Any, tokens: int) -> None:
    """One forward pass over `tokens` real tokens (capped at the model's context): what memory is read after."""
    model = loaded.model
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or tokens
    ids = _prompt(loaded.tokenizer, max(2, min(tokens, limit))).to(model_device(model))
    if loaded.kind == "decoder":
        model(input_ids=ids, use_cache=False)
    else:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a fresh CUDA peak so peak_memory reports this measurement, not an earlier one (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str = "cpu") -> int:
    """CUDA: max bytes allocated since the last reset. CPU: the process's resident set size (psutil)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of every file under a folder (what a user would download)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    raise FileNotFoundError(f"no such file or folder: {path}")
