"""Bench: quantization baselines (rtn, gptq), SparseGPT, Wanda, saten-aw and saten-q at equal bf16 bytes.

Run: PYTHONPATH=. .venv/bin/python bench/bench_quant.py --model smollm2-135m --tokens 4096 \
         --out docs/benchmarks/quant_smollm2.jsonl
     PYTHONPATH=. .venv/bin/python bench/bench_quant.py --model minilm-l6 --out docs/benchmarks/quant_minilm.jsonl
Budgets are fractions of the 16-bit block-linear bytes. Each row is appended to --out when done and skipped on a
rerun with the same --out. The model is loaded at bf16 (the deploy dtype), compressed in fp32 with statistics
collected once on the original (plan.calib_tokens of the calibration half), cast back to bf16 and measured against
the bf16 original on the held-out half: perplexity / KL / top-1 (decoders) or embedding cosine (encoders), the
stored bytes (codes, scales, minimums, masks, cores, values, all counted) and the resident bytes of the block
linears (every tensor the layers hold between calls).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn import functional as F

from saten_core.build import collect_stats, compress_loaded
from saten_core.deploy.memory import resident_bytes
from saten_core.models import linear_layers, load_model, to_working_precision, working_precision
from saten_core.pipeline import evaluate_pair, held_out_text
from saten_core.plan import Plan

RATIOS = (0.5, 0.31, 0.25, 0.19)
FIXED = [  # (label, plan fields): the grids a user would try first
    ("rtn int8", {"method": "rtn", "bits": 8, "quant_group": 0, "symmetric": True}),
    ("rtn int4 g64 sym", {"method": "rtn", "bits": 4, "quant_group": 64, "symmetric": True}),
    ("rtn int3 g64 sym", {"method": "rtn", "bits": 3, "quant_group": 64, "symmetric": True}),
    ("gptq int8", {"method": "gptq", "bits": 8, "quant_group": 0, "symmetric": True}),
    ("gptq int4 g64 sym", {"method": "gptq", "bits": 4, "quant_group": 64, "symmetric": True}),
    ("gptq int3 g64 sym", {"method": "gptq", "bits": 3, "quant_group": 64, "symmetric": True}),
    ("sparsegpt 50%", {"method": "sparsegpt", "target_ratio": 0.5}),
    ("wanda 50%", {"method": "wanda", "target_ratio": 0.5}),
]


INT4_G64, INT3_G64 = (4 / 8 + 2 / 64) / 2, (3 / 8 + 2 / 64) / 2  # rtn int4 / int3 g64 sym: kept share of bf16


def configs(ratios: list[float]) -> list[tuple[str, dict]]:
    """Fixed baselines, saten-aw and saten-q (bits picked, gptq base) per budget, the rtn base once, and saten-q
    variants at exactly the bytes of rtn int4 / int3 g64 that trade the 64-input groups for a repair."""
    rows = list(FIXED)
    for r in ratios:
        rows.append((f"saten-aw {r:.0%}", {"method": "saten-aw", "target_ratio": r}))
        rows.append((f"saten-q {r:.0%}", {"method": "saten-q", "target_ratio": r, "symmetric": True,
                                          "quant_base": "gptq"}))
    rows.append(("saten-q 25% (rtn base)", {"method": "saten-q", "target_ratio": 0.25, "symmetric": True}))
    variants4 = [(4, 0), (4, 128), (4, 192)]  # 192 divides every SmolLM2 and MiniLM width, 128 not 576
    variants3 = [(3, 0), (3, 128), (3, 192), (2, 64)]
    for name, ratio, variants in (("int4", INT4_G64, variants4), ("int3", INT3_G64, variants3)):
        for bits, group in variants:
            rows.append((f"saten-q at {name} g64 bytes: int{bits} g{group} + repair",
                         {"method": "saten-q", "target_ratio": ratio, "bits": bits, "quant_group": group,
                          "symmetric": True, "quant_base": "gptq"}))
    return rows + part_rows() + sequential_rows()


def sequential_rows() -> list[tuple[str, dict]]:
    """Block-sequential calibration (issue 18): the activation-aware rows again with each block's statistics
    taken on the outputs of the already-compressed blocks (compared with the all-at-once rows above)."""
    rows = []
    for label, fields in FIXED:
        if label in ("wanda 50%", "gptq int4 g64 sym", "gptq int3 g64 sym"):
            rows.append((f"{label} (sequential)", {**fields, "sequential": True}))
    rows.append(("saten-aw 50% (sequential)", {"method": "saten-aw", "target_ratio": 0.5, "sequential": True}))
    return rows


def part_rows() -> list[tuple[str, dict]]:
    """--value-bits / --core-bits: saten-aw and saten-q at 31% and 25% with quantized kept values and TT cores,
    and saten-q at exactly int3 g64's bytes with 4-bit kept values (the saved bits buy more repair entries)."""
    rows = []
    for r in (0.31, 0.25):
        rows.append((f"saten-aw {r:.0%} (values 8-bit, cores 8-bit)",
                     {"method": "saten-aw", "target_ratio": r, "value_bits": 8, "core_bits": 8}))
        for vb in (8, 4):
            rows.append((f"saten-q {r:.0%} (values {vb}-bit)", {"method": "saten-q", "target_ratio": r,
                                                              "symmetric": True, "quant_base": "gptq",
                                                              "value_bits": vb}))
    rows.append(("saten-q at int3 g64 bytes: int3 g192 + repair (values 4-bit)",
                 {"method": "saten-q", "target_ratio": INT3_G64, "bits": 3, "quant_group": 192, "symmetric": True,
                  "quant_base": "gptq", "value_bits": 4}))
    return rows


