"""Side-by-side answers: the original model and a compressed run continuing the same prompt, greedily.

Perplexity and KL are what an engineer reads; a manager wants to *see* whether the compressed model still talks
sense. Greedy decoding makes the comparison deterministic (same prompt, same tokens -> same text every time), so
any difference between the two columns comes from the compression, not from sampling.

Example:
    out = compare_answers("~/.cache/saten-studio/jobs/7/model", "The capital of France is", max_new_tokens=20)
    out["original"]["text"], out["compressed"]["text"]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_PROMPT = "The Python programming language is"
MAX_NEW_TOKENS = 24


def greedy_answer(loaded: Any, prompt: str, *, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """The continuation of `prompt` by a decoder (argmax at every step), with how long it took.

    Returns {"text": continuation only, "tokens": new tokens, "seconds": wall time}. Raises ValueError for an
    empty prompt, a non-positive token count or an encoder (it has no next-token head to answer with).
    """
    if not prompt.strip():
        raise ValueError("prompt is empty: type a few words for both models to continue")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if loaded.kind != "decoder":
        raise ValueError(f"{loaded.name} is an {loaded.kind}: it embeds text, it does not write answers")
    tok = loaded.tokenizer
    device = next(loaded.model.parameters()).device
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    return {"text": tok.decode(new, skip_special_tokens=True), "tokens": int(new.numel()),
            "seconds": time.perf_counter() - start}


def compare_answers(run_dir: str | Path, prompt: str, *, max_new_tokens: int = MAX_NEW_TOKENS,
                    device: str = "cpu") -> dict:
    """Greedy answers of the original model (named in the run's report) and of the compressed run to `prompt`.

    Loads both models fresh (a few seconds for a 135 M model on a CPU) so the caller holds no extra state.
    Returns {"prompt", "original": greedy_answer(...), "compressed": greedy_answer(...), "same": bool}.
    """
    from saten_core.checkpoint import load_compressed
    from saten_core.pipeline import load_original

    compressed = load_compressed(run_dir, device)
    original = load_original(run_dir, device)
    left = greedy_answer(original, prompt, max_new_tokens=max_new_tokens)
    right = greedy_answer(compressed, prompt, max_new_tokens=max_new_tokens)
    return {"prompt": prompt, "original": left, "compressed": right, "same": left["text"] == right["text"]}
