"""Singular-value spectra of a model's compressible linear layers: energies, ranks, TT unfoldings, disk cache."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from saten_core.files import atomic_write_text, saten_home

CACHE_VERSION = 1
ENERGY_LEVELS = ("0.9", "0.95", "0.99")
# Densities at which the magnitude-energy profile of a layer's entries is tabulated (used by preview.py).
DENSITY_GRID = [0.0] + np.geomspace(1e-4, 1.0, 57).round(8).tolist()
EFFECTIVE_RANK_DEFINITION = "exp(-sum p_i log p_i), p_i = s_i^2 / sum_j s_j^2 (energy-normalised spectrum)"
HEAVY_TAIL_DEFINITION = (
    "power-law exponent alpha of the eigenvalues s_i^2 (as weightwatcher reports): continuous MLE "
    "alpha = 1 + n / sum log(x / xmin), xmin chosen by the smallest Kolmogorov-Smirnov distance"
)
_SAMPLE_ENTRIES = 32768  # entries per layer used for the magnitude profile and the fingerprint
_CHUNK_BYTES = 256 * 2**20  # cap on one stacked batch handed to svdvals

Progress = Callable[[str, float, str], None]


def energy_curve(s: np.ndarray) -> np.ndarray:
    """Cumulative energy fraction sum_{j<=k} s_j^2 / sum s^2 (last entry exactly 1; zeros for a zero matrix)."""
    cum = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    if cum.size == 0 or cum[-1] <= 0:
        return np.zeros_like(cum)
    return cum / cum[-1]


def rank_at_energy(energy: np.ndarray, level: float) -> int:
    """Smallest rank k whose top-k singular values hold at least `level` of the energy."""
    if not 0.0 < level <= 1.0:
        raise ValueError(f"energy level must be in (0, 1], got {level!r}")
    if energy.size == 0 or energy[-1] <= 0:
        return 0
    return int(min(np.searchsorted(energy, level - 1e-12) + 1, energy.size))


def effective_rank(s: np.ndarray) -> float:
    """Entropy effective rank exp(H(p)), p_i = s_i^2/sum s^2 (see EFFECTIVE_RANK_DEFINITION)."""
    e = np.asarray(s, dtype=np.float64) ** 2
    if e.sum() <= 0:
        return 0.0
    p = e[e > 0] / e.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def stable_rank(s: np.ndarray) -> float:
    """||W||_F^2 / ||W||_2^2: how many directions carry the energy, robust to tiny singular values."""
    s = np.asarray(s, dtype=np.float64)
    return float((s**2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def powerlaw_alpha(s: np.ndarray, *, min_tail: int = 10) -> float | None:
    """Heavy-tail exponent of the eigenvalues s^2, fitted the way weightwatcher's `powerlaw` fit does.

    Why: alpha in [2, 6] is the usual "well-trained" band; the value is a label for the dashboard, not an input
    to any compression decision. Returns None when fewer than `min_tail` positive eigenvalues exist.
    """
    x = np.sort(np.asarray(s, dtype=np.float64) ** 2)
    x = x[x > 0]
    n = x.size
    if n < min_tail:
        return None
    logx = np.log(x)
    starts = np.arange(n - min_tail + 1)  # candidate xmin = x[j]
    suffix = np.cumsum(logx[::-1])[::-1]  # sum_{i>=j} log x_i
    tail_n = n - starts
    denom = suffix[starts] - tail_n * logx[starts]
    ok = denom > 0
    alpha = np.where(ok, 1.0 + tail_n / np.where(ok, denom, 1.0), np.nan)
    i = np.arange(n)
    ratio = np.exp(np.clip(logx[None, :] - logx[starts][:, None], 0, None))  # x_i / xmin (clipped below 1)
    fit_cdf = 1.0 - ratio ** (1.0 - alpha[:, None])
    emp_cdf = (i[None, :] - starts[:, None] + 1) / tail_n[:, None]
    in_tail = i[None, :] >= starts[:, None]
    ks = np.where(in_tail, np.abs(emp_cdf - fit_cdf), 0.0).max(axis=1)
    ks = np.where(ok, ks, np.inf)
    best = int(np.argmin(ks))
    return float(alpha[best]) if np.isfinite(ks[best]) else None


def spectrum_stats(s: np.ndarray) -> dict:
    """Everything derived from one descending spectrum: energy curve, effective/stable rank, rank at energy."""
    energy = energy_curve(s)
    return {
        "energy": energy.tolist(),
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "rank_at_energy": {lvl: rank_at_energy(energy, float(lvl)) for lvl in ENERGY_LEVELS},
        "heavy_tail_alpha": powerlaw_alpha(s),
    }


def tt_unfoldings(wt: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]) -> list[torch.Tensor]:
    """The d-1 unfoldings of Wt tensorised to in_modes+out_modes: the k-th is (prod n_1..n_k, rest).

    Works on a batch too (leading dims kept). Row-major reshape of (in, out) equals the tensorisation, so
    each unfolding is a plain reshape, no permutation.
    """
    modes = list(in_modes) + list(out_modes)
    lead = wt.shape[:-2]
    if math.prod(in_modes) != wt.shape[-2] or math.prod(out_modes) != wt.shape[-1]:
        raise ValueError(f"modes {list(in_modes)}x{list(out_modes)} do not match Wt shape {tuple(wt.shape[-2:])}")
    flat = wt.reshape(*lead, -1)
    return [flat.reshape(*lead, math.prod(modes[: k + 1]), -1) for k in range(len(modes) - 1)]


def _svdvals(batch: torch.Tensor, device: str) -> torch.Tensor:
    """Singular values of a (B, m, n) stack on `device`, float32 (LAPACK has no half kernels), back on CPU."""
    return torch.linalg.svdvals(batch.to(device=device, dtype=torch.float32)).cpu()


def _chunks(n: int, per_item_bytes: int, device: str) -> list[range]:
    """Index ranges to stack. CPU: one matrix per call - LAPACK loops over a batch anyway, so stacking would
    only add a copy; CUDA: up to _CHUNK_BYTES per call, so one cuSOLVER batched call covers a shape group."""
    step = max(1, _CHUNK_BYTES // max(per_item_bytes, 1)) if device != "cpu" else 1
    return [range(i, min(i + step, n)) for i in range(0, n, step)]


def _stack(mats: list[torch.Tensor]) -> torch.Tensor:
    """(B, m, n) batch; a single matrix becomes a view, not a copy."""
    return mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)


def batched_svdvals(weights: Sequence[torch.Tensor], *, device: str = "cpu", progress: Progress | None = None,
                    ) -> list[torch.Tensor]:
    """svdvals of every matrix; on CUDA matrices of one shape are stacked into batched calls (see _chunks)."""
    groups: dict[tuple, list[int]] = {}
    for idx, w in enumerate(weights):
        groups.setdefault(tuple(w.shape), []).append(idx)
    out: list[torch.Tensor | None] = [None] * len(weights)
    done = 0
    for shape, idxs in groups.items():
        for part in _chunks(len(idxs), 4 * math.prod(shape), device):
            sel = [idxs[i] for i in part]
            vals = _svdvals(_stack([weights[i].detach() for i in sel]), device)
            for i, v in zip(sel, vals, strict=True):
                out[i] = v
            done += len(sel)
            if progress:
                progress("spectrum", done / len(weights), f"singular values {done}/{len(weights)}")
    return out  # type: ignore[return-value]


def unfolding_svdvals(weights: Sequence[torch.Tensor], modes: Sequence[tuple[list[int], list[int]]],
                      matrix_values: Sequence[torch.Tensor], *, device: str = "cpu") -> list[list[torch.Tensor]]:
    """Singular values of every TT unfolding per layer; the unfolding equal to Wt itself reuses matrix_values."""
    groups: dict[tuple, list[int]] = {}
    for idx, w in enumerate(weights):
        key = (tuple(w.shape), tuple(modes[idx][0]), tuple(modes[idx][1]))
        groups.setdefault(key, []).append(idx)
    out: list[list[torch.Tensor]] = [[] for _ in weights]
    for (shape, in_modes, out_modes), idxs in groups.items():
        for part in _chunks(len(idxs), 4 * math.prod(shape), device):
            sel = [idxs[i] for i in part]
            wt = _stack([weights[i].detach() for i in sel]).transpose(1, 2)  # (B, in, out)
            for unf in tt_unfoldings(wt, in_modes, out_modes):
                same = unf.shape[-2] == shape[1]  # the (in, out) unfolding: spectrum of W itself
                vals = [matrix_values[i] for i in sel] if same else list(_svdvals(unf, device))
                for i, v in zip(sel, vals, strict=True):
                    out[i].append(v)
    return out


def entry_energy_profile(weight: torch.Tensor) -> dict:
    """Share of a layer's energy held by its largest-|w| entries, at DENSITY_GRID and for 2:4 groups.

    Why: preview.py needs to know how much of a residual a kept fraction removes without computing the
    residual; the measured magnitude distribution of the layer (a strided sample of whole rows, so 2:4 groups
    along the input dimension stay intact) is a better model of heavy-tailed weights than a Gaussian.
    """
    out_f, in_f = weight.shape
    rows = torch.linspace(0, out_f - 1, steps=min(out_f, max(1, _SAMPLE_ENTRIES // in_f))).long()
    sample = weight.detach()[rows.to(weight.device)].to("cpu", torch.float64)  # (k, in); numpy below needs host
    sq = sample.flatten() ** 2
    total = float(sq.sum())
    cum = torch.cumsum(torch.sort(sq, descending=True).values, 0).numpy()
    grid = np.asarray(DENSITY_GRID)
    k = np.rint(grid * sq.numel()).astype(int)
    frac = np.where(k > 0, cum[np.maximum(k - 1, 0)], 0.0) / total if total > 0 else np.zeros_like(grid)
    two4 = None
    if in_f % 4 == 0 and total > 0:
        groups = sample.reshape(sample.shape[0], in_f // 4, 4) ** 2
        two4 = float(groups.topk(2, dim=-1).values.sum() / total)
    kurt = float((sq**2).mean() / (sq.mean() ** 2)) if total > 0 else 0.0
    return {"entry_energy": frac.tolist(), "entry_energy_2to4": two4, "entry_kurtosis": kurt}


def weights_fingerprint(layers: Sequence[tuple[str, nn.Linear]], *, extra: str = "") -> str:
    """sha256 over names, shapes, dtypes, a strided sample of every layer's bytes and one full-pass probe.

    The probe (dot product with a fixed pseudo-random vector, one BLAS pass) makes a change to any single
    weight, sign flips included, miss the cache even when the strided sample skips it. It runs on one thread:
    each dot is short and memory-bound, and with torch's OpenMP pool on a busy 2-core box the per-call thread
    wake-ups made it 6x slower (0.6 s vs 4 s for smollm2-135m, measured side by side).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fingerprint(layers, extra)
    finally:
        torch.set_num_threads(threads)


