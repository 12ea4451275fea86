"""Bench: the fused low-rank + sparse CPU kernels per layer, against dense torch and the memory-bandwidth floor.

Run: PYTHONPATH=. .venv/bin/python bench/bench_kernels.py --out docs/benchmarks/kernels.jsonl
Sections (all bf16 unless named, torch's default threads, one process, variants interleaved round by round):
- stream bandwidth: bytes read per second by a sum over a 512 MiB buffer (the floor's denominator);
- decode (1 token) per layer at 50% of the dense bf16 bytes, Saten-shaped (factor pair of rank r + bitmask-sparse
  residual at the density the budget leaves) and Wanda-shaped (r = 0, density 0.5), against dense bf16 / fp32
  F.linear; each call reads a different copy of the weights (copies totalling > L3), so every variant streams
  from memory as in a whole-model decode; floor = bytes the kernel reads / stream bandwidth;
- prefill at 128 tokens, same layers; decode vs prefill path from 1 to 64 tokens (the DECODE_MAX_TOKENS rule);
- decode against dense over densities at r = 0 (where the bitmask format stops paying).
Medians of --rounds rounds; ratio = kernel time / dense time in the same round (median over rounds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

from saten_core.kernels import cpu, dispatch
from saten_core.kernels.format import sparse_rows
from saten_core.kernels.reference import lowrank_sparse
from saten_core.sparse import pack_bitmask

SHAPES = [(576, 1536, 32), (1536, 576, 32), (2048, 8192, 64)]  # (in, out, Saten rank at 50% of the bytes)
L3_BYTES = 96 << 20  # copies of a layer cycle through more than the last-level cache (32 MiB here)


def stream_bandwidth(repeats: int = 7) -> float:
    """Bytes per second a sum over 512 MiB reads (median)."""
    buf = torch.ones(128 << 20)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times[1:])


def saten_density(n_in: int, n_out: int, rank: int, ratio: float = 0.5) -> float:
    """Density whose values + bitmask + factor pair (all bf16) take `ratio` of the dense bf16 bytes."""
    budget = ratio * 2 * n_in * n_out - n_in * n_out / 8 - 2 * rank * (n_in + n_out)
    return max(0.0, budget / (2 * n_in * n_out))


def make_layer(n_in: int, n_out: int, rank: int, density: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_in, n_out, generator=g) < density
    values = torch.randn(int(mask.sum()), generator=g).to(torch.bfloat16)
    rows = sparse_rows("bitmask", pack_bitmask(mask), values, n_in, n_out)
    a = torch.randn(n_in, rank, generator=g).to(torch.bfloat16) if rank else None
    b = torch.randn(rank, n_out, generator=g).to(torch.bfloat16) if rank else None
    w = torch.randn(n_out, n_in, generator=g).to(torch.bfloat16)
    return {"rows": rows, "a": a, "b": b, "w16": w, "w32": w.float()}


def kernel_bytes(layer: dict) -> int:
    pair = sum(t.numel() * 2 for t in (layer["a"], layer["b"]) if t is not None)
    return layer["rows"].nbytes() + pair


def copies(n_in: int, n_out: int, rank: int, density: float) -> list[dict]:
    """Enough independent layers that cycling through them defeats the last-level cache."""
    count = max(2, min(24, L3_BYTES // (n_in * n_out * 6) + 1))
    return [make_layer(n_in, n_out, rank, density, seed) for seed in range(count)]


def variants(tokens: int) -> dict:
    """name -> fn(layer, x16, x32) for one call: dense bf16 / fp32 and the kernel path for `tokens`."""
    phase = "decode" if tokens <= dispatch.DECODE_MAX_TOKENS else "prefill"
    kernel = cpu.decode if phase == "decode" else partial(cpu.prefill, compute=torch.bfloat16)
    return {"dense bf16": lambda L, x, x32: F.linear(x, L["w16"]),
            "dense fp32": lambda L, x, x32: F.linear(x32, L["w32"]),
            f"kernel {phase}": lambda L, x, x32: kernel(x, L["rows"], L["a"], L["b"])}


REFERENCE = {"reference": lambda L, x, x32: lowrank_sparse(x, L["rows"], L["a"], L["b"], compute=torch.bfloat16)}


def time_round(layers: list[dict], fns: dict, tokens: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each variant, the variants interleaved call by call over the copies."""
    n_in = layers[0]["rows"].in_features
    x16 = torch.randn(tokens, n_in).to(torch.bfloat16)
    x32 = x16.float()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(calls):
        for name, fn in fns.items():
            layer = layers[(i * len(fns) + list(fns).index(name)) % len(layers)]
            t0 = time.perf_counter()
            fn(layer, x16, x32)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(layers: list[dict], tokens: int, rounds: int, calls: int, reference: bool = False) -> dict:
    """Kernel and dense interleaved; the reference path (milliseconds, allocating) timed apart so that its
    allocations and long calls do not disturb the others' rounds."""
    fns = variants(tokens)
    with torch.inference_mode():
        time_round(layers, fns, tokens, 5)  # warm-up
        per_round = [time_round(layers, fns, tokens, calls) for _ in range(rounds)]
        ref = time_round(layers, REFERENCE, tokens, 5)["reference"] if reference else None
    kernel = next(k for k in fns if k.startswith("kernel"))
    res = {k: statistics.median(r[k] for r in per_round) for k in fns}
    if ref is not None:
        res["reference"] = ref
    for dense in ("dense bf16", "dense fp32"):
        res[f"ratio vs {dense}"] = statistics.median(r[kernel] / r[dense] for r in per_round)
    res["kernel"] = res.pop(kernel)
    return res


