"""Bench: joint TT + sparse fitting per layer, held-out output error at equal bytes against Wanda.

Why: one-shot saten-aw lost to Wanda on every layer measured (bench_layer_refit.py), so its TT part did not pay
for its bytes. This measures whether refitting the TT part to W - S and re-choosing the mask on W - TT, round after
round (LayerSpec.fit_rounds), changes that, and which TT share it wants. Output error is measured on the input
second moment of the *held-out* text (the fit sees only the calibration text):
sqrt(tr(D C D^T) / tr(W C W^T)), D = W - W_hat.
Row fields: wanda; aw@S = the library's layer at share S with --rounds rounds (best round kept by calibration
error; --rounds 0 gives the one-shot split); alt@S = the error after rounds 0, 1, ... (the plain alternation,
no best-round choice), at the rounds named by --checkpoints; rank@S = the TT rank cap at share S.
Run: PYTHONPATH=. .venv/bin/python bench/bench_joint_fit.py --ratio 0.5 --rounds 6 --out docs/benchmarks/x.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_layer_refit import add_layer_args, layers_with_stats, out_err

from saten_core.calibrate import whitening_factor
from saten_core.layer import SatenLinear, _modes
from saten_core.plan import Plan, layer_spec
from saten_core.sparse import topk_mask
from saten_core.tt import tt_factor_pair
from saten_core.whiten import whitened_tt


def alternation(lin, spec, stats, rounds: int, held_c: torch.Tensor) -> list[float]:
    """Held-out output error after the one-shot split (round 0) and after each joint round."""
    wt = lin.weight.detach().float().mT
    low = whitening_factor(stats)
    in_m, out_m = _modes(lin.in_features, lin.out_features, spec)
    scores = stats.column_norms.float()[:, None].expand_as(wt)
    sparse, errs = torch.zeros_like(wt), []
    for _ in range(rounds + 1):
        a, b = tt_factor_pair(whitened_tt(wt - sparse, low, in_m, out_m, eps=spec.eps, max_rank=spec.rank), len(in_m))
        residual = wt - a @ b
        sparse = residual * topk_mask(residual.abs() * scores, spec.density, spec.group)
        errs.append(out_err(lin.weight, (a @ b + sparse).mT, held_c))
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.2, 0.35, 0.5])
    add_layer_args(ap)
    ap.add_argument("--checkpoints", type=int, nargs="*", default=None, help="rounds to report (default: all)")
    ap.add_argument("--out", default="joint_fit.jsonl")
    args = ap.parse_args()
    names, cal, held, lins = layers_with_stats(args)
    for name in names:
        lin, held_c = lins[name], held[name].second_moment()
        dims = (lin.in_features, lin.out_features, lin.weight.dtype)
        wanda = SatenLinear.from_linear(lin, layer_spec(Plan(method="wanda", target_ratio=args.ratio), name, *dims),
                                        stats=cal[name])
        row = {"ratio": args.ratio, "layer": name, "rounds": args.rounds,
               "wanda": round(out_err(lin.weight, wanda.to_dense(), held_c), 4)}
        for share in args.shares:
            plan = Plan(method="saten-aw", target_ratio=args.ratio, lowrank_share=share, fit_rounds=args.rounds)
            spec = layer_spec(plan, name, *dims)
            layer = SatenLinear.from_linear(lin, spec, stats=cal[name])
            errs = alternation(lin, spec, cal[name], args.rounds, held_c)
            keep = args.checkpoints if args.checkpoints is not None else range(len(errs))
            row.update({f"aw@{share}": round(out_err(lin.weight, layer.to_dense(), held_c), 4),
                        f"alt@{share}": [round(errs[i], 4) for i in keep if i < len(errs)],
                        f"rank@{share}": layer.rank()})
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