class DecoderProbe:
    """The original's next-token log-probabilities, kept once, so each row costs one pass instead of four.

    Same definitions as evaluate.perplexity / evaluate.agreement (windows of 512, KL(original || candidate) per
    position, top-1 agreement), so the numbers equal pipeline.evaluate_pair's.
    """

    def __init__(self, base, text: str, tokens: int) -> None:
        from saten_core.evaluate import _logits, token_ids, windows

        self.tokenizer = base.tokenizer
        self.windows = list(windows(token_ids(base.tokenizer, text, tokens), 512))
        with torch.inference_mode(), working_precision(base.model):
            self.ref = [F.log_softmax(_logits(base.model, w), dim=-1) for w in self.windows]
        self.ppl_original = self.ppl_of(self.ref)

    def ppl_of(self, logprobs: list[torch.Tensor]) -> float:
        nll = sum(-lp[:-1].gather(1, w[0, 1:, None]).sum().item() for lp, w in zip(logprobs, self.windows, strict=True))
        return float(torch.exp(torch.tensor(nll / sum(w.shape[1] - 1 for w in self.windows))))

    @torch.inference_mode()
    def measure(self, model: torch.nn.Module) -> dict:
        from saten_core.evaluate import _logits

        kl, same, count, cand = 0.0, 0, 0, []
        for ref, window in zip(self.ref, self.windows, strict=True):
            lp = F.log_softmax(_logits(model, window), dim=-1)
            kl += F.kl_div(lp, ref, log_target=True, reduction="sum").item()
            same += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            count += ref.shape[0]
            cand.append(lp)
        return {"kind": "decoder", "ppl": self.ppl_of(cand), "ppl_original": self.ppl_original, "kl": kl / count,
                "top1_agreement": same / count, "tokens": count}


def block_resident(model: torch.nn.Module) -> int:
    return sum(resident_bytes(m) for _, m in linear_layers(model))


HEAL = {"heal_lr": 5e-4, "heal_seq_len": 256, "heal_tokens": 16384, "heal_eval_tokens": 1024,
        "heal_eval_every": 10}  # bench_methods.py's healing budget, so the tables compare


