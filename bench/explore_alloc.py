"""Exploration: saten-aw allocation candidates (spectra x trust window) vs uniform, calib KL and held-out ppl."""

from __future__ import annotations

import copy
import json
import sys
import time

import numpy as np

from saten_core.allocate import _override, activation_spectra, greedy, layer_candidates
from saten_core.build import calibration_text, collect_stats, heal_texts
from saten_core.compress import compress_
from saten_core.corpus import default_text, split_text
from saten_core.evaluate import agreement, perplexity
from saten_core.layer import predict_bytes
from saten_core.models import load_model
from saten_core.plan import Plan, layer_spec
from saten_core.preview import preview, torch_dtype
from saten_core.spectrum import model_spectra

METHOD = __import__("os").environ.get("METHOD", "saten-aw")


def windowed_plan(plan: Plan, spectra: dict, tau: float | None, size_weight: bool = False) -> Plan:
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
            c = dict(c, err=c["err"] * layer["in_features"] * layer["out_features"])
        free.append(layer)
        cands.append(c)
    budget = int(plan.target_ratio * total)
    chosen = greedy(cands, budget)
    ovs = [_override(layer["name"], c["settings"][k], plan) for layer, c, k in zip(free, cands, chosen, strict=True)]
    return replace(plan, target_ratio=None, rank=None, eps=None, overrides=ovs)


def main() -> None:
    ratios = [float(r) for r in sys.argv[1].split(",")]
    names = sys.argv[2].split(",")
    out = sys.argv[3]
    loaded = load_model("smollm2-135m")
    base = Plan(method="saten-aw", target_ratio=0.5)
    stats = collect_stats(loaded, base)
    spectra = {"W": model_spectra(loaded.model), "A": activation_spectra(loaded, base, stats=stats)}
    check = heal_texts(calibration_text(base))[1]
    held = split_text(default_text())[1]
    rows = []
    for ratio in ratios:
        uniform = Plan(method=METHOD, target_ratio=ratio)
        for name in names:
            t0 = time.perf_counter()
            if name == "U":
                plan = uniform
            else:
                kind, tau = name[0], name[1:]
                sized = tau.startswith("s")
                tau = tau.lstrip("s")
                plan = windowed_plan(uniform, spectra[kind], None if tau == "inf" else float(tau), sized)
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
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
            with open(out, "w") as f:
                json.dump(rows, f)


if __name__ == "__main__":
    main()
