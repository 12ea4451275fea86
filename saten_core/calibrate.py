"""Activation statistics: the input second moment X^T X of every linear layer, from a calibration text.

Activation-aware compression (whitened low-rank, activation-scored residuals) needs to know which input
directions a layer actually sees; a weight-only decomposition treats all directions alike and, on
SmolLM2-135M, destroys the model (see shared findings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Progress = Callable[[str, float, str], None]


@dataclass
class InputStats:
    """Second moment of a layer's inputs: xtx = sum_t x_t x_t^T (in, in), accumulated in float64."""

    xtx: torch.Tensor  # (in, in) float64, on the device the activations came from
    tokens: int

    @property
    def column_norms(self) -> torch.Tensor:
        """||X[:, j]|| over the calibration tokens, the Wanda-style input importance. # (in,)"""
        return self.xtx.diagonal().clamp_min(0).sqrt()

    def second_moment(self) -> torch.Tensor:
        """Mean x x^T (in, in), comparable across token counts."""
        return self.xtx / max(self.tokens, 1)


def _hook(stats: dict[str, InputStats], name: str, seen: dict[int, tuple]) -> Callable:
    """Forward hook accumulating X^T X of the layer's input.

    Layers fed the very same tensor in a forward (q/k/v, gate/up) share one InputStats object, so it is
    computed once: a third of the work and memory on Llama blocks. `seen` maps id(input) -> (input, stats)
    for the current window and holds the input alive so its id cannot be reused. Each window's product is
    taken in float32 (or wider, exact enough for <= a few thousand tokens) and accumulated in float64.
    """
    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inp = args[0]
        hit = seen.get(id(inp))
        if hit is not None and hit[0] is inp:
            stats.setdefault(name, hit[1])
            if stats[name] is hit[1]:
                return
        x = inp.detach().reshape(-1, inp.shape[-1])  # (T, in)
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        entry = stats.get(name)
        if entry is None:
            n = x.shape[-1]
            entry = stats[name] = InputStats(torch.zeros(n, n, dtype=torch.float64, device=x.device), 0)
        accumulate_gram(entry.xtx, x)
        entry.tokens += x.shape[0]
        seen[id(inp)] = (inp, entry)

    return record


GRAM_CHUNK = 1 << 22  # elements of one product slab: 16 MB in float32


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x, in row slabs of the product (x (T, in), acc (in, in) float64).

    Why slabs: the whole product of an 8192-input window is a 268 MB float32 temporary next to the 537 MB
    accumulator; a slab of rows is at most GRAM_CHUNK elements. Each slab is a float32 product (exact enough for
    a window of <= a few thousand tokens) widened into float64 element by element, in place.
    """
    n = x.shape[-1]
    rows = max(1, GRAM_CHUNK // n)
    for start in range(0, n, rows):
        acc[start : start + rows].add_(x[:, start : start + rows].T @ x)


def token_windows(tokenizer, text: str, tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Tokenise `text` and cut its first `tokens` tokens into windows of at most seq_len (1, L) each."""
    if tokens < 1 or seq_len < 1:
        raise ValueError(f"tokens and seq_len must be >= 1, got tokens={tokens}, seq_len={seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < tokens:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than the {tokens} requested")
    ids = ids[:tokens]
    return [ids[i : i + seq_len].unsqueeze(0) for i in range(0, tokens, seq_len)]


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module,
    tokenizer,
    text: str,
    layers: list[tuple[str, nn.Module]],
    *,
    tokens: int = 4096,
    seq_len: int = 512,
    progress: Progress | None = None,
) -> dict[str, InputStats]:
    """Stream `tokens` tokens of `text` through `model` and return InputStats per named layer.

    Example:
        stats = collect_input_stats(m, tok, calib_text, linear_layers(m), tokens=2048)
        L = whitening_factor(stats["model.layers.0.mlp.up_proj"])
    """
    if not layers:
        raise ValueError("no layers to calibrate")
    windows = token_windows(tokenizer, text, tokens, seq_len)
    stats: dict[str, InputStats] = {}
    seen: dict[int, tuple] = {}
    handles = [m.register_forward_hook(_hook(stats, name, seen)) for name, m in layers]
    device = next(model.parameters()).device
    try:
        for i, window in enumerate(windows):
            seen.clear()
            model(input_ids=window.to(device))
            if progress:
                progress("calibrate", (i + 1) / len(windows), f"calibration window {i + 1}/{len(windows)}")
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    return stats


def whitening_factor(stats: InputStats, damp: float = 1e-2) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + damp * mean(diag C) * I, C the mean input second moment.

    ||X^T E||_F = ||L^T E||_F, so decomposing L^T W^T minimises the layer's *output* error. The damping keeps
    L invertible when some input directions are never excited. Returned in float64. # (in, in)
    """
    return damped_factor(stats, damp)[0]


def damped_factor(stats: InputStats, damp: float = 1e-2) -> tuple[torch.Tensor, float]:
    """(L, ridge): whitening_factor's L and the ridge it added, so L L^T = second_moment() + ridge * I.

    Callers that need C = L L^T itself (the ALS refinement of whiten.py) rebuild it from stats.xtx and the ridge
    instead of multiplying L by its transpose: no third (in, in) matrix and no in^3 product.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    # Memory: C is a new tensor, damped on its diagonal and factored in place. LAPACK's potrf works in place on
    # a column-major matrix; C is symmetric, so its transpose view *is* C in column-major order, and factoring
    # that view (out= the same view) writes L into C's storage with no copy: one (in, in) float64 matrix
    # (537 MB at 8192 inputs) instead of two. L is returned as that column-major view.
    diag = stats.xtx.diagonal() / max(stats.tokens, 1)
    ridge = damp * float(diag.mean().clamp_min(1e-12))
    info = torch.empty((), dtype=torch.int32, device=stats.xtx.device)
    for attempt in range(6):
        c = stats.second_moment().mT  # a fresh one each attempt: a failed one leaves a partial factor
        c.diagonal().copy_(diag + ridge * (10**attempt))
        torch.linalg.cholesky_ex(c, out=(c, info))
        if int(info) == 0:
            return c, ridge * (10**attempt)
    raise ValueError(f"input second moment is not positive definite even with damping {damp * 1e5}")
