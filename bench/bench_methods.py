"""Bench: every method at equal bytes on smollm2-135m, without and with the same healing budget (issue 5's table).

Run: PYTHONPATH=. .venv/bin/python bench/bench_methods.py --ratios 0.8 0.5 --heal-steps 40 --out bench_methods.jsonl
Each finished row is appended to --out at once (JSON lines), and a rerun with the same --out skips rows already
there, so a long CPU run can be resumed. At the end the Markdown table is printed.
Input statistics for the activation-aware methods are collected once on the original model and shared by all rows;
the teacher for healing is the original model. Perplexity / KL / top-1 are on the held-out half of the bundled
text (never the calibration half), `--tokens` tokens in windows of 512.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from saten_core.build import calibration_text, collect_stats, compress_loaded, heal_loaded
from saten_core.evaluate import agreement, perplexity
from saten_core.models import load_model
from saten_core.pipeline import held_out_text
from saten_core.plan import MASK_GROUPS, Plan
from saten_core.spec import storage_method

ROWS = [("svd", "unstructured"), ("tt", "unstructured"), ("prune", "unstructured"), ("prune", "2:4"),
        ("wanda", "unstructured"), ("wanda", "2:4"), ("svd-w", "unstructured"), ("saten", "unstructured"),
        ("saten", "2:4"), ("saten-aw", "unstructured"), ("saten-aw", "2:4")]


def measure(base, model, tok, text: str, tokens: int) -> dict:
    ppl = perplexity(model, tok, text, tokens=tokens)
    agree = agreement(base, model, tok, text, tokens=tokens)
    return {"ppl": ppl, "kl": agree["kl"], "top1": agree["top1_agreement"]}


def run_row(base, stats, method: str, structure: str, ratio: float, args) -> dict:
    """Compress a copy of the base model at `ratio` bytes, measure, heal it, measure again."""
    plan = Plan(method=method, structure=structure, target_ratio=ratio, mask_group=args.mask_group,
                **heal_fields(args))
    if args.lowrank_share is not None:
        plan = replace(plan, lowrank_share=args.lowrank_share)
    if args.fit_rounds is not None and storage_method(method) == "saten":
        plan = replace(plan, fit_rounds=args.fit_rounds)
    loaded = copy.copy(base)
    if args.allocate:  # per-layer budgets from allocate_plan (weights' spectra, size-weighted objective)
        from saten_core.allocate import allocate_plan

        plan = allocate_plan(base, plan)
    row = {"method": method, "structure": structure, "ratio": ratio, "allocated": args.allocate,
           "plan": json.loads(plan.to_json())}
    loaded.model = copy.deepcopy(base.model)
    start = time.perf_counter()
    try:
        info = compress_loaded(loaded, replace(plan, heal_steps=0), stats=stats)
    except ValueError as err:  # e.g. 2:4 alone keeps more than the budget
        return {**row, "infeasible": str(err)}
    layers = info["layers"]
    row["bytes_kept"] = sum(r["bytes_after"] for r in layers) / sum(r["bytes_before"] for r in layers)
    row["compress_s"] = time.perf_counter() - start
    row["before_heal"] = measure(base.model, loaded.model, base.tokenizer, args.text, args.tokens)
    if args.heal_steps:
        start = time.perf_counter()
        healed = heal_loaded(loaded, base.model, plan, calibration_text(plan))
        row["heal_s"] = time.perf_counter() - start
        row["heal_best_step"] = healed.get("best_step")
        row["heal_eval_curve"] = healed.get("eval_curve")  # (step, held-out KL): why a best step is 0
        row["after_heal"] = measure(base.model, loaded.model, base.tokenizer, args.text, args.tokens)
    return row


def fmt(m: dict | None) -> str:
    return "—" if not m else f"{m['ppl']:.2f} / {m['kl']:.3f} / {m['top1']:.3f}"


def table(rows: list[dict], base_ppl: float) -> str:
    lines = ["| bytes kept | method | structure | actual bytes | no healing: ppl / KL / top-1 | healed: ppl / KL / "
             "top-1 | healed ppl ÷ base |", "|---|---|---|---:|---|---|---:|"]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['ratio']} | {r['method']} | {r['structure']} | infeasible: {r['infeasible'][:80]} "
                         "| — | — | — |")
            continue
        healed = r.get("after_heal")
        rel = f"{healed['ppl'] / base_ppl:.2f}x" if healed else "—"
        group = r.get("plan", {}).get("mask_group", "auto")
        method = r["method"] + (" (allocated)" if r.get("allocated") else "")
        method += f" [{group}]" if group != "auto" else ""
        lines.append(f"| {r['ratio']} | {method} | {r['structure']} | {r['bytes_kept']:.3f} | "
                     f"{fmt(r['before_heal'])} | {fmt(healed)} | {rel} |")
    return "\n".join(lines)


def add_heal_args(ap: argparse.ArgumentParser, **defaults: float) -> None:
    """--heal-steps, --heal-lr, ... for the plan's heal_* fields of the same names, with this bench's defaults."""
    for name, default in defaults.items():
        ap.add_argument(f"--heal-{name.replace('_', '-')}", type=type(default), default=default)


def heal_fields(args: argparse.Namespace) -> dict:
    """The plan's heal_* fields given by add_heal_args' flags."""
    return {k: v for k, v in vars(args).items() if k.startswith("heal_")}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--methods", nargs="*", default=None, help="subset, e.g. saten-aw:2:4 wanda:unstructured")
    ap.add_argument("--tokens", type=int, default=2048)
    add_heal_args(ap, steps=40, lr=5e-4, seq_len=256, tokens=16384, eval_tokens=1024, eval_every=10)
    ap.add_argument("--lowrank-share", type=float, default=None, help="default: the plan's default")
    ap.add_argument("--fit-rounds", type=int, default=None,
                    help="saten(-aw) joint TT + sparse rounds (default: the plan's, plan.fit_rounds())")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--allocate", action="store_true", help="allocated per-layer plans instead of uniform ones")
    ap.add_argument("--mask-group", default="auto", choices=MASK_GROUPS,
                    help="unstructured top-k per layer or per output row (auto: row for wanda / saten-aw)")
    ap.add_argument("--out", default="bench_methods.jsonl")
    return ap.parse_args()


def main() -> None:
    args = parse()
    args.text = held_out_text(None)
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows = [(m, s) for m, s in ROWS if not args.methods or f"{m}:{s}" in args.methods]
    base = load_model(args.model, device="cuda" if args.device == "auto" and torch.cuda.is_available()
                      else ("cpu" if args.device == "auto" else args.device))
    base_ppl = perplexity(base.model, base.tokenizer, args.text, tokens=args.tokens)
    print(f"base ppl {base_ppl:.3f}", file=sys.stderr, flush=True)
    stats = collect_stats(base, Plan(method="saten-aw", target_ratio=0.8), None)
    for ratio in args.ratios:
        for method, structure in rows:
            if any(d["method"] == method and d["structure"] == structure and d["ratio"] == ratio
                   and d.get("allocated", False) == args.allocate
                   and d.get("plan", {}).get("mask_group", "auto") == args.mask_group
                   and d.get("plan", {}).get("fit_rounds") == args.fit_rounds for d in done):
                continue
            row = run_row(base, stats, method, structure, ratio, args)
            done.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row.get(k) for k in ("ratio", "method", "structure", "before_heal", "after_heal",
                                                       "infeasible")}), file=sys.stderr, flush=True)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, torch {torch.__version__}, "
          f"device {next(base.model.parameters()).device}, base held-out ppl {base_ppl:.2f} ({args.tokens} tokens), "
          f"heal {args.heal_steps} steps lr {args.heal_lr} seq {args.heal_seq_len}, lowrank_share "
          f"{args.lowrank_share or 'plan default'}")
    print(table(sorted(done, key=lambda r: (-r["ratio"], ROWS.index((r["method"], r["structure"])))), base_ppl))


if __name__ == "__main__":
    main()