def _fingerprint(layers: Sequence[tuple[str, nn.Linear]], extra: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{extra}".encode())
    probes: dict[int, torch.Tensor] = {}
    for name, lin in layers:
        w = lin.weight.detach()
        flat = w.reshape(-1).float().cpu()
        if flat.numel() not in probes:
            gen = torch.Generator().manual_seed(flat.numel())
            probes[flat.numel()] = torch.rand(flat.numel(), generator=gen) + 0.5
        probe = float(torch.dot(flat, probes[flat.numel()]))
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}|{probe!r}".encode())
        h.update(flat[:: max(1, flat.numel() // _SAMPLE_ENTRIES)].contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _layer_entry(name: str, lin: nn.Linear, s: torch.Tensor, modes: tuple[list[int], list[int]],
                 unfoldings: list[torch.Tensor]) -> dict:
    """One JSON-able layer record: spectrum, its statistics, TT unfolding spectra, entry-magnitude profile."""
    out_f, in_f = lin.weight.shape
    values = s.tolist()
    return {
        "name": name,
        "shape": [out_f, in_f],
        "in_features": in_f,
        "out_features": out_f,
        "dtype": str(lin.weight.dtype).removeprefix("torch."),
        "bias_bytes": lin.bias.numel() * lin.bias.element_size() if lin.bias is not None else 0,
        "frobenius_norm": math.sqrt(sum(v * v for v in values)),
        "singular_values": values,
        **spectrum_stats(np.asarray(values)),
        "tt_modes": [list(modes[0]), list(modes[1])],
        "tt_unfoldings": [u.tolist() for u in unfoldings],
        **entry_energy_profile(lin.weight),
    }


def compute_spectra(layers: Sequence[tuple[str, nn.Linear]], *, device: str = "cpu", order: int = 2,
                    progress: Progress | None = None) -> dict:
    """Spectra of the given (name, nn.Linear) layers, no cache. See model_spectra for the cached entry point."""
    from saten_core.tensorize import tensorized_shape

    t0 = time.perf_counter()
    weights = [lin.weight for _, lin in layers]
    values = batched_svdvals(weights, device=device, progress=progress)
    t_svd = time.perf_counter() - t0
    modes = [tensorized_shape(w.shape[1], w.shape[0], order) for w in weights]
    if progress:
        progress("unfoldings", 0.0, "TT unfolding spectra")
    unfolded = unfolding_svdvals(weights, modes, values, device=device)
    entries = []
    for i, (name, lin) in enumerate(layers):
        entries.append(_layer_entry(name, lin, values[i], modes[i], unfolded[i]))
        if progress:
            progress("statistics", (i + 1) / len(layers), name)
    return {
        "version": CACHE_VERSION,
        "order": order,
        "device": device,
        "seconds": time.perf_counter() - t0,
        "seconds_svdvals": t_svd,
        "effective_rank_definition": EFFECTIVE_RANK_DEFINITION,
        "heavy_tail_definition": HEAVY_TAIL_DEFINITION,
        "layers": entries,
    }


def cache_path(fingerprint: str):
    """Where the spectra of weights with this fingerprint live: SATEN_HOME/spectra/<fingerprint>.json."""
    return saten_home() / "spectra" / f"{fingerprint}.json"


def save_cached(fingerprint: str, data: dict) -> None:
    """Write atomically with a sha256 header line, so a damaged file is detected rather than trusted.

    The energy curves are left out (load_cached rebuilds them from the singular values): half the bytes to parse.
    """
    slim = {**data, "layers": [{k: v for k, v in layer.items() if k != "energy"} for layer in data["layers"]]}
    payload = json.dumps(slim, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()
    atomic_write_text(cache_path(fingerprint), f"{digest}\n{payload}")


def load_cached(fingerprint: str) -> dict | None:
    """The cached spectra, or None when missing, damaged (bad checksum/JSON) or for other weights/version."""
    path = cache_path(fingerprint)
    try:
        digest, _, payload = path.read_text(encoding="utf-8").partition("\n")
        if hashlib.sha256(payload.encode()).hexdigest() != digest:
            return None
        data = json.loads(payload)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("fingerprint") == fingerprint and data.get("version") == CACHE_VERSION
    if not ok or not isinstance(data.get("layers"), list):
        return None
    try:
        for layer in data["layers"]:
            layer["energy"] = energy_curve(np.asarray(layer["singular_values"])).tolist()
    except (KeyError, TypeError, ValueError):
        return None
    return data


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return device


def _from_cache(fingerprint: str, use_cache: bool, progress: Progress | None) -> dict | None:
    """The cached spectra marked cached=True (reported as progress), or None on a miss or with use_cache off."""
    cached = load_cached(fingerprint) if use_cache else None
    if cached is None:
        return None
    if progress:
        progress("spectrum", 1.0, "loaded from cache")
    return {**cached, "cached": True}


def model_spectra(model: nn.Module, *, device: str = "auto", order: int = 2, use_cache: bool = True,
                  progress: Progress | None = None) -> dict:
    """Spectra of every compressible linear layer of `model`, from the disk cache when the weights match.

    Returns {"fingerprint", "cached", "layers": [...], ...}; each layer has name, shape, singular_values
    (descending), energy, effective_rank, stable_rank, rank_at_energy, heavy_tail_alpha, tt_modes,
    tt_unfoldings and the entry-energy profile preview.py uses.
    Example:
        >>> spec = model_spectra(load_model("smollm2-135m").model)
        >>> spec["layers"][0]["rank_at_energy"]["0.9"]
    """
    from saten_core.models import block_linears

    layers = block_linears(model)
    fingerprint = weights_fingerprint(layers, extra=f"order={order}")
    cached = _from_cache(fingerprint, use_cache, progress)
    if cached is not None:
        return cached
    data = compute_spectra(layers, device=_resolve_device(device), order=order, progress=progress)
    data["fingerprint"] = fingerprint
    save_cached(fingerprint, data)
    return {**data, "cached": False}


def _source_path(key: str):
    return saten_home() / "spectra" / "sources" / f"{key}.json"


def remember_source(key: str, fingerprint: str) -> None:
    """Record that the folder with lazy.folder_key `key` has spectra under `fingerprint` (atomic write)."""
    atomic_write_text(_source_path(key), json.dumps({"fingerprint": fingerprint}))


def source_fingerprint(key: str) -> str | None:
    """The spectra fingerprint recorded for the folder with this lazy.folder_key, or None (never computed)."""
    try:
        return str(json.loads(_source_path(key).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_for_source(key: str) -> dict | None:
    """The cached spectra of the folder with this lazy.folder_key, without reading its weights; None if unknown
    (never computed, files changed since, or the cache entry is gone or damaged)."""
    fingerprint = source_fingerprint(key)
    data = None if fingerprint is None else load_cached(fingerprint)
    return None if data is None else {**data, "cached": True}


def stored_spectra(ref: str, *, dtype: torch.dtype = torch.bfloat16, device: str = "auto", order: int = 2,
                   use_cache: bool = True, progress: Progress | None = None) -> dict:
    """model_spectra of a model read one layer at a time from its folder (lazy.StoredLinears): the same
    fingerprint and cache entry as model_spectra on the loaded model, at the memory of one layer.

    Falls back to loading the model whole when the folder's tensor names differ from its modules.
    """
    from saten_core.lazy import StoredLinears, folder_key, skeleton
    from saten_core.models import block_linears, load_model

    lm = skeleton(ref, dtype)
    key = folder_key(lm.source_dir, dtype)
    names = [name for name, _ in block_linears(lm.model)]
    try:
        layers = StoredLinears(lm.source_dir, names, dtype)
    except ValueError:
        data = model_spectra(load_model(ref, dtype=dtype).model, device=device, order=order, use_cache=use_cache,
                             progress=progress)
        remember_source(key, data["fingerprint"])
        return data
    data = _stream_spectra(layers, device=_resolve_device(device), order=order, use_cache=use_cache,
                           progress=progress)
    remember_source(key, data["fingerprint"])
    return data


def _stream_spectra(layers: Sequence[tuple[str, nn.Linear]], *, device: str, order: int, use_cache: bool,
                    progress: Progress | None) -> dict:
    """Fingerprint pass, then (cache miss) one compute_spectra per layer, merged as one result."""
    fingerprint = weights_fingerprint(layers, extra=f"order={order}")
    cached = _from_cache(fingerprint, use_cache, progress)
    if cached is not None:
        return cached
    t0, svd, entries = time.perf_counter(), 0.0, []
    for i, (name, lin) in enumerate(layers):
        one = compute_spectra([(name, lin)], device=device, order=order)
        entries += one["layers"]
        svd += one["seconds_svdvals"]
        if progress:
            progress("spectrum", (i + 1) / len(layers), f"layer {i + 1}/{len(layers)}: {name}")
    data = {**one, "seconds": time.perf_counter() - t0, "seconds_svdvals": svd, "layers": entries,
            "fingerprint": fingerprint} if entries else {"layers": [], "fingerprint": fingerprint}
    save_cached(fingerprint, data)
    return {**data, "cached": False}
