"""GPU check: the CUDA path end to end on smollm2-135m, printed as one Markdown table (run via bench/gpu_check.sh).

What it measures, each on the same device in one run so the ratios are side by side:
  1. compression time of the whole model (Saten, 80% of block-linear bytes kept; data-free, and activation-aware
     on the allocated plan with calibration and --heal-steps of healing, issue 5's best configuration), on CUDA;
  2. held-out perplexity, KL and top-1 agreement against the original;
  3. batch-1 prefill and decode latency of dense vs compressed (median of repeats, after warm-up), fp32 and fp16;
  4. the 2:4 semi-structured kernel (PyTorch `to_sparse_semi_structured`) against a dense fp16 matmul on
     SmolLM2's MLP shapes at 1 and 512 tokens, when the card supports it (compute capability >= 8.0).
  5. the fused kernels (issue 16): per-layer batch-1 GEMV of the Triton decode kernel at 50% of the fp16 bytes
     against cuBLAS fp16 on 2048x8192 and 8192x2048 (with its error against the reference path), and whole-model
     bf16 decode of data-free Saten at 80% and 50% against the bf16 original, interleaved (deploy.speed).
Run: bash bench/gpu_check.sh            (≤ 5 minutes on one H200; CPU fallback only with --allow-cpu, for testing)
     bash bench/gpu_check.sh --only-kernels   (section 5 alone)
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from saten_core.compress import compress_
from saten_core.evaluate import agreement, latency, perplexity
from saten_core.models import load_model
from saten_core.pipeline import held_out_text
from saten_core.plan import Plan

ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    """Record one table row and echo it at once, so a cut-off run still leaves its figures in the log."""
    ROWS.append((name, value))
    print(f"[gpu_check] {name}: {value}", file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs):
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return out, time.perf_counter() - start


def quality(name: str, base, model, tok, text: str, tokens: int) -> None:
    ppl = perplexity(model, tok, text, tokens=tokens)
    agree = agreement(base, model, tok, text, tokens=tokens)
    row(f"{name}: held-out ppl / KL / top-1", f"{ppl:.2f} / {agree['kl']:.4f} / {agree['top1_agreement']:.3f}")


def speed(name: str, model, tok, repeats: int) -> dict:
    lat = latency(model, tok, prefill_tokens=128, decode_tokens=32, repeats=repeats)
    row(f"{name}: prefill 128 tok ms / decode ms per tok",
        f"{lat['prefill_ms']:.2f} / {lat['decode_ms_per_token']:.2f}")
    return lat


def compress_variant(loaded, plan: Plan, label: str, **kwargs):
    model = copy.deepcopy(loaded.model)
    reports, seconds = timed(compress_, model, plan, **kwargs)
    before = sum(r["bytes_before"] for r in reports)
    after = sum(r["bytes_after"] for r in reports)
    row(f"{label}: compress s / bytes kept", f"{seconds:.1f} / {after / before:.3f} of {before / 2**20:.1f} MiB")
    return model


def semi_structured(repeats: int) -> None:
    """2:4 kernel vs dense fp16 matmul on SmolLM2 MLP shapes (skipped, with the reason, where unsupported)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        row("2:4 semi-structured kernel", "skipped: needs CUDA compute capability >= 8.0")
        return
    from torch.sparse import to_sparse_semi_structured

    for out_f, in_f in ((1536, 576), (576, 1536)):
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).tile(out_f, in_f // 4)
        w = w * mask
        ws = to_sparse_semi_structured(w)
        for tokens in (1, 512):
            x = torch.randn(max(tokens, 32), in_f, device="cuda", dtype=torch.float16)  # kernel needs >= 32 rows
            dense = _median_ms(functools.partial(torch.nn.functional.linear, x, w), repeats)
            sparse = _median_ms(functools.partial(torch.nn.functional.linear, x, ws), repeats)
            row(f"2:4 linear {out_f}x{in_f}, {tokens} tok: sparse ms / dense ms",
                f"{sparse:.4f} / {dense:.4f} ({sparse / dense:.2f}x)")


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats * 20):
        _, s = timed(fn)
        times.append(s * 1000)
    return statistics.median(times)


