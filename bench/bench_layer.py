"""Bench: SatenLinear forward latency vs dense nn.Linear (low-rank term, sparse-term paths, whole layer).

Run: PYTHONPATH=. .venv/bin/python bench/bench_layer.py --repeats 15 --threads 1
Prints Markdown tables of median forward times (ms) over repeats after warm-up; every ratio is taken against a
dense nn.Linear timed in the same loop, so load on the machine shifts both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch import nn

from saten_core.layer import SatenLinear
from saten_core.spec import LayerSpec

SHAPES = ((576, 1536), (1536, 576))  # (in, out): SmolLM2 gate/up and down projections
TOKENS = (1, 512)
RANKS = (32, 128, 256)
DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.5)
GATHER_MAX_ELEMENTS = 5e7  # tokens * nnz intermediate; larger would allocate hundreds of MB


def paired_ms(fn: Callable, ref: Callable, repeats: int) -> tuple[float, float]:
    """Median ms of fn and of ref, called alternately (3 warm-up calls each)."""
    times: dict[Callable, list[float]] = {fn: [], ref: []}
    with torch.no_grad():
        for i in range(repeats + 3):
            for f in (fn, ref):
                start = time.perf_counter()
                f()
                if i >= 3:
                    times[f].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[fn]), statistics.median(times[ref])


def _layer(dense: nn.Linear, spec: LayerSpec, path: str = "auto") -> SatenLinear:
    layer = SatenLinear.from_linear(dense, spec)
    layer.sparse_path = path
    return layer


def lowrank_rows(dense: nn.Linear, x: torch.Tensor, repeats: int) -> list[str]:
    rows = []
    for r in RANKS:
        layer = _layer(dense, LayerSpec(method="tt", rank=r))
        ms, ref = paired_ms(lambda layer=layer: layer(x), lambda: dense(x), repeats)
        rows.append(f"| low-rank only, rank {r} ({layer.ranks}) | {ms:.3f} | {ref:.3f} | {ms / ref:.2f} |")
    return rows


def sparse_rows(dense: nn.Linear, x: torch.Tensor, repeats: int) -> list[str]:
    """Sparse term alone (method prune) through each path."""
    rows = []
    specs = [(f"density {d}", LayerSpec(method="prune", density=d)) for d in DENSITIES]
    specs.append(("2:4", LayerSpec(method="prune", structure="2:4")))
    for label, spec in specs:
        for path in ("dense", "csr", "gather"):
            layer = _layer(dense, spec, path)
            if path == "gather" and x.shape[0] * layer.values.numel() > GATHER_MAX_ELEMENTS:
                continue
            ms, ref = paired_ms(lambda layer=layer: layer(x), lambda: dense(x), repeats)
            rows.append(f"| sparse only, {label}, path {path} | {ms:.3f} | {ref:.3f} | {ms / ref:.2f} |")
    return rows


def whole_rows(dense: nn.Linear, x: torch.Tensor, repeats: int) -> list[str]:
    """Saten layers with the automatic sparse path."""
    rows = []
    for r, d in ((32, 0.05), (128, 0.05), (128, 0.2), (256, 0.1)):
        layer = _layer(dense, LayerSpec(rank=r, density=d))
        path = layer._choose_path(x.shape[0])
        ms, ref = paired_ms(lambda layer=layer: layer(x), lambda: dense(x), repeats)
        rows.append(f"| saten rank {r}, density {d} (auto -> {path}) | {ms:.3f} | {ref:.3f} | {ms / ref:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP barrier stalls on a loaded machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, {args.repeats} repeats")
    for n_in, n_out in SHAPES:
        dense = nn.Linear(n_in, n_out)
        for tokens in TOKENS:
            x = torch.randn(tokens, n_in)
            print(f"\n### in {n_in} x out {n_out}, {tokens} token(s)\n")
            print("| layer | ms | dense ms | ratio |")
            print("|---|---:|---:|---:|")
            for row in lowrank_rows(dense, x, args.repeats) + sparse_rows(dense, x, args.repeats) + whole_rows(
                    dense, x, args.repeats):
                print(row, flush=True)


if __name__ == "__main__":
    main()
