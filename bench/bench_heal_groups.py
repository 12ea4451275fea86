"""Bench: healing one compressed model with the TT cores at different learning-rate scales (heal_core_lr_scale).

Why: jointly fitted saten-aw beat Wanda at 50% of the bytes before healing (17.19 vs 21.27) but healed far less
(14.18 vs 11.45) with one learning rate for TT cores and kept values. A core's update moves every entry of the
layer at once, a kept value moves one, so this measures the same healing budget with the cores frozen (0),
slower, equal (1) and faster. The compressed model is built once (`python -m saten_core compress ... --out DIR`)
and reloaded for each scale, so every row starts from the same weights.
Run: PYTHONPATH=. .venv/bin/python bench/bench_heal_groups.py --compressed DIR --scales 0 0.1 1 --out rows.jsonl
Rows (JSON lines, appended as each finishes; a rerun skips scales already in --out): ppl / KL / top-1 on
--tokens held-out tokens (and the original's ppl) before and after healing, the held-out-KL curve during
healing and the best step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench_methods import add_heal_args, heal_fields, measure

from saten_core.build import calibration_text, heal_loaded
from saten_core.checkpoint import PLAN, load_compressed, read_report
from saten_core.evaluate import perplexity
from saten_core.models import load_model
from saten_core.pipeline import held_out_text
from saten_core.plan import Plan


def heal_row(args, base, plan: Plan, scale: float) -> dict:
    """Reload the compressed folder, heal it at this core scale, measure before and after."""
    loaded = load_compressed(args.compressed)
    row = {"compressed": args.compressed, "core_lr_scale": scale, "plan": json.loads(plan.to_json()),
           "tokens": args.tokens, "base_ppl": args.base_ppl}
    row["before_heal"] = measure(base.model, loaded.model, base.tokenizer, args.text, args.tokens)
    start = time.perf_counter()
    healed = heal_loaded(loaded, base.model, replace(plan, heal_core_lr_scale=scale), calibration_text(plan))
    row.update(heal_s=time.perf_counter() - start, heal_best_step=healed["best_step"],
               heal_eval_curve=healed["eval_curve"])
    row["after_heal"] = measure(base.model, loaded.model, base.tokenizer, args.text, args.tokens)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressed", required=True, help="folder written by `python -m saten_core compress`")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    ap.add_argument("--tokens", type=int, default=1024)
    add_heal_args(ap, steps=128, lr=3e-4, seq_len=128, tokens=16384, eval_tokens=512, eval_every=32)
    ap.add_argument("--out", default="heal_groups.jsonl")
    args = ap.parse_args()
    args.text = held_out_text(None)
    folder = Path(args.compressed)
    plan = replace(Plan.from_json((folder / PLAN).read_text()), **heal_fields(args))
    base = load_model(read_report(folder)["source_ref"], device="cpu")
    args.base_ppl = perplexity(base.model, base.tokenizer, args.text, tokens=args.tokens)
    out = Path(args.out)
    done = {json.loads(line)["core_lr_scale"] for line in out.read_text().splitlines()} if out.exists() else set()
    for scale in args.scales:
        if scale in done:
            continue
        row = heal_row(args, base, plan, scale)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row[k] for k in ("core_lr_scale", "before_heal", "after_heal", "heal_best_step")}),
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