def half_rows(base, repeats: int) -> None:
    """fp16: dense vs Saten 2:4 (0.8 bytes) with the residual on PyTorch's semi-structured kernel."""
    from saten_core.layer import SatenLinear

    dense = copy.deepcopy(base.model).half()
    ref = speed("dense fp16", dense, base.tokenizer, repeats)
    model = compress_variant(base, Plan(method="saten", structure="2:4", target_ratio=0.8), "saten 2:4 0.8")
    model.half()
    try:
        for m in model.modules():
            if isinstance(m, SatenLinear):
                m.enable_semi_structured()
        label = "saten 2:4 fp16 (semi-structured kernel)"
    except (ValueError, RuntimeError) as err:
        label = f"saten 2:4 fp16 (dense residual: {str(err)[:60]})"
    lat = speed(label, model, base.tokenizer, repeats)
    row(f"{label}: decode time vs dense fp16", f"{lat['decode_ms_per_token'] / ref['decode_ms_per_token']:.2f}x")


def aw_rows(base, text: str, args) -> None:
    """Activation-aware Saten at 80% on the allocated plan: calibrate, compress, measure, heal, measure again."""
    from dataclasses import replace

    from saten_core.allocate import allocate_plan
    from saten_core.build import calibration_text, collect_stats, compress_loaded, heal_loaded

    plan = Plan(method="saten-aw", target_ratio=0.8, heal_steps=args.heal_steps, heal_lr=3e-5, heal_seq_len=128,
                heal_tokens=8192, heal_eval_tokens=512, heal_eval_every=max(args.heal_steps // 4, 1))
    stats, seconds = timed(collect_stats, base, plan)
    row("saten-aw: calibration s (input statistics, plan default tokens)", f"{seconds:.1f}")
    plan, seconds = timed(allocate_plan, base, plan)
    row("saten-aw: allocate s (all-layer spectra + allocation)", f"{seconds:.1f}")
    loaded = copy.copy(base)
    loaded.model = copy.deepcopy(base.model)
    info, seconds = timed(compress_loaded, loaded, replace(plan, heal_steps=0), stats=stats)
    kept = sum(r["bytes_after"] for r in info["layers"]) / sum(r["bytes_before"] for r in info["layers"])
    row("saten-aw 0.8 allocated: compress s / bytes kept", f"{seconds:.1f} / {kept:.3f}")
    quality("saten-aw 0.8 allocated", base.model, loaded.model, base.tokenizer, text, args.tokens)
    if args.heal_steps:
        healed, seconds = timed(heal_loaded, loaded, base.model, plan, calibration_text(plan))
        row(f"saten-aw 0.8 allocated: heal {args.heal_steps} steps lr 3e-5 s / best step",
            f"{seconds:.1f} / {healed.get('best_step')}")
        quality("saten-aw 0.8 allocated + heal", base.model, loaded.model, base.tokenizer, text, args.tokens)


def kernel_layer_rows(device: str, repeats: int) -> None:
    """Section 5a: one decode call of the fused kernel against the dense fp16 GEMV, same weights' shapes."""
    from bench.bench_kernels import make_layer, saten_density
    from saten_core.kernels import dispatch
    from saten_core.kernels.reference import lowrank_sparse

    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    path = "triton-decode" if device == "cuda" else "cpu-decode"
    shapes = [(2048, 8192), (8192, 2048)] if device == "cuda" else [(576, 1536)]
    for n_in, n_out in shapes:
        for kind, rank, density in (("saten", 64, saten_density(n_in, n_out, 64)), ("wanda", 0, 0.5)):
            layer = make_layer(n_in, n_out, rank, density, seed=0)
            rows = layer["rows"]
            rows.mask, rows.values, rows.row_offsets = (t.to(device) for t in (rows.mask, rows.values.to(dtype),
                                                                               rows.row_offsets))
            a, b = (None, None) if not rank else (layer["a"].to(device, dtype), layer["b"].to(device, dtype))
            w = layer["w16"].to(device, dtype)
            x = torch.randn(1, n_in, device=device, dtype=dtype)
            try:
                y = dispatch.run(path, x, rows, a, b, compute=dtype)
                err = float((y.float() - lowrank_sparse(x, rows, a, b).float()).norm()
                            / lowrank_sparse(x, rows, a, b).float().norm())
                k_ms = _median_ms(functools.partial(dispatch.run, path, x, rows, a, b, compute=dtype), repeats)
                d_ms = _median_ms(functools.partial(torch.nn.functional.linear, x, w), repeats)
                row(f"kernel {kind} 50% {n_in}x{n_out} {dtype}: {path} ms / dense ms / speed-up / rel. error",
                    f"{k_ms:.4f} / {d_ms:.4f} / {d_ms / k_ms:.2f}x / {err:.1e}")
            except Exception as exc:  # noqa: BLE001 - a failing kernel is a finding to record, not a lost run
                row(f"kernel {kind} 50% {n_in}x{n_out}: error", f"{type(exc).__name__}: {str(exc)[:200]}")


def kernel_model_rows(device: str) -> None:
    """Section 5b: whole SmolLM2 batch-1 decode at bf16, data-free Saten at 80% and 50%, interleaved."""
    import os

    from saten_core.deploy.speed import side_by_side

    base = load_model("smollm2-135m", device=device, dtype=torch.bfloat16)
    kernels = ["reference", "triton"] if device == "cuda" else ["cpu"]
    for ratio in (0.8, 0.5):
        model = copy.deepcopy(base.model).float()
        compress_(model, Plan(method="saten", target_ratio=ratio, dtype="bfloat16"))
        model = model.to(torch.bfloat16).eval()
        for kernel in kernels:
            os.environ["SATEN_CUDA_KERNELS"] = kernel  # read per call by kernels.dispatch.choose
            try:
                with torch.inference_mode():
                    res = side_by_side(model, {"bfloat16": base.model.eval()}, base.tokenizer, rounds=3)
                row(f"saten {ratio} bf16, {kernel} kernels: decode / prefill time vs bf16 original (min-max)",
                    f"{res['decode_ratio']:.2f} ({res['decode_ratio_min']:.2f}-{res['decode_ratio_max']:.2f}) / "
                    f"{res['prefill_ratio']:.2f} (below 1 = faster)")
            except Exception as exc:  # noqa: BLE001 - recorded, the other rows still run
                row(f"saten {ratio} bf16, {kernel} kernels: error", f"{type(exc).__name__}: {str(exc)[:200]}")
        os.environ.pop("SATEN_CUDA_KERNELS", None)
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heal-steps", type=int, default=64, help="healing steps for the saten-aw row (0 = none)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU when no GPU (a smoke test of this script)")
    ap.add_argument("--only-kernels", action="store_true", help="only section 5 (the fused kernels)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    row("device", f"{name}, torch {torch.__version__}")
    if args.only_kernels:
        kernel_layer_rows(device, args.repeats)
        kernel_model_rows(device)
        return print_table()
    (base, seconds) = timed(load_model, "smollm2-135m", device=device)
    row("load smollm2-135m s", f"{seconds:.2f}")
    text = held_out_text(None)
    quality("dense", base.model, base.model, base.tokenizer, text, args.tokens)
    dense_lat = speed("dense fp32", base.model, base.tokenizer, args.repeats)
    saten = compress_variant(base, Plan(method="saten", target_ratio=0.8), "saten 0.8 data-free")
    quality("saten 0.8 data-free", base.model, saten, base.tokenizer, text, args.tokens)
    lat = speed("saten 0.8 fp32", saten, base.tokenizer, args.repeats)
    row("saten 0.8 fp32: decode time vs dense",
        f"{lat['decode_ms_per_token'] / dense_lat['decode_ms_per_token']:.2f}x (above 1 = slower than dense)")
    del saten
    aw_rows(base, text, args)
    if device == "cuda":
        half_rows(base, args.repeats)
    semi_structured(args.repeats)
    kernel_layer_rows(device, args.repeats)
    kernel_model_rows(device)
    print_table()


def print_table() -> None:
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, command: bash bench/gpu_check.sh\n")
    print("| measurement | value |\n|---|---|")
    for k, v in ROWS:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
