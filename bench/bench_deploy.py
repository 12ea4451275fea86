"""Bench: deployment-true numbers on smollm2-135m (issue 15's table): bytes, resident and peak memory, speed.

Run: PYTHONPATH=. .venv/bin/python bench/bench_deploy.py --out docs/benchmarks/deploy.jsonl
Rows: the original at fp32 and bf16; saten-aw allocated per layer at 80% and 50% and Wanda at 50% of the bf16
block-linear bytes. Each compressed row is compress_to_dir(..., evaluate=True): held-out perplexity (bundled text,
--tokens), decode / prefill ratio against the original timed interleaved in the same process (median and min-max
over 5 rounds; on CPU against the faster of the bf16 and fp32 originals, named), and memory measured in a fresh
process per model after load + one 512-token forward. Each finished row is appended to --out (JSON lines) and a
rerun skips rows already there. The Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from saten_core.allocate import allocate_plan
from saten_core.deploy.memory import measure_process
from saten_core.models import load_model, parameter_bytes, working_precision
from saten_core.pipeline import compress_to_dir, evaluate_model, evaluate_ref
from saten_core.plan import Plan

MODEL = "smollm2-135m"
ROWS = [("saten-aw", 0.8, True), ("saten-aw", 0.5, True), ("wanda", 0.5, False)]
KEYS = ("resident_bytes", "resident_bytes_original", "peak_memory_bytes", "peak_memory_bytes_original",
        "memory_growth_bytes", "memory_growth_bytes_original", "decode_ratio", "decode_ratio_min",
        "decode_ratio_max", "prefill_ratio", "prefill_ratio_min", "prefill_ratio_max", "ratio_reference",
        "ppl", "ppl_original")


def original_row(dtype: str, tokens: int) -> dict:
    """The dense original at `dtype`: stored bytes, ppl, memory in a fresh process."""
    loaded = load_model(MODEL, dtype=getattr(torch, dtype))
    with working_precision(loaded.model):
        ppl = evaluate_model(loaded, tokens=tokens)["ppl"]
    stored = parameter_bytes(loaded.model)
    del loaded
    mem = measure_process(MODEL, dtype=dtype)
    return {"row": f"original {dtype}", "stored_bytes": stored, "resident_bytes": mem["resident_bytes"],
            "peak_memory_bytes": mem["peak_memory_bytes"], "memory_growth_bytes": mem["memory_growth_bytes"],
            "ppl": ppl}


def compressed_rows(method: str, ratio: float, allocate: bool, tokens: int) -> list[dict]:
    """The compact (default) row; for saten-aw 50% also the same folder evaluated with --materialize."""
    plan = Plan(method=method, target_ratio=ratio, calib="default")
    if allocate:
        plan = allocate_plan(load_model(MODEL, dtype=torch.bfloat16), plan)
    name = f"{method} {ratio:.0%}" + (" allocated" if allocate else "")
    with tempfile.TemporaryDirectory() as tmp:
        rep = compress_to_dir(MODEL, plan, Path(tmp) / "m", device="cpu", evaluate=True, tokens=tokens)
        rows = [_row(name, rep["totals"], rep["eval"])]
        if (method, ratio) == ("saten-aw", 0.5):
            ev = evaluate_ref(str(Path(tmp) / "m"), tokens=tokens, device="cpu", latency=True, materialize=True)
            rows.append(_row(name + " --materialize", rep["totals"], ev))
    return rows


def _row(name: str, tot: dict, ev: dict) -> dict:
    return {"row": name, "stored_bytes": tot["file_bytes"], "block_ratio": tot["ratio"],
            **{k: ev.get(k) for k in KEYS}, "side_by_side": ev["latency"]["side_by_side"]}


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def ratio(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "n/a"
    return f"{r[key]:.2f} ({r[key + '_min']:.2f}-{r[key + '_max']:.2f})"


def table(rows: list[dict]) -> str:
    head = ("| row | stored MiB | resident MiB | peak RSS MiB | RSS growth MiB | decode ratio (min-max) | "
            "prefill ratio (min-max) | vs | ppl |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['row']} | {mib(r['stored_bytes'])} | {mib(r['resident_bytes'])} | "
                     f"{mib(r['peak_memory_bytes'])} | {mib(r['memory_growth_bytes'])} | {ratio(r, 'decode_ratio')} | "
                     f"{ratio(r, 'prefill_ratio')} | {r.get('ratio_reference') or ''} | {r['ppl']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs/benchmarks/deploy.jsonl")
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    have = {r["row"] for r in done}
    todo = [("original", d) for d in ("float32", "bfloat16")] + [("compressed", r) for r in ROWS]
    for kind, what in todo:
        name = f"original {what}" if kind == "original" else f"{what[0]} {what[1]:.0%}" + (" allocated" * what[2])
        if name in have:
            continue
        rows = [original_row(what, args.tokens)] if kind == "original" else compressed_rows(*what, args.tokens)
        for row in rows:
            row.update(date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), machine=platform.processor() or
                       platform.machine(), threads=torch.get_num_threads(), tokens=args.tokens)
            done.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "side_by_side"}), flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
