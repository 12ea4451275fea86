"""Budget split between the TT part and the sparse residual (plan.lowrank_share), measured on real layers.

For a few smollm2-135m block linears: fit on calibration-text input statistics, then measure the relative
*output* error ||X dW^T|| / ||X W^T|| on held-out-text inputs, at equal bytes (plan.target_ratio, indices and
masks counted) for several shares, for saten-aw and data-free saten; wanda and svd-w at the same bytes as
references. Also reports the re-TT loss of saten-aw at low rank caps (whiten.rett_loss).

Run: .venv/bin/python bench/bench_activation.py [--ratios 0.8 0.5] [--shares 0.1 0.25 0.5 0.75 1.0]
     [--tokens 1024] [--blocks 3 20] [--kinds q_proj o_proj up_proj down_proj]
Prints markdown tables for docs/benchmarks/activation.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def layer_error(linear, plan, name: str, fit_stats, test_moment) -> tuple[float, int]:
    """(held-out relative output error, stored bytes) of one layer compressed by `plan`."""
    from saten_core.compress import relative_output_error
    from saten_core.layer import SatenLinear
    from saten_core.plan import layer_spec

    spec = layer_spec(plan, name, linear.in_features, linear.out_features, linear.weight.dtype)
    new = SatenLinear.from_linear(linear, spec, stats=fit_stats)
    w = linear.weight.detach().float()
    return relative_output_error(new.to_dense().detach().float() - w, w, test_moment), new.stored_bytes()


def collect(loaded, layers, text: str, tokens: int):
    from saten_core.calibrate import collect_input_stats

    return collect_input_stats(loaded.model, loaded.tokenizer, text, layers, tokens=tokens, seq_len=512)


def measure(loaded, layers, fit, test, ratio: float, method: str, share: float | None) -> dict:
    """Median / mean held-out output error over the layers for one (method, ratio, share)."""
    from saten_core.plan import Plan

    plan = Plan(method=method, target_ratio=ratio, fit_rounds=0, **({} if share is None else {"lowrank_share": share}))
    errs, nbytes = [], 0
    for name, lin in layers:
        err, b = layer_error(lin, plan, name, fit[name], test[name].second_moment())
        errs.append(err)
        nbytes += b
    return {"method": method, "ratio": ratio, "share": share, "median": statistics.median(errs),
            "mean": statistics.fmean(errs), "bytes": nbytes, "errs": errs}


def rett_rows(layers, fit, ranks: list[int]) -> list[str]:
    """Output error of L^-T M_hat kept dense vs re-split into TT at the same caps (order 2)."""
    from saten_core.calibrate import whitening_factor
    from saten_core.tensorize import tensorized_shape
    from saten_core.whiten import rett_loss

    rows = []
    for name, lin in layers[:2]:
        in_modes, out_modes = tensorized_shape(lin.in_features, lin.out_features, 2)
        low = whitening_factor(fit[name])
        for r in ranks:
            d = rett_loss(lin.weight.detach().float().mT, low, in_modes, out_modes, max_rank=r)
            rows.append(f"| {name} | {in_modes + out_modes} | {r} | {d['dense'] / d['reference']:.4f} | "
                        f"{d['tt'] / d['reference']:.4f} | {d['tt'] / d['dense'] - 1:+.2%} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 20])
    ap.add_argument("--kinds", nargs="+", default=["q_proj", "o_proj", "up_proj", "down_proj"])
    args = ap.parse_args()
    from saten_core.corpus import default_text, split_text
    from saten_core.models import linear_layers, load_model

    t0 = time.perf_counter()
    loaded = load_model(args.model, device="cpu")
    layers = [(n, m) for n, m in linear_layers(loaded.model)  # model.layers.<block>.<attn|mlp>.<kind>
              if int(n.split(".")[2]) in args.blocks and n.rsplit(".", 1)[1] in args.kinds]
    calib, held = split_text(default_text())
    fit, test = collect(loaded, layers, calib, args.tokens), collect(loaded, layers, held, args.tokens)
    print(f"<!-- {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; layers: {', '.join(n for n, _ in layers)} -->")
    print("| method | kept bytes | lowrank_share | median rel. output error | mean |\n|---|---|---|---|---|")
    for ratio in args.ratios:
        for method in ("saten-aw", "saten"):
            for share in args.shares:
                r = measure(loaded, layers, fit, test, ratio, method, share)
                print(f"| {method} | {ratio:.0%} | {share} | {r['median']:.4f} | {r['mean']:.4f} |", flush=True)
        for method in ("wanda", "svd-w"):
            r = measure(loaded, layers, fit, test, ratio, method, None)
            print(f"| {method} | {ratio:.0%} | - | {r['median']:.4f} | {r['mean']:.4f} |", flush=True)
    print("\n| layer | modes | rank cap | dense L^-T M_hat | after re-TT | loss |\n|---|---|---|---|---|---|")
    print("\n".join(rett_rows(layers, fit, [4, 8, 16, 24, 64])))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