def per_layer_rows(bandwidth: float, rounds: int) -> list[dict]:
    rows = []
    for n_in, n_out, rank in SHAPES:
        for shape_name, r, density in (("saten", rank, saten_density(n_in, n_out, rank)), ("wanda", 0, 0.5)):
            layers = copies(n_in, n_out, r, density)
            nbytes = kernel_bytes(layers[0])
            for tokens in (1, 128):
                res = measure(layers, tokens, rounds, 40 if tokens == 1 else 6, reference=tokens == 1)
                rows.append({"section": "layer", "shape": f"{n_in}x{n_out}", "kind": shape_name, "rank": r,
                             "density": round(density, 4), "tokens": tokens, "bytes": nbytes,
                             "bytes_fraction": nbytes / (2 * n_in * n_out),
                             "floor_s": nbytes / bandwidth, "dense_floor_s": 2 * n_in * n_out / bandwidth, **res})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def crossover_rows(rounds: int) -> list[dict]:
    """Decode path against prefill path by token count on 576x1536 Saten-shaped (the DECODE_MAX_TOKENS rule)."""
    layers = copies(576, 1536, 32, saten_density(576, 1536, 32))
    rows = []
    for tokens in (1, 4, 8, 16, 24, 32, 64):
        fns = {"decode": lambda L, x, x32: cpu.decode(x, L["rows"], L["a"], L["b"]),
               "prefill": lambda L, x, x32: cpu.prefill(x, L["rows"], L["a"], L["b"], compute=torch.bfloat16),
               "dense bf16": lambda L, x, x32: F.linear(x, L["w16"])}
        with torch.inference_mode():
            per_round = [time_round(layers, fns, tokens, 12) for _ in range(rounds)]
        res = {k: statistics.median(r[k] for r in per_round) for k in fns}
        res["decode/prefill"] = statistics.median(r["decode"] / r["prefill"] for r in per_round)
        rows.append({"section": "crossover", "shape": "576x1536", "tokens": tokens, **res})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def density_rows(rounds: int) -> list[dict]:
    rows = []
    for density in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        res = measure(copies(576, 1536, 0, density), 1, rounds, 30)
        rows.append({"section": "density", "shape": "576x1536", "density": density, "tokens": 1, **res})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def us(s: float) -> str:
    return f"{s * 1e6:,.0f}"


def tables(rows: list[dict], bandwidth: float) -> str:
    out = [f"stream read bandwidth {bandwidth / 1e9:.1f} GB/s", "",
           "| layer | kind | r | density | bytes vs dense | tokens | kernel µs | floor µs | kernel / floor "
           "| dense bf16 µs | dense fp32 µs | kernel / bf16 | kernel / fp32 | reference µs |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["section"] == "layer"):
        floor = f"{us(r['floor_s'])}" if r["tokens"] == 1 else "n/a"
        over = f"{r['kernel'] / r['floor_s']:.2f}" if r["tokens"] == 1 else "n/a"
        ref = us(r["reference"]) if "reference" in r else ""
        out.append(f"| {r['shape']} | {r['kind']} | {r['rank']} | {r['density']:.3f} | {r['bytes_fraction']:.2f} "
                   f"| {r['tokens']} | {us(r['kernel'])} | {floor} | {over} | {us(r['dense bf16'])} "
                   f"| {us(r['dense fp32'])} | {r['ratio vs dense bf16']:.2f} | {r['ratio vs dense fp32']:.2f} "
                   f"| {ref} |")
    out += ["", "| tokens | decode µs | prefill µs | dense bf16 µs | decode / prefill |", "|---|---|---|---|---|"]
    for r in (r for r in rows if r["section"] == "crossover"):
        out.append(f"| {r['tokens']} | {us(r['decode'])} | {us(r['prefill'])} | {us(r['dense bf16'])} "
                   f"| {r['decode/prefill']:.2f} |")
    out += ["", "| density (r = 0) | kernel µs | dense bf16 µs | kernel / bf16 |", "|---|---|---|---|"]
    for r in (r for r in rows if r["section"] == "density"):
        out.append(f"| {r['density']} | {us(r['kernel'])} | {us(r['dense bf16'])} | {r['ratio vs dense bf16']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--quick", action="store_true", help="one shape, one round (a smoke run, not a measurement)")
    args = ap.parse_args()
    if cpu.extension() is None:
        raise SystemExit("error: the compiled CPU kernels are not available; "
                         "run `python -m saten_core build-kernels`")
    if args.quick:
        SHAPES[:] = SHAPES[:1]
        args.rounds = 1
    bandwidth = stream_bandwidth()
    rows = per_layer_rows(bandwidth, args.rounds) + crossover_rows(args.rounds) + density_rows(args.rounds)
    stamp = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "machine": platform.machine(),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "isa": cpu.extension().best_isa(),
             "stream_bandwidth": bandwidth}
    if args.out:
        with args.out.open("a") as fh:
            for r in rows:
                fh.write(json.dumps({**stamp, **r}) + "\n")
    print(json.dumps(stamp))
    print(tables(rows, bandwidth))


if __name__ == "__main__":
    main()
