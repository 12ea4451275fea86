"""Bench: held-out output error of single layers at equal bytes, Wanda vs saten-aw, with and without a refit.

Why: saten-aw trails Wanda by ~1% after healing (BENCHMARKS.md); this asks, per layer and without any model
evaluation, whether the TT part's bytes remove more output error than the same bytes of extra Wanda entries, and
whether a least-squares refit of the kept values (mask and TT part fixed, in the calibration output norm) would
change the order. Output error = sqrt(tr(D C D^T) / tr(W C W^T)), D = W - W_hat, C the input second moment of the
*held-out* text (the refit sees only the calibration text).
Run: PYTHONPATH=. .venv/bin/python bench/bench_layer_refit.py --ratio 0.8 --out docs/benchmarks/layer_refit.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saten_core.build import collect_stats
from saten_core.layer import SatenLinear, mask_of
from saten_core.models import linear_layers, load_model
from saten_core.pipeline import held_out_text
from saten_core.plan import Plan, layer_spec

VARIANTS = (("wanda", None), ("saten-aw", 0.05), ("saten-aw", 0.01))


def out_err(w: torch.Tensor, w_hat: torch.Tensor, c: torch.Tensor) -> float:
    d, w = (w - w_hat).double(), w.double()
    return float(torch.sqrt(torch.einsum("oi,ij,oj->", d, c, d) / torch.einsum("oi,ij,oj->", w, c, w)))


def refit(layer: SatenLinear, wt: torch.Tensor, c: torch.Tensor, damp: float = 1e-2) -> torch.Tensor:
    """Dense (out, in) weight after re-solving each output's kept values: C_KK s = C_K: (w - lowrank)."""
    mask = mask_of(layer)
    sparse = torch.zeros(mask.shape, dtype=torch.float64)
    sparse[mask] = layer.values.detach().double()
    lowrank = layer.to_dense().detach().mT.double() - sparse
    r = wt.double() - lowrank
    c = c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    s = torch.zeros_like(r)
    for o in range(r.shape[1]):
        k = mask[:, o].nonzero().squeeze(1)
        if k.numel():
            s[k, o] = torch.linalg.solve(c[k][:, k], c[k] @ r[:, o])
    return (lowrank + s).mT.float()


def add_layer_args(ap: argparse.ArgumentParser) -> None:
    """The layers a per-layer bench measures: blocks x module names of smollm2-135m."""
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 15, 26])
    ap.add_argument("--modules", nargs="+", default=["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"])


def layers_with_stats(args) -> tuple[list[str], dict, dict, dict]:
    """(names, calibration stats, held-out stats, name -> nn.Linear) of the chosen smollm2-135m layers."""
    torch.set_grad_enabled(False)
    base = load_model("smollm2-135m", device="cpu")
    names = [f"model.layers.{b}.{m}" for b in args.blocks for m in args.modules]
    sel = Plan(method="saten-aw", target_ratio=args.ratio, include=names)
    cal, held = collect_stats(base, sel), collect_stats(base, sel, held_out_text(None))
    return names, cal, held, dict(linear_layers(base.model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.8)
    add_layer_args(ap)
    ap.add_argument("--out", default="layer_refit.jsonl")
    args = ap.parse_args()
    names, cal, held, lins = layers_with_stats(args)
    for name in names:
        lin, row = lins[name], {"ratio": args.ratio, "layer": name}
        w, c_cal, c_held = lin.weight.detach(), cal[name].second_moment(), held[name].second_moment()
        for method, share in VARIANTS:
            plan = Plan(method=method, target_ratio=args.ratio, fit_rounds=0,  # one shot, as recorded
                        **({"lowrank_share": share} if share else {}))
            layer = SatenLinear.from_linear(lin, layer_spec(plan, name, lin.in_features, lin.out_features, w.dtype),
                                            stats=cal[name])
            key = method + (f"@{share}" if share else "")
            start = time.perf_counter()
            refitted = refit(layer, w.mT, c_cal)
            row.update({key: out_err(w, layer.to_dense(), c_held), f"{key}+refit": out_err(w, refitted, c_held),
                        f"{key}_rank": layer.rank(), f"{key}_bytes": layer.stored_bytes(),
                        f"{key}_refit_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
