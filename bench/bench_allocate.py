"""Allocated vs uniform Saten plans on smollm2-135m at the same bytes: held-out perplexity and preview accuracy.

Run: .venv/bin/python bench/bench_allocate.py [--ratios 0.8 0.6] [--method saten|saten-aw|...] [--tokens 2048]
         [--out FILE]
Activation-aware methods calibrate once (the plan's default text and tokens) for compressing; they allocate on the
weights' spectra like allocate_plan's default, or on the whitened ones with --spectra whitened.
Prints one markdown table (and writes the raw rows as JSON) for docs/benchmarks/spectrum.md. Same code path
as `python -m saten_core plan --target-ratio R [--allocate]`, `compress`, `eval`, run in one process so the
model is loaded once.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np


def compare(preview_rows: list[dict], reports: list[dict]) -> dict:
    """Bytes equality and relative gap of predicted vs measured per-layer error."""
    rows = {r["name"]: r for r in preview_rows}
    gaps = [abs(rows[r["name"]]["predicted_rel_error"] - r["rel_error"]) / max(r["rel_error"], 1e-12)
            for r in reports]
    bytes_equal = all(rows[r["name"]]["predicted_bytes"] == r["bytes_after"] for r in reports)
    return {"bytes_exact": bytes_equal, "err_gap_median": float(np.median(gaps)), "err_gap_p90": float(
        np.quantile(gaps, 0.9)), "err_gap_max": float(max(gaps)), "within_10pct": float(np.mean(np.array(gaps) <= 0.1))}


def run_one(loaded, plan, spectra, text: str, tokens: int, stats: dict | None = None) -> dict:
    from saten_core.compress import compress_, totals
    from saten_core.evaluate import perplexity
    from saten_core.preview import preview

    pv = preview(plan, spectra)
    model = copy.deepcopy(loaded.model)
    t0 = time.perf_counter()
    reports = compress_(model, plan, stats=stats)
    seconds = time.perf_counter() - t0
    tot = totals(reports)
    ppl = perplexity(model, loaded.tokenizer, text, tokens=tokens)
    rms = math.sqrt(np.mean([r["rel_error"] ** 2 for r in reports]))
    # activation-aware on whitened spectra: the preview predicts *output* error, the reports hold weight error,
    # so the per-layer gap compares different things; bytes still compare exactly
    return {"bytes_after": tot["bytes_after"], "bytes_before": tot["bytes_before"], "ratio": tot["ratio"],
            "ppl": ppl, "rel_error_rms": rms, "predicted_rel_error_rms": pv["totals"]["rel_error_rms"],
            "compress_s": seconds, **compare(pv["layers"], reports)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="saten")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="bench_allocate.json")
    ap.add_argument("--spectra", choices=["whitened", "weights"], default="weights",
                    help="activation-aware methods: allocate on the whitened spectra or on the weights' own")
    ap.add_argument("--skip-uniform", action="store_true", help="only the allocated plans (uniform rows known)")
    args = ap.parse_args()
    from saten_core.allocate import activation_spectra, allocate_plan
    from saten_core.build import collect_stats
    from saten_core.corpus import default_text, split_text
    from saten_core.evaluate import perplexity
    from saten_core.models import load_model
    from saten_core.plan import Plan
    from saten_core.spec import needs_stats
    from saten_core.spectrum import model_spectra

    loaded = load_model(args.model)
    stats = None
    if needs_stats(args.method):  # one calibration shared by every plan, like a real run of each would make
        stats = collect_stats(loaded, Plan(method=args.method, target_ratio=0.5))
        spectra = (activation_spectra(loaded, Plan(method=args.method, target_ratio=0.5), stats=stats)
                   if args.spectra == "whitened" else model_spectra(loaded.model))
    else:
        spectra = model_spectra(loaded.model)
    held_out = split_text(default_text())[1]
    rows = [{"plan": "dense", "ratio": 1.0, "ppl": perplexity(loaded.model, loaded.tokenizer, held_out,
                                                                tokens=args.tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    for ratio in args.ratios:
        uniform = Plan(method=args.method, target_ratio=ratio)
        t0 = time.perf_counter()
        allocated = allocate_plan(loaded, uniform, spectra=spectra)
        alloc_s = time.perf_counter() - t0
        for label, plan in (("uniform", uniform), ("allocated", allocated))[1 if args.skip_uniform else 0:]:
            row = {"plan": label, "target": ratio, "method": args.method,
                   **run_one(loaded, plan, spectra, held_out, args.tokens, stats)}
            if label == "allocated":
                row["allocate_s"] = alloc_s
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print("| plan | target | bytes kept | held-out ppl | layer rel. error RMS (measured / predicted) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["plan"] == "dense":
            print(f"| dense | 1.0 | 100% | {r['ppl']:.2f} | 0 |")
            continue
        print(f"| {r['plan']} | {r['target']} | {r['ratio']:.2%} | {r['ppl']:.2f} | "
              f"{r['rel_error_rms']:.3f} / {r['predicted_rel_error_rms']:.3f} |")


if __name__ == "__main__":
    main()
