"""Allocation variants at equal bytes on smollm2-135m: which spectra, which objective, how far from uniform.

Run: PYTHONPATH=. .venv/bin/python bench/bench_allocate_variants.py --method saten-aw --ratios 0.6 0.8 \
         --variants U Winf Wsinf Ainf Asinf As0.5 --out docs/benchmarks/allocate_variants_aw.jsonl
Variant names: U = the uniform plan; then W (the weights' spectra) or A (whitened spectra, activation_spectra),
or C (whitened spectra, each layer's predicted error scaled by (measured / predicted)^2 at the uniform plan),
an optional "s" (objective weighted by layer size, today's allocate_plan) and a trust window tau ("inf" = none;
0.5 = every layer's bytes within +-50% of its uniform bytes). Per variant: KL to the original on 1024 tokens of
the calibration text's held-out half, held-out perplexity on 1024 and 4096 tokens, and per layer the stored
bytes, measured relative *output* error on the calibration inputs, and the whitened preview's predicted one.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np

from saten_core.allocate import _override, activation_spectra, greedy, layer_candidates, layer_weight, weighted
from saten_core.build import calibration_text, collect_stats, heal_texts
from saten_core.compress import compress_
from saten_core.corpus import default_text, split_text
from saten_core.evaluate import agreement, perplexity
from saten_core.layer import predict_bytes
from saten_core.models import load_model
from saten_core.plan import Plan, layer_spec
from saten_core.preview import preview, torch_dtype
from saten_core.spectrum import model_spectra


def windowed_plan(plan: Plan, spectra: dict, tau: float | None, size_weight: bool = False,
                  scale: dict | None = None) -> Plan:
    """allocate_plan's greedy on these spectra, optionally size-weighted and kept within a window around uniform.

    scale: per-layer factor on the predicted e^2 (variant C: measured / predicted at the uniform plan, squared).
    """
    from dataclasses import replace
    free, cands = [], []
    total = 0.0
    for layer in spectra["layers"]:
        dt = torch_dtype(layer["dtype"])
        total += layer["in_features"] * layer["out_features"] * dt.itemsize
        c = layer_candidates(layer, plan)
        if tau is not None:
            spec = layer_spec(plan, layer["name"], layer["in_features"], layer["out_features"], dt)
            u = predict_bytes(layer["in_features"], layer["out_features"], spec, dt)
            ok = (c["bytes"] >= u * (1 - tau)) & (c["bytes"] <= u * (1 + tau))
            below = np.flatnonzero(c["bytes"] <= u)
            ok[below[np.argmax(c["bytes"][below])]] = True
            idx = np.flatnonzero(ok)
            c = {"bytes": c["bytes"][idx], "err": c["err"][idx], "settings": [c["settings"][i] for i in idx]}
        if size_weight:
            c = weighted(c, layer_weight(layer))
        if scale is not None:
            c = weighted(c, scale[layer["name"]])
        free.append(layer)
        cands.append(c)
    budget = int(plan.target_ratio * total)
    chosen = greedy(cands, budget)
    ovs = [_override(layer["name"], c["settings"][k], plan) for layer, c, k in zip(free, cands, chosen, strict=True)]
    return replace(plan, target_ratio=None, rank=None, eps=None, overrides=ovs)


def measured_scale(loaded, uniform: Plan, spectra: dict, stats: dict) -> dict:
    """(measured / predicted)^2 relative output error per layer, from one real compression of the uniform plan."""
    model = copy.deepcopy(loaded.model)
    reports = compress_(model, uniform, stats=stats)
    pred = {r["name"]: r["predicted_rel_error"] for r in preview(uniform, spectra)["layers"]}
    return {r["name"]: (r["rel_output_error"] / max(pred[r["name"]], 1e-12)) ** 2 for r in reports}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="saten-aw")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.6, 0.8])
    ap.add_argument("--variants", nargs="+", default=["U", "Winf", "Wsinf", "Ainf", "Asinf"])
    ap.add_argument("--out", default="allocate_variants.jsonl")
    args = ap.parse_args()
    method, names = args.method, args.variants
    loaded = load_model("smollm2-135m")
    base = Plan(method="saten-aw", target_ratio=0.5)  # statistics for saten-aw and for measuring output error
    stats = collect_stats(loaded, base)
    spectra = {"W": model_spectra(loaded.model), "A": activation_spectra(loaded, base, stats=stats)}
    check = heal_texts(calibration_text(base))[1]
    held = split_text(default_text())[1]
    for ratio in args.ratios:
        uniform = Plan(method=method, target_ratio=ratio)
        scale = measured_scale(loaded, uniform, spectra["A"], stats) if any(n[0] == "C" for n in names) else None
        spectra["C"] = spectra["A"]
        for name in names:
            t0 = time.perf_counter()
            if name == "U":
                plan = uniform
            else:
                kind, tau = name[0], name[1:]
                sized = tau.startswith("s")
                tau = tau.lstrip("s")
                plan = windowed_plan(uniform, spectra[kind], None if tau == "inf" else float(tau), sized,
                                     scale if kind == "C" else None)
            model = copy.deepcopy(loaded.model)
            reports = compress_(model, plan, stats=stats)
            pv = preview(plan, spectra["A"])["layers"]
            pred = {r["name"]: r["predicted_rel_error"] for r in pv}
            kl = agreement(loaded.model, model, loaded.tokenizer, check, tokens=1024)["kl"]
            ppl = perplexity(model, loaded.tokenizer, held, tokens=1024)
            ppl4 = perplexity(model, loaded.tokenizer, held, tokens=4096)
            row = {"ratio": ratio, "cand": name, "kl_calib": kl, "ppl": ppl, "ppl4096": ppl4,
                   "bytes": sum(r["bytes_after"] for r in reports) / sum(r["bytes_before"] for r in reports),
                   "seconds": time.perf_counter() - t0,
                   "layers": [[r["name"], r["bytes_after"], r["rel_output_error"], pred[r["name"]]]
                              for r in reports]}
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