def run(base, stats, label: str, fields: dict, args) -> dict:
    heal = args.heal_steps if label.endswith(" + heal") else 0
    plan = Plan(**fields, **(dict(HEAL, heal_steps=heal) if heal else {}))
    loaded = copy.copy(base)
    loaded.model = copy.deepcopy(base.model)
    row = {"label": label, "plan": json.loads(plan.to_json())}
    start = time.perf_counter()
    try:
        info = compress_loaded(loaded, plan, stats=None if plan.sequential else stats,  # sequential: its own
                               teacher=base.model if heal else None)
    except ValueError as err:
        return {**row, "infeasible": str(err)}
    row["compress_s"] = time.perf_counter() - start
    layers = info["layers"]
    if info.get("heal"):
        row["heal"] = {k: info["heal"].get(k) for k in ("best_step", "best_eval", "seconds")}
    before = sum(r["bytes_before"] for r in layers)
    row.update(bytes_before=before, bytes_after=sum(r["bytes_after"] for r in layers))
    row["ratio"] = row["bytes_after"] / before
    row["bits_per_weight"] = 16 * row["ratio"]
    row["grids"] = sorted({(r["spec"].get("bits"), r["spec"].get("qgroup")) for r in layers if r["spec"].get("bits")})
    loaded.model.to(torch.bfloat16)
    base.model.to(torch.bfloat16)  # both as deployed: evaluate_deployed's working_precision decides the compute
    row["resident_bytes"] = block_resident(loaded.model)
    with working_precision(base.model, loaded.model):
        row["eval"] = (args.probe.measure(loaded.model) if args.probe is not None else
                       evaluate_pair(base, loaded, text=args.text, tokens=args.tokens))
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one line per row in file order; decoders show ppl / KL / top-1, encoders embedding cosine."""
    lines = ["| config | kept share of 16-bit bytes | bits/weight | quality | resident MiB | grids |",
             "|---|---:|---:|---|---:|---|"]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['label']} | — | — | infeasible: {r['infeasible'][:90]} | — | — |")
            continue
        ev = r["eval"]
        quality = (f"cosine {ev['embedding_similarity']:.4f}" if ev.get("embedding_similarity") is not None else
                   f"ppl {ev['ppl']:.2f} (orig {ev['ppl_original']:.2f}) / KL {ev['kl']:.3f} / "
                   f"top-1 {ev['top1_agreement']:.3f}")
        grids = ", ".join(f"int{b} g{g}" for b, g in r.get("grids", [])) or "—"
        lines.append(f"| {r['label']} | {r['ratio']:.3f} | {r['bits_per_weight']:.2f} | {quality} | "
                     f"{r['resident_bytes'] / 2**20:.1f} | {grids} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--heal", nargs="*", default=[], help="labels to run again with --heal-steps of healing")
    ap.add_argument("--heal-steps", type=int, default=40)
    ap.add_argument("--repair-share", type=float, default=None,
                    help="saten-q rows with this repair_share (labels gain '(share X)'); default: the plan's")
    ap.add_argument("--out", required=True)
    ap.add_argument("--table", action="store_true", help="print the Markdown table of --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        order = {label: i for i, (label, _) in enumerate(configs(args.ratios))}
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        print(table(sorted(rows, key=lambda r: (order.get(r["label"].removesuffix(" + heal"), len(order)),
                                                r["label"]))))
        return
    args.text = held_out_text(None)
    done = {json.loads(line)["label"] for line in out.read_text().splitlines()} if out.exists() else set()
    base = load_model(args.model, dtype=torch.bfloat16)
    to_working_precision(base.model)
    stats = collect_stats(base, Plan(method="saten-aw", target_ratio=0.5))
    base.model.to(torch.bfloat16)
    args.probe = DecoderProbe(base, args.text, args.tokens) if base.kind == "decoder" else None
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "torch": torch.__version__, "model": args.model, "tokens": args.tokens}
    rows = configs(args.ratios)
    if args.repair_share is not None:
        rows = [(f"{label} (share {args.repair_share})", {**fields, "repair_share": args.repair_share})
                for label, fields in rows if fields["method"] == "saten-q" and "bits" not in fields]
    rows += [(f"{label} + heal", fields) for label, fields in rows if label in args.heal]
    for label, fields in rows:
        if label in done or (args.only and label not in args.only and not label.endswith(" + heal")):
            continue
        to_working_precision(base.model)
        row = {**run(base, stats, label, fields, args), **meta}
        base.model.to(torch.bfloat16)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        ev = row.get("eval", {})
        print(f"{label}: {row.get('ratio', float('nan')):.3f} ppl {ev.get('ppl')} kl {ev.get('kl')} "
              f"sim {ev.get('embedding_similarity')} {row.get('infeasible', '')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
