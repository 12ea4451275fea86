"""Benchmark model loading (cold GGUF dequantisation vs cached safetensors) and base quality and speed.

Run: .venv/bin/python bench/bench_load.py [--cold] [--device auto] [--repeats 3]
Prints a markdown table; copy it into docs/benchmarks/models.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def cold_cache_seconds() -> float:
    """Dequantise the GGUF into a throw-away cache: what the very first start costs."""
    from saten_core import models

    old = os.environ.get("SATEN_MODEL_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SATEN_MODEL_CACHE"] = tmp
        try:
            seconds, _ = timed(models.warm_cache)
        finally:
            if old is None:
                os.environ.pop("SATEN_MODEL_CACHE")
            else:
                os.environ["SATEN_MODEL_CACHE"] = old
    return seconds


def load_rows(device: str, repeats: int) -> list[tuple[str, str]]:
    """Median warm load time of each embedded model (the cache must already exist)."""
    from saten_core import models

    models.warm_cache()
    rows = []
    for name in ("smollm2-135m", "minilm-l6"):
        times = [timed(models.load_model, name, device=device)[0] for _ in range(repeats)]
        rows.append((f"load {name} (cached, median of {repeats})", f"{statistics.median(times):.2f} s"))
    return rows


def quality_rows(device: str) -> list[tuple[str, str]]:
    """Base perplexity (held-out and first-of-corpus, 2048 tokens, seq 512) and batch-1 latency of SmolLM2."""
    from saten_core import evaluate, models
    from saten_core.corpus import default_text, split_text

    lm = models.load_model("smollm2-135m", device=device)
    text = default_text()
    held = split_text(text)[1]
    sec, ppl_held = timed(evaluate.perplexity, lm.model, lm.tokenizer, held)
    ppl_head = evaluate.perplexity(lm.model, lm.tokenizer, text)
    lat = evaluate.latency(lm.model, lm.tokenizer)
    return [("smollm2-135m ppl, held-out half (2048 tok, seq 512)", f"{ppl_held:.2f} ({sec:.1f} s)"),
            ("smollm2-135m ppl, corpus start (2048 tok, seq 512)", f"{ppl_head:.2f}"),
            ("smollm2-135m prefill 128 tok (median of 5)", f"{lat['prefill_ms']:.1f} ms"),
            ("smollm2-135m decode (median of 5 x 16 tok)", f"{lat['decode_ms_per_token']:.1f} ms/token"),
            ("process RSS after the above", f"{lat['peak_memory_bytes'] / 2**20:.0f} MiB"),
            ("linear layers listed", str(len(models.linear_layers(lm.model))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="also time the first GGUF dequantisation (~1 min)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from saten_core.models import list_models, resolve_device

    device = resolve_device(args.device)
    rows = [("device", device)]
    if args.cold:
        rows.append(("first load: dequantise GGUF + write cache", f"{cold_cache_seconds():.1f} s"))
    rows += load_rows(device, args.repeats)
    sec, listed = timed(list_models)
    rows.append(("list_models (first call)", f"{sec:.2f} s: " + ", ".join(f"{r['name']} {r['params']:,}"
                                                                          for r in listed)))
    rows += quality_rows(device)
    print("| measurement | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
