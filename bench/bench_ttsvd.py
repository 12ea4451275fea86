"""Bench: our TT-SVD vs tensorly's default tensor_train vs one thin SVD per layer, on SmolLM2-135M's block linears.

Run: PYTHONPATH=. .venv/bin/python bench/bench_ttsvd.py --rank 128 --repeats 3 --threads 1
     PYTHONPATH=. .venv/bin/python bench/bench_ttsvd.py --synthetic 2048x8192 --count 4 --rank 128 --repeats 3
     (--synthetic: larger layers than SmolLM2's, where the cost of tensorly's full SVDs grows fastest)
     PYTHONPATH=. .venv/bin/python bench/bench_ttsvd.py --plan-ratio 0.8 --repeats 5 --threads 1
     (--plan-ratio: each layer's rank cap is the one the data-free Saten plan `--target-ratio R` gives it)
Prints one Markdown table (median total seconds over all layers, ratios measured side by side in each repeat).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train

from saten_core import tt
from saten_core.tensorize import tensorize, tensorized_shape


def load_weights(model: str) -> list[torch.Tensor]:
    """Wt (in, out) of every compressible block linear, float32."""
    from saten_core.models import linear_layers, load_model

    loaded = load_model(model)
    return [lin.weight.detach().float().T.contiguous() for _, lin in linear_layers(loaded.model)]


def synthetic_weights(shape: str, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Wt (in, out) of `count` random OUTxIN layers shaped like trained weights: a decaying low-rank part + noise."""
    try:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise ValueError(f"--synthetic must look like 2048x8192, got {shape!r}") from None
    gen = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f) // 4
    decay = torch.exp(-torch.arange(k) / (k / 4))
    mats = []
    for _ in range(count):
        a = torch.randn(in_f, k, generator=gen) * decay
        b = torch.randn(k, out_f, generator=gen)
        mats.append((a @ b / k**0.5 + 0.05 * torch.randn(in_f, out_f, generator=gen)).contiguous())
    return mats


def plan_ranks(model: str, ratio: float) -> list[int]:
    """Per-layer TT rank cap of the default data-free Saten plan keeping `ratio` of the block-linear bytes."""
    from saten_core.models import linear_layers, load_model
    from saten_core.plan import Plan, layer_spec

    plan = Plan(method="saten", target_ratio=ratio)
    layers = linear_layers(load_model(model).model)
    specs = [layer_spec(plan, name, lin.in_features, lin.out_features, lin.weight.dtype) for name, lin in layers]
    return [spec.rank for spec in specs]


def ours(t: torch.Tensor, rank: int) -> list[torch.Tensor]:
    return tt.tt_svd(t, max_rank=rank)


def ours_exact(t: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Our sweep with the randomized SVD switched off (exact Gram / QR route everywhere)."""
    saved = tt.RANDOMIZED_FRACTION
    tt.RANDOMIZED_FRACTION = 0.0
    try:
        return tt.tt_svd(t, max_rank=rank)
    finally:
        tt.RANDOMIZED_FRACTION = saved


def tensorly_default(t: torch.Tensor, rank: int) -> list[torch.Tensor]:
    with tl.backend_context("pytorch"):
        return list(tensor_train(t, rank=rank))


def thin_svd(wt: torch.Tensor, rank: int) -> list[torch.Tensor]:
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)
    return [u, s, vh]


def timed(fn: Callable, tensors: list[torch.Tensor], ranks: list[int]) -> tuple[float, list]:
    """Total seconds over all layers, and the outputs (kept for the quality check)."""
    start = time.perf_counter()
    outs = [fn(t, rank) for t, rank in zip(tensors, ranks, strict=True)]
    return time.perf_counter() - start, outs


def mean_error(outputs: list, tensors: list[torch.Tensor]) -> float:
    """Mean relative Frobenius error of the TT approximation (quality check: fast must not mean worse)."""
    pairs = zip(outputs, tensors, strict=True)
    errs = [float(torch.linalg.norm(tt.tt_to_tensor(c) - t) / torch.linalg.norm(t)) for c, t in pairs]
    return sum(errs) / len(errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--synthetic", default=None, help="OUTxIN: time random layers of this shape instead of a model")
    ap.add_argument("--count", type=int, default=4, help="number of synthetic layers")
    ap.add_argument("--plan-ratio", type=float, default=None,
                    help="per-layer rank caps of the data-free Saten plan at this target ratio (instead of --rank)")
    ap.add_argument("--threads", type=int, default=1, help="1 avoids OpenMP/LAPACK stalls on a loaded machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mats = synthetic_weights(args.synthetic, args.count) if args.synthetic else load_weights(args.model)
    source = f"synthetic {args.synthetic} layers" if args.synthetic else f"layers of {args.model}"
    ranks = plan_ranks(args.model, args.plan_ratio) if args.plan_ratio else [args.rank] * len(mats)
    rank_text = (f"rank caps of the saten plan at --target-ratio {args.plan_ratio} ({min(ranks)}-{max(ranks)})"
                 if args.plan_ratio else f"rank cap {args.rank}")
    tensors = [tensorize(w, *tensorized_shape(*w.shape, args.order)) for w in mats]
    methods = {"ours (auto: randomized when rank << unfolding)": (ours, tensors),
               "ours, exact Gram/QR SVDs only": (ours_exact, tensors),
               "tensorly tensor_train (default full SVDs)": (tensorly_default, tensors),
               "one thin torch.linalg.svd per layer": (thin_svd, mats)}
    runs: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, list] = {}
    for i in range(args.repeats):  # interleaved, so the ratios compare runs made side by side
        for name, (fn, data) in methods.items():
            seconds, outputs[name] = timed(fn, data, ranks)
            runs[name].append(seconds)
            print(f"repeat {i + 1}: {name}: {runs[name][-1]:.2f} s", file=sys.stderr, flush=True)
    base = runs["ours (auto: randomized when rank << unfolding)"]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(mats)} {source}, "
          f"{rank_text}, order {args.order}, {args.repeats} repeats")
    print("| method | median total s | median ratio to ours | mean rel. error |")
    print("|---|---:|---:|---:|")
    for name, (fn, data) in methods.items():
        ratio = statistics.median(t / b for t, b in zip(runs[name], base, strict=True))
        err = "n/a (full SVD)" if fn is thin_svd else f"{mean_error(outputs[name], data):.4f}"
        print(f"| {name} | {statistics.median(runs[name]):.2f} | {ratio:.2f}x | {err} |")


if __name__ == "__main__":
    main()
