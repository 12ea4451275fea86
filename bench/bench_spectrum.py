"""Spectrum speed on smollm2-135m: batched spectra vs a bare torch.linalg.svdvals loop, side by side.

Run: .venv/bin/python bench/bench_spectrum.py [--repeats 3] [--blocks N] [--device cpu]
Each repeat times, interleaved: the bare loop; batched_svdvals + per-layer statistics + fingerprint (the
spectrum proper); the TT unfolding spectra (reported as a separate extra); a cache write and a cache hit.
Prints medians as a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def one_repeat(layers, device: str) -> dict:
    from saten_core import spectrum as S
    from saten_core.tensorize import tensorized_shape

    weights = [lin.weight.detach() for _, lin in layers]
    bare, _ = timed(lambda: [torch.linalg.svdvals(w.to(device)).cpu() for w in weights])
    svd, values = timed(S.batched_svdvals, weights, device=device)
    modes = [tensorized_shape(w.shape[1], w.shape[0], 2) for w in weights]
    unf, unfolded = timed(S.unfolding_svdvals, weights, modes, values, device=device)
    stats, entries = timed(lambda: [S._layer_entry(n, lin, values[i], modes[i], unfolded[i])
                                    for i, (n, lin) in enumerate(layers)])
    fp_s, fp = timed(S.weights_fingerprint, layers, extra="bench")
    data = {"version": S.CACHE_VERSION, "fingerprint": fp, "layers": entries}
    write, _ = timed(S.save_cached, fp, data)
    hit, got = timed(S.load_cached, fp)
    assert got is not None and got["layers"] == entries
    return {"bare": bare, "svdvals": svd, "stats": stats, "fingerprint": fp_s, "spectrum": svd + stats + fp_s,
            "unfoldings": unf, "cache_write": write, "cache_hit": hit + fp_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=None, help="only the first N transformer blocks")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from saten_core.models import linear_layers, load_model

    layers = linear_layers(load_model(args.model).model)
    if args.blocks is not None:
        layers = [(n, lin) for n, lin in layers if int(n.split("layers.")[1].split(".")[0]) < args.blocks]
    runs = [one_repeat(layers, args.device) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    threads = torch.get_num_threads()
    print(f"{len(layers)} layers, {args.repeats} repeats, device {args.device}, torch threads {threads}")
    print("| step | median s | x bare loop |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['bare']:.2f} |")


if __name__ == "__main__":
    main()
